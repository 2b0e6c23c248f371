"""Align the faces of a folder of photographs into 112x112 crops (the command line; the code is facedata/align/)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from facedata.align.cli import main

if __name__ == "__main__":
    sys.exit(main())
