"""Sweep every checkpoint of an experiment with the paper's protocol: python eval/evaluation.py [--config PATH] [--set KEY=VALUE ...] (the command line; the code is pipeline/sweep.py)."""
import sys

from pipeline.sweep import main

if __name__ == "__main__":
    sys.exit(main())
