"""Evaluation metrics: verification (EER, TAR), gender attackers and leakage, the per-set evaluation and PIC, the
train/test overlap."""
