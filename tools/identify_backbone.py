"""Name the architectures a backbone file can hold, and each one's EER on a .bin (the command line; the code is pipeline/identify_backbone.py)."""
import sys

from pipeline.identify_backbone import main

if __name__ == "__main__":
    sys.exit(main())
