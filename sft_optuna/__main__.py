"""``python -m sft_optuna`` = the ``sft-optuna`` command."""

from __future__ import annotations

import sys

from sft_optuna.cli import main

if __name__ == "__main__":
    sys.exit(main())
