"""The paper's grid (Rezgui et al., TBIOM 2024): each backbone family x the one-dataset setting for each of LFW,
AgeDB and ColorFeret x the cross-dataset folds, with the paper's method at the authors' defaults (alpha=20, beta=1,
100 epochs) and the comparison methods beside it, on every test set of the paper.

The gender test is the one the paper's runs used (the authors' code before its May 2024 refactor, README
"Gender-test protocols"): every image of each evaluation set's folder (gender_protocol=folders), verification on
insightface's own 2-item .bin files. plans/paper_released.py is the same grid under the released code's protocol.

Inputs (README, "Running on real data"): the backbone files at checkpoint_root/<family>/reference/backbone.pth, the
training datasets prepared into data/train/<name> (tools/prepare_dataset.py; they are also the gender-test folders
of lfw, agedb_30 and colorferet), the VGGFace2 sample prepared into data/train/VGGFace2_sample, and the verification
files data/eval_insightface/{lfw,agedb_30,colorferet,vggface2}.bin. Change a path or an option here, in a plan that
includes this one (INCLUDE = "paper"), or for every experiment with --set.
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

# the paper's gender test: every image of these folders (identities = folders, gender = the suffix after the last _)
GENDER_FOLDERS = {"lfw": "data/train/LFW", "agedb_30": "data/train/AgeDB", "colorferet": "data/train/ColorFeret",
                  "vggface2": "data/train/VGGFace2_sample"}
VERIFICATION_BINS = "data/eval_insightface"   # insightface's 2-item .bin files (the paper's faces_bins_112x112)

# options for every experiment, e.g. {"num_epoch": 100, "seed": 0}
SET = {"gender_protocol": "folders", "gender_folders": GENDER_FOLDERS, "rec": VERIFICATION_BINS}


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
