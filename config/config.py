"""Hyperparameters of a finetuning / evaluation run, one per line.

Names and defaults follow the authors' config; each option carries its allowed values and whether it is runtime-only
(config/options.py). A component's own options (e.g. ive.rounds) are declared in the component's file. Relative
paths are relative to the folder you run the commands from (the repository root in the README). Override any option
with ``--set KEY=VALUE`` or with another module (``--config PATH``: module-level names, or the authors' ``config =
edict()`` style). Options left at ``None`` are derived from the others when the config is loaded
(config/loading.py). The allowed range of each number and the known names (backbones, methods, attackers, headers)
are checked before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from config.options import OPTION_GROUPS, option


@dataclass
class Config:
    # ---- experiment (these names also form the output folders) ---------------------------------------------
    pretrained: str = option("ArcFace", "backbone family, a folder name: ArcFace, ElasticFace, SphereFace")
    experiment: str = option("OneDataset", "experiment setting, a folder name")
    data: str = option("ColorFeret", "training dataset name, a folder name")
    method: str = option("angular", "privacy method (privacy/): angular (the paper's), or a registered one")
    run_name: Optional[str] = option(None, "run folder name; None: the method's ({alpha}L1_{beta}L2 for angular)")
    plugins: list[str] = option([], "modules or .py files imported first (new methods, attackers)")

    # ---- backbone ----------------------------------------------------------------------------------------------
    network: str = option("iresnet50", "iresnet18/34/50/100/200, sfnet20, sfnet20_deprecated(_v0), onnx (onnx.model)")
    SE: bool = option(False, "squeeze-and-excitation blocks in the iresnet (ElasticFace's option)")
    embedding_size: int = option(512, "template size of the backbone and of the privacy layer", ge=1)

    # ---- the paper's method (angular): privacy layer and loss ---------------------------------------------------
    n_hidden: int = option(2, "privacy layer: 2 = Linear -> LeakyReLU(0.2) -> Linear (the paper's)", ge=1)
    loss: str = option("ArcFace", "identity header: ArcFace, CosFace, ElasticFace-Arc, ElasticFace-Cos")
    s: float = option(64.0, "logit scale of the header", gt=0)
    m: float = option(0.0, "margin of the header (0: plain normalised softmax, as in the paper)", ge=0)
    sigma: float = option(0.05, "std of the per-sample margin of the ElasticFace headers (ElasticFace's)", ge=0)
    alpha: float = option(20, "weight of P1 (angle between the batch's two gender centroids)", ge=0)
    beta: float = option(1, "weight of P2 (angle to the other gender's mean identity weight)", ge=0)

    # ---- optimisation ------------------------------------------------------------------------------------------
    lr: float = option(0.01, "Adam learning rate of the privacy layer", gt=0)
    headid_lr: float = option(0.01, "Adam learning rate of the identity header", gt=0)
    batch_size: int = option(128, "gender-balanced batches, drop_last", ge=1)
    num_epoch: int = option(100, "epochs; one epoch = N weighted draws with replacement", ge=1)
    global_step: int = option(0, "step counter at the start of training", ge=0)
    grad_clip: float = option(5.0, "gradient-norm clipping over the privacy layer's parameters", gt=0)
    # at most 2**31 - 1: numpy's generators take seeds below 2**32, and the seeds derived from this one (seed + 1,
    # seed + round) must stay below it too
    seed: int = option(0, "seeds weights, sampling and flips: same seed, same run on CPU", ge=0, le=2**31 - 1)
    checkpoint_every: int = option(10, "epochs between saved checkpoints (the last epoch is always saved)", ge=1)
    log_every: int = option(50, "steps between log lines", ge=1, runtime=True)
    resume: bool = option(False, "continue the latest checkpoint of the run folder instead of a new run", runtime=True)

    # ---- paths -------------------------------------------------------------------------------------------------
    checkpoint_root: str = option("work_dirs/checkpoints",
                                  "checkpoints: checkpoint_root/pretrained/experiment/data/run", runtime=True)
    log_dir: str = option("work_dirs/logs", "logs: log_dir/pretrained/experiment/data/run", runtime=True)
    data_dir: str | list[str] = option("data/train/ColorFeret",
                                       "training set(s): subjectid_gender folder, .rec, or a list")
    rec_genders: Optional[str] = option(None, "gender CSV (label,gender) of a .rec; None: <stem>_genders.csv")
    rec: str = option("data/eval", "folder of the evaluation files <name>.bin")
    cache_dir: str = option("work_dirs/cache", "template cache (backbone outputs, computed once)", runtime=True)
    output: Optional[str] = option(None, "checkpoint folder; None: checkpoint_root/pretrained/experiment/data/run",
                                   runtime=True)
    log_output: Optional[str] = option(None, "log folder; None: log_dir/pretrained/experiment/data/run", runtime=True)
    output_ori: Optional[str] = option(None,
                                       "backbone weights; None: checkpoint_root/pretrained/reference/backbone.pth")

    # ---- evaluation --------------------------------------------------------------------------------------------
    val_targets: list[str] = option(["lfw", "agedb_30"], "validated in training", runtime=True, unique=True)
    test_targets: list[str] = option(["vggface2", "lfw", "agedb_30", "colorferet"], "swept", unique=True)
    eval_step: int = option(1000, "steps between validations (0: no validation during training)", ge=0, runtime=True)
    gender_folds: int = option(3, "StratifiedGroupKFold splits of the gender-leakage test (authors: 3)", ge=2)
    gender_protocol: str = option("bins", "gender-test images: bins (the released code's: the .bin's gender part) or "
                                  "folders (the paper's runs: every image of gender_folders)",
                                  choices=("bins", "folders"))
    gender_folders: dict[str, str] = option({}, "gender_protocol=folders: target name -> subjectid_gender folder of "
                                            "its gender test, e.g. {'lfw': 'data/train/LFW'}")
    attackers: list[str] = option(["LogReg", "SVM", "RBF"], "gender attackers; 'all': every one")
    bootstrap: int = option(1000, "identity-level bootstrap draws for the attackers' intervals (0: none)", ge=0)
    n_jobs: int = option(-1, "sweep workers, (checkpoint, set) each (-1: all cores); results do not depend on it",
                         ge=-1, runtime=True)

    # ---- runtime -----------------------------------------------------------------------------------------------
    device: str = option("auto", "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:1, mps", runtime=True)
    cache: bool = option(True, "train on cached templates; False runs the backbone in the loop", runtime=True)
    cache_dtype: str = option("float32", "float32 or float16 storage of cached templates",
                              choices=("float32", "float16"))
    extract_batch_size: int = option(32, "images per extraction batch (each batch runs twice: as is, flipped)", ge=1,
                                     runtime=True)
    num_workers: int = option(-1, "image-decoding worker processes (-1: the cores' share less one, 2 to 8)", ge=-1,
                              runtime=True)
    amp: str = option("none", "extraction's autocast: none, bf16 (CUDA; CPUs with bf16 instructions) or fp16 (CUDA)",
                      choices=("none", "bf16", "fp16"))
    channels_last: bool = option(False, "channels_last memory format for the backbone (extraction and in-loop)",
                                 runtime=True)
    progress_every: float = option(30.0, "seconds between extraction progress lines without a terminal (0: each batch)",
                                   ge=0, runtime=True)

    # ---- options of components (methods, attackers, ...), declared in their own files --------------------------
    # group name -> its options dataclass, e.g. groups["ive"].rounds; set with --set ive.rounds=20
    groups: dict[str, Any] = field(default_factory=dict)

    def group(self, name: str) -> Any:
        """The options of component ``name`` (its declared defaults where none were set)."""
        if name in self.groups:
            return self.groups[name]
        return OPTION_GROUPS[name]()
