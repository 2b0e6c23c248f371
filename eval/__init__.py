"""Evaluation sweep (evaluation.py) and its report (report.py)."""
