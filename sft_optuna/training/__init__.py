"""Plain PyTorch: datasets as uint8 tensors, on-device augmentation, ResNet-18, the trainer.

Imports nothing of sft-optuna but ``config`` and ``errors``, and nothing of Optuna: it trains one
configuration and knows neither trials nor storages.
"""
