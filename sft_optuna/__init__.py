"""sft-optuna: hyperparameter search for fine-tuning ResNet-18 image classifiers, driven by Optuna."""

from __future__ import annotations

__version__ = "0.1.0"
