"""The paper's cross-dataset setting in one command: a thin alias of the cross_dataset plan (plans/cross_dataset.py,
run by the plan runner) that prints its table (the code is pipeline/cross_dataset.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.cross_dataset import main

if __name__ == "__main__":
    sys.exit(main())
