"""Verification of anyone's templates as ISO/IEC 19795-1/-10 ask (the command line; the code is eval/biometrics.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval.biometrics import main

if __name__ == "__main__":
    sys.exit(main())
