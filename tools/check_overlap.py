"""Find training images that are near-duplicates of evaluation images (the command line; the code is
pipeline/overlap_check.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.overlap_check import main

if __name__ == "__main__":
    sys.exit(main())
