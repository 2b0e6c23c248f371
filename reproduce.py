"""Reproduce the paper in one command (the command line; the code is pipeline/reproduce.py)."""
import sys

from pipeline.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
