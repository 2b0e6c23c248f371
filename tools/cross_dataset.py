"""The paper's cross-dataset setting in one command (the command line; the code is pipeline/cross_dataset.py)."""
import sys

from pipeline.cross_dataset import main

if __name__ == "__main__":
    sys.exit(main())
