"""Align the faces of a folder of photographs into 112x112 crops (the command line; the code is facedata/align/)."""
import sys

from facedata.align.cli import main

if __name__ == "__main__":
    sys.exit(main())
