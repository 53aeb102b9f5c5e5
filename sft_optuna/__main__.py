"""``python -m sft_optuna`` = the ``sft-optuna`` command."""

from __future__ import annotations

from sft_optuna.cli import main_entry

if __name__ == "__main__":
    main_entry()
