"""The template extraction of ``finetune.py`` alone (its pre-flight and its templates, no fit), timed: run as one
process or under torchrun by bench/run.py to compare images/s. Process 0 prints one JSON line.

    [torchrun --standalone --nproc_per_node=N] bench/shared_extraction.py KEY=VALUE ...
"""
from __future__ import annotations
import sys
from pathlib import Path

# the suite runs from its checkout: this script's folder is replaced by the checkout's root on the import path
sys.path[0] = str(Path(__file__).resolve().parents[1])

import json
import sys
import time


from pipeline import train as finetune
from config.loading import load_config
from utils.device import select_device
from utils.distributed import processes


def main(overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    device = select_device(cfg.device)
    with processes(device) as procs:
        run = finetune.check_run(cfg, device, procs)
        procs.barrier()
        t0 = time.perf_counter()
        templates, _ = finetune.get_templates(run)
        seconds = time.perf_counter() - t0
        if procs.main:
            print(json.dumps({"images": len(templates), "seconds": seconds, "processes": procs.world}))


if __name__ == "__main__":
    main(sys.argv[1:])
