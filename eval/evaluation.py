"""Sweep every checkpoint of an experiment with the paper's protocol: python eval/evaluation.py [--config PATH] [--set
KEY=VALUE ...] (the command line; the code is pipeline/sweep.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.sweep import main

if __name__ == "__main__":
    sys.exit(main())
