"""The ablation of the paper's method: an alpha x beta grid on one backbone and dataset. alpha = 0 is P2 alone,
beta = 0 is P1 alone, (0, 0) is the identity loss alone; (20, 1) is the paper's default and the same training as
the paper plan's (the same settings: trained once, wherever its run folder lies). Inputs: as the paper plan's, for
the backbone and dataset chosen here.
"""
INCLUDE = "paper"

BACKBONE = "ArcFace"
TRAINED_ON = "ColorFeret"
ALPHAS = [0, 1, 5, 10, 20, 40]
BETAS = [0, 0.5, 1, 2, 5]


def experiments(plan) -> list[dict]:
    return [dict(backbone=plan.BACKBONE, setting="Ablation", trained_on=plan.TRAINED_ON, method="angular",
                 options={**plan.BACKBONES[plan.BACKBONE], "alpha": alpha, "beta": beta,
                          "data_dir": plan.DATASETS[plan.TRAINED_ON], "test_targets": plan.EVAL_SETS,
                          "val_targets": [plan.TARGETS[plan.TRAINED_ON]]})
            for alpha in plan.ALPHAS for beta in plan.BETAS]
