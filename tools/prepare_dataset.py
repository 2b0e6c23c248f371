"""Turn a face dataset as downloaded into a subjectid_gender training folder (and, on request, a .bin) (the command line; the code is facedata/prepare.py)."""
import sys

from facedata.prepare import main

if __name__ == "__main__":
    sys.exit(main())
