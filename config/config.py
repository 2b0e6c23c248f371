"""Hyperparameters of a finetuning / evaluation run, one per line.

Names and defaults follow the authors' config. Relative paths are relative to the folder you run the
commands from (the repository root in the README). Override any option with ``--set KEY=VALUE`` or with another
module (``--config PATH``: module-level names, or the authors' ``config = edict()`` style). Options left at
``None`` are derived from the others when the config is loaded (config/loading.py). The allowed range of each
number and the known names (backbones, methods, attackers, headers) are checked before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Config:
    # ---- experiment (these names also form the output folders) ---------------------------------------------
    pretrained: str = "ArcFace"            # backbone family, a folder name: ArcFace, ElasticFace, SphereFace
    experiment: str = "OneDataset"         # experiment setting, a folder name
    data: str = "ColorFeret"               # training dataset name, a folder name
    method: str = "angular"                # privacy method (privacy/): angular (the paper's), or a registered one
    run_name: Optional[str] = None         # run folder name; None: the method's ({alpha}L1_{beta}L2 for angular)
    plugins: list[str] = field(default_factory=list)  # modules or .py files imported first (new methods, attackers)

    # ---- backbone ----------------------------------------------------------------------------------------------
    network: str = "iresnet50"             # iresnet18/34/50/100/200, sfnet20, sfnet20_deprecated(_v0); see README
    SE: bool = False                       # squeeze-and-excitation blocks in the iresnet (ElasticFace's option)
    embedding_size: int = 512              # template size of the backbone and of the privacy layer

    # ---- the paper's method (angular): privacy layer and loss ---------------------------------------------------
    n_hidden: int = 2                      # privacy layer: 2 = Linear -> LeakyReLU(0.2) -> Linear (the paper's)
    loss: str = "ArcFace"                  # identity header: ArcFace, CosFace, ElasticFace-Arc, ElasticFace-Cos
    s: float = 64.0                        # logit scale of the header
    m: float = 0.0                         # margin of the header (0: plain normalised softmax, as in the paper)
    sigma: float = 0.05                    # std of the per-sample margin of the ElasticFace headers (ElasticFace's)
    alpha: float = 20                      # weight of P1 (angle between the batch's two gender centroids)
    beta: float = 1                        # weight of P2 (angle to the other gender's mean identity weight)

    # ---- other privacy methods (privacy/) ----------------------------------------------------------------------
    ive_dims_per_round: int = 8            # ive: dimensions removed per round (the most gender-predictive)
    ive_rounds: int = 20                   # ive: elimination rounds, a checkpoint each (keeps D - rounds * dims)
    ive_estimators: int = 100              # ive: trees of the random forest whose importances rank the dimensions
    pe_miu_block_size: int = 16            # pe_miu: size of the permuted blocks; must divide embedding_size
    inlp_iterations: int = 20              # inlp: linear classifiers whose directions are projected out, one each
    adversarial_weight: float = 1.0        # adversarial: weight of the reversed gradient of the gender adversary
    adversarial_hidden: int = 256          # adversarial: hidden units of the adversary (Linear-ReLU-Linear)

    # ---- optimisation ------------------------------------------------------------------------------------------
    lr: float = 0.01                       # Adam learning rate of the privacy layer
    headid_lr: float = 0.01                # Adam learning rate of the identity header
    batch_size: int = 128                  # gender-balanced batches, drop_last
    num_epoch: int = 100                   # epochs; one epoch = N weighted draws with replacement
    global_step: int = 0                   # step counter at the start of training
    grad_clip: float = 5.0                 # gradient-norm clipping over the privacy layer's parameters
    seed: int = 0                          # seeds weights, sampling and flips: same seed, same run on CPU
    checkpoint_every: int = 10             # epochs between saved checkpoints (the last epoch is always saved)
    log_every: int = 50                    # steps between log lines
    resume: bool = False                   # continue the latest checkpoint of the run folder instead of a new run

    # ---- paths -------------------------------------------------------------------------------------------------
    checkpoint_root: str = "work_dirs/checkpoints"  # checkpoints: checkpoint_root/pretrained/experiment/data/run
    log_dir: str = "work_dirs/logs"                 # logs: log_dir/pretrained/experiment/data/run
    data_dir: str | list[str] = "data/train/ColorFeret"  # training set(s): subjectid_gender folder, .rec, or a list
    rec_genders: Optional[str] = None               # gender CSV (label,gender) of a .rec; None: <stem>_genders.csv
    rec: str = "data/eval"                          # folder of the evaluation files <name>.bin
    cache_dir: str = "work_dirs/cache"              # template cache (backbone outputs, computed once)
    output: Optional[str] = None           # checkpoint folder; None: checkpoint_root/pretrained/experiment/data/run
    log_output: Optional[str] = None       # log folder; None: log_dir/pretrained/experiment/data/run
    output_ori: Optional[str] = None       # backbone weights; None: checkpoint_root/pretrained/reference/backbone.pth

    # ---- evaluation --------------------------------------------------------------------------------------------
    val_targets: list[str] = field(default_factory=lambda: ["lfw", "agedb_30"])  # validated in training
    test_targets: list[str] = field(default_factory=lambda: ["vggface2", "lfw", "agedb_30", "colorferet"])  # swept
    eval_step: int = 1000                  # steps between validations (0: no validation during training)
    gender_folds: int = 3                  # StratifiedGroupKFold splits of the gender-leakage test (authors: 3)
    attackers: list[str] = field(default_factory=lambda: ["LogReg", "SVM", "RBF"])  # gender attackers; "all": every one
    bootstrap: int = 1000                  # identity-level bootstrap draws for the attackers' intervals (0: none)
    n_jobs: int = -1                       # sweep workers, (checkpoint, set) each (-1: all cores); results do not depend on it

    # ---- runtime -----------------------------------------------------------------------------------------------
    device: str = "auto"                   # auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:1, mps
    cache: bool = True                     # train on cached templates; False runs the backbone in the loop
    cache_dtype: str = "float32"           # float32 or float16 storage of cached templates
    extract_batch_size: int = 32           # images per extraction batch (each batch runs twice: as is, flipped)
    num_workers: int = -1                  # image-decoding worker processes (-1: the cores' share less one, 2 to 8)
    amp: str = "none"                      # CUDA only, extraction: none, bf16 or fp16 autocast
    channels_last: bool = False            # channels_last memory format for the backbone (extraction and in-loop)
