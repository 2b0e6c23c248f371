"""Experiments end to end: training (finetune.py), the checkpoint sweep and its report (eval/evaluation.py), the
cross-dataset folds and the overlap check."""
