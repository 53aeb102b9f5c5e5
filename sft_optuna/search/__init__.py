"""What to try next: search spaces as Optuna distributions, samplers and pruners picked by name.

Imports ``config`` only (and Optuna).
"""
