"""Gender (or any attribute) leakage of templates of any system: python eval/leakage.py --templates T.npy
(--labels L.csv | --folder DIR) [...] (the command line; the code is eval/leakage_cli.py, the measure
eval/gender_leakage.py)."""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval.leakage_cli import main

if __name__ == "__main__":
    sys.exit(main())
