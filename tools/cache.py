"""Report and reclaim the template cache's space: entries, build folders and row stores, what is in use, and the
leftovers of killed runs (the command line; the code is templates/space.py).

    python tools/cache.py --status [--cache-dir DIR | --set cache_dir=DIR]
    python tools/cache.py --prune  [--cache-dir DIR] [--grace-hours 24]
"""
import sys

from templates.space import main

if __name__ == "__main__":
    sys.exit(main())
