"""Name the architectures a backbone file can hold, and each one's EER on a .bin (the command line; the code is
pipeline/identify_backbone.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.identify_backbone import main

if __name__ == "__main__":
    sys.exit(main())
