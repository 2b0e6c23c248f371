"""The paper's cross-dataset setting: for each held-out dataset among LFW, AgeDB and ColorFeret, train on the other
two and evaluate on the held-out one's .bin; then train on all three and evaluate on the VGGFace2 sample.

    python reproduce.py cross_dataset [--set method=leace ...]      (or tools/cross_dataset.py, its own table)

Each fold is an ordinary run with the configuration's method and options, except: data_dir = the fold's training
datasets (a list, so their identities stay apart), data = their names joined by '+', experiment = EXPERIMENT,
val_targets = test_targets = the fold's evaluation set (config option rec holds <name>.bin).
"""
from utils.errors import UserError

DATASETS = {"LFW": "data/train/LFW", "AgeDB": "data/train/AgeDB", "ColorFeret": "data/train/ColorFeret"}
TARGETS = {"LFW": "lfw", "AgeDB": "agedb_30", "ColorFeret": "colorferet"}
ALL_TARGET = "vggface2"          # the fold trained on all datasets is evaluated on it ("" or None: no such fold)
EXPERIMENT = "CrossDataset"      # the runs' experiment folder
SET = {}


def folds(plan) -> list[tuple[str, list[str], str]]:
    """(held out ('' for the fold trained on all), datasets trained on, evaluation set) of every fold."""
    if len(plan.DATASETS) < 2:
        raise UserError(f"--datasets names {len(plan.DATASETS)} dataset(s); the cross-dataset setting trains on the "
                        f"others of each held-out one, so it needs at least two (the paper's: LFW, AgeDB, "
                        f"ColorFeret).")
    lacking = [n for n in plan.DATASETS if n not in plan.TARGETS]
    if lacking:
        raise UserError(f"--targets names no evaluation set for {', '.join(lacking)}; each held-out dataset is "
                        f"evaluated on its own .bin, e.g. --targets {lacking[0]}=<name of its .bin>.")
    out = [(held, [d for d in plan.DATASETS if d != held], plan.TARGETS[held]) for held in plan.DATASETS]
    return out + ([("", list(plan.DATASETS), plan.ALL_TARGET)] if plan.ALL_TARGET else [])


def experiments(plan) -> list[dict]:
    return [dict(setting="CrossDataset", trained_on="+".join(train_on), held_out=held or "(none)",
                 options={"data_dir": [plan.DATASETS[d] for d in train_on], "experiment": plan.EXPERIMENT,
                          "val_targets": [target], "test_targets": [target], "output": None, "log_output": None,
                          "resume": False})
            for held, train_on, target in folds(plan)]
