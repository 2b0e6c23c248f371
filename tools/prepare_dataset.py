"""Turn a face dataset as downloaded into a subjectid_gender training folder (and, on request, a .bin) (the command
line; the code is facedata/prepare.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from facedata.prepare import main

if __name__ == "__main__":
    sys.exit(main())
