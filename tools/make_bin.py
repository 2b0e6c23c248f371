"""Build an evaluation .bin (the authors' 5-item format) from a subjectid_gender folder (the command line; the code is facedata/bin_builder.py)."""
import sys

from facedata.bin_builder import main

if __name__ == "__main__":
    sys.exit(main())
