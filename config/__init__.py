"""Hyperparameters live in config/config.py; utils.config loads them with overrides."""
