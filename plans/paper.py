"""The paper's grid (Rezgui et al., TBIOM 2024): each backbone family x the one-dataset setting for each of LFW,
AgeDB and ColorFeret x the cross-dataset folds, with the paper's method at the authors' defaults (alpha=20, beta=1,
100 epochs) and the comparison methods beside it, on every test set of the paper.

Inputs (README, "Running on real data"): the backbone files at checkpoint_root/<family>/reference/backbone.pth, the
training datasets prepared into data/train/<name> (tools/prepare_dataset.py) and the evaluation files
data/eval/{lfw,agedb_30,colorferet,vggface2}.bin. Change a path or an option here, in a plan that includes this one
(INCLUDE = "paper"), or for every experiment with --set.
"""

# backbone families: the options that select each one (its weights: checkpoint_root/<pretrained>/reference/)
BACKBONES = {
    "ArcFace": {"pretrained": "ArcFace", "network": "iresnet50"},
    "ElasticFace": {"pretrained": "ElasticFace", "network": "iresnet100"},
    "SphereFace": {"pretrained": "SphereFace", "network": "sfnet20_deprecated_v0"},
}
# training datasets (as tools/prepare_dataset.py writes them in the README) and each one's evaluation set
DATASETS = {"LFW": "data/train/LFW", "AgeDB": "data/train/AgeDB", "ColorFeret": "data/train/ColorFeret"}
TARGETS = {"LFW": "lfw", "AgeDB": "agedb_30", "ColorFeret": "colorferet"}
ALL_TARGET = "vggface2"                                  # the fold trained on all three is evaluated on it
EVAL_SETS = ["vggface2", "lfw", "agedb_30", "colorferet"]  # the one-dataset setting is evaluated on all of them
# the paper's method first (its options are config/config.py's defaults: the authors'), then the comparison methods
METHODS = {"angular": {}, "ive": {}, "pe_miu": {}, "inlp": {}, "leace": {}, "adversarial": {}}
CROSS_METHODS = list(METHODS)

SET = {}   # options for every experiment, e.g. {"num_epoch": 100, "seed": 0}


def experiments(plan) -> list[dict]:
    out = []
    for backbone, selects in plan.BACKBONES.items():
        for data, path in plan.DATASETS.items():                   # the one-dataset setting
            for method, options in plan.METHODS.items():
                out.append(dict(backbone=backbone, setting="OneDataset", trained_on=data, method=method,
                                options={**selects, **options, "data_dir": path, "test_targets": plan.EVAL_SETS,
                                         "val_targets": [plan.TARGETS[data]]}))
        folds = [(held, [d for d in plan.DATASETS if d != held], plan.TARGETS[held]) for held in plan.DATASETS]
        folds.append(("(none)", list(plan.DATASETS), plan.ALL_TARGET))
        for held, train_on, target in folds:                      # the cross-dataset folds
            for method in plan.CROSS_METHODS:
                out.append(dict(backbone=backbone, setting="CrossDataset", trained_on="+".join(train_on),
                                held_out=held, method=method,
                                options={**selects, **plan.METHODS[method],
                                         "data_dir": [plan.DATASETS[d] for d in train_on], "test_targets": [target],
                                         "val_targets": [target]}))
    return out
