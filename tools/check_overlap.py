"""Find training images that are near-duplicates of evaluation images (the command line; the code is pipeline/overlap_check.py)."""
import sys

from pipeline.overlap_check import main

if __name__ == "__main__":
    sys.exit(main())
