"""Fit a privacy method on a frozen backbone: python finetune.py [--config PATH] [--set KEY=VALUE ...] (the command
line; the code is pipeline/train.py)."""
import sys

from pipeline.train import main

if __name__ == "__main__":
    sys.exit(main())
