"""The paper plan's shape on the demo's synthetic world: a first try of `python reproduce.py synthetic` (minutes on 2
CPU cores, nothing downloaded) and what the tests run.

THE NUMBERS ARE SYNTHETIC. The "faces" are images into which a template has been painted and the demo backbone
reads it back (demo.py explains it). Three synthetic training datasets stand for LFW, AgeDB and ColorFeret, each with
an evaluation .bin of other identities, and a fourth .bin stands for the VGGFace2 sample. The grid has the paper's
shape: the one-dataset setting for each dataset with the paper's method and the comparison methods, the
cross-dataset folds, and a small alpha x beta ablation. The one-dataset runs of FOLDER_METHODS are swept under both
gender-test protocols (README "Gender-test protocols"): the .bin files' gender part (bins, the released code's) and
every image of each set's folder (folders, the paper's runs': a training dataset's own folder, as the paper tested on
the images it trained on, and the test folder of the set standing for the VGGFace2 sample); the tables mark the
latter "[gender test: folders]". The trainings are shared.
"""
from pathlib import Path

ROOT = "work_dirs/synthetic"           # where prepare() writes the synthetic world (once; reused afterwards)
GENERATED_ROOT = ROOT
SEED = 0
# size of the world: identities and images per training dataset, of each evaluation set, pairs and gender images
SIZE = dict(train_ids=100, train_imgs=6, test_ids=40, test_imgs=5, pairs=300, gender=200)
DATASETS = ["SynthA", "SynthB", "SynthC"]               # stand for LFW, AgeDB, ColorFeret
TARGETS = {"SynthA": "synth_a", "SynthB": "synth_b", "SynthC": "synth_c"}
ALL_TARGET = "synth_all"                                 # stands for the VGGFace2 sample
# the comparison methods at demo-sized settings (their defaults are sized for real training sets)
METHODS = {"angular": {}, "ive": {"ive.rounds": 5}, "inlp": {"inlp.iterations": 5}, "leace": {},
           "pe_miu": {"pe_miu.block_size": 128}, "adversarial": {}}
CROSS_METHODS = ["angular", "leace"]
ABLATION = dict(trained_on="SynthA", alphas=[0, 20], betas=[0, 1])
FOLDER_METHODS = ["angular", "leace"]                    # one-dataset runs swept under the folder protocol too
BACKBONE = "Demo decoder"

SET = {"plugins": ["synthetic"], "network": "demo_decoder", "pretrained": "Demo", "num_epoch": 8,
       "batch_size": 64, "checkpoint_every": 4, "eval_step": 0, "log_every": 25, "num_workers": 0,
       "val_targets": []}


def world(plan) -> Path:
    """The world's folder: its size and seed in the name, so that another size never mixes with this one."""
    size = "-".join(str(plan.SIZE[k]) for k in sorted(plan.SIZE))
    return Path(plan.ROOT) / f"world-{size}-{plan.SEED}"


def prepare(plan) -> None:
    """Write the synthetic datasets, .bin files and backbone (skipped when they are there)."""
    import numpy as np
    from facedata.bin_builder import build_bin
    from utils.io import atomic_write_text
    from synthetic.data import identity_basis, population, save_demo_backbone, write_identity_folders
    import os
    import shutil
    final, size = world(plan), plan.SIZE
    if (final / "done").is_file():
        return
    # built aside, then renamed into place: processes starting together (shards) never see a half-made world
    root = final.parent / f".building-{final.name}-{os.getpid()}"
    rng = np.random.default_rng(plan.SEED)
    direction = rng.normal(size=512)
    direction /= np.linalg.norm(direction)
    basis = identity_basis(512, 48, rng)
    for k, name in enumerate([*plan.DATASETS, None]):
        if name is not None:
            centres, genders = population(size["train_ids"], 512, rng, 0.2, direction, basis)
            write_identity_folders(root / "train" / name, centres, genders, size["train_imgs"], 2.2, rng)
        target = plan.TARGETS[name] if name else plan.ALL_TARGET
        centres, genders = population(size["test_ids"], 512, rng, 0.2, direction, basis)
        write_identity_folders(root / "test" / target, centres, genders, size["test_imgs"], 2.2, rng)
        build_bin(root / "test" / target, root / "eval" / f"{target}.bin", n_pairs=size["pairs"],
                  n_gender=size["gender"], seed=plan.SEED + k)
    save_demo_backbone(root / "backbone.pth", 512)
    atomic_write_text(root / "done", "complete\n")
    try:
        os.rename(root, final)
    except OSError:
        if not (final / "done").is_file():
            raise
        shutil.rmtree(root)   # another process made the same world first (it is seeded: the same files)


def experiments(plan) -> list[dict]:
    root = world(plan)
    backbone = {"output_ori": str(root / "backbone.pth"), "rec": str(root / "eval")}
    every_set = [*plan.TARGETS.values(), plan.ALL_TARGET]
    out = []
    for data in plan.DATASETS:                                     # the one-dataset setting
        for method, options in plan.METHODS.items():
            out.append(dict(backbone=plan.BACKBONE, setting="OneDataset", trained_on=data, method=method,
                            options={**backbone, **options, "data_dir": str(root / "train" / data),
                                     "test_targets": every_set}))
    folders = {**{t: str(root / "train" / d) for d, t in plan.TARGETS.items() if d in plan.DATASETS},
               plan.ALL_TARGET: str(root / "test" / plan.ALL_TARGET)}
    for data in plan.DATASETS:                                     # the same trainings, the paper-era gender test
        for method in (m for m in plan.FOLDER_METHODS if m in plan.METHODS):   # those the plan trains
            out.append(dict(backbone=plan.BACKBONE, setting="OneDataset", trained_on=data, method=method,
                            options={**backbone, **plan.METHODS[method], "data_dir": str(root / "train" / data),
                                     "test_targets": every_set, "gender_protocol": "folders",
                                     "gender_folders": folders}))
    folds = [(held, [d for d in plan.DATASETS if d != held], plan.TARGETS[held]) for held in plan.DATASETS]
    folds.append(("", list(plan.DATASETS), plan.ALL_TARGET))
    for held, train_on, target in folds:                           # the cross-dataset folds
        for method in plan.CROSS_METHODS:
            out.append(dict(backbone=plan.BACKBONE, setting="CrossDataset", trained_on="+".join(train_on),
                            held_out=held or "(none)", method=method,
                            options={**backbone, **plan.METHODS[method],
                                     "data_dir": [str(root / "train" / d) for d in train_on],
                                     "test_targets": [target]}))
    ab = plan.ABLATION
    for alpha in ab["alphas"]:                                     # the ablation grid
        for beta in ab["betas"]:
            # the default point (alpha=20, beta=1) is the one-dataset training: the same settings, trained once
            out.append(dict(backbone=plan.BACKBONE, setting="Ablation", trained_on=ab["trained_on"], method="angular",
                            options={**backbone, "alpha": alpha, "beta": beta,
                                     "data_dir": str(root / "train" / ab["trained_on"]),
                                     "test_targets": [plan.TARGETS[ab["trained_on"]]]}))
    return out
