"""Report and reclaim the template cache's space: entries, build folders and row stores, what is in use, and the
leftovers of killed runs (the command line; the code is templates/space.py).

    python tools/cache.py --status [--cache-dir DIR | --set cache_dir=DIR]
    python tools/cache.py --prune  [--cache-dir DIR] [--grace-hours 24] [--remove-damaged]
"""
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

from templates.space import main

if __name__ == "__main__":
    sys.exit(main())
