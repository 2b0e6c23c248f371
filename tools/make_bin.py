"""Build an evaluation .bin (the authors' 5-item format) from a subjectid_gender folder (the command line; the code is
facedata/bin_builder.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from facedata.bin_builder import main

if __name__ == "__main__":
    sys.exit(main())
