"""A user's mistake is one line that names the bad thing, with a non-zero exit: never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import study_dict

from sft_optuna.cli import main
from sft_optuna.coordination.storage import mask_url, open_storage


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; argparse's own exits count as exit codes."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _create(d: Path, **sections: Any) -> list[str]:
    """argv of ``create`` for a small study file with ``sections`` laid over it."""
    return [
        "--storage",
        f"sqlite:///{d}/s.db",
        "create",
        str(_file(d, "s.yaml", yaml.safe_dump(study_dict(d, **sections)).encode())),
    ]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # case -> (argv given a temporary directory, what the one line must say)
    "study file not UTF-8": (
        lambda d: ["--storage", f"sqlite:///{d}/s.db", "create", str(_file(d, "s.yaml", b"name: caf\xe9\n"))],
        "s.yaml: not a UTF-8 text file",
    ),
    "a database sft-optuna does not support": (
        lambda d: ["--storage", "mysql+pymysql://u:pw@127.0.0.1/db", "studies"],
        "mysql+pymysql://u:***@127.0.0.1/db: mysql is not supported (sft-optuna supports sqlite, postgresql",
    ),
    "psycopg2 driver missing": (
        lambda d: ["--storage", "postgresql+psycopg2://u:pw@127.0.0.1/db", "studies"],
        "driver 'psycopg2' is not installed (pip install psycopg2-binary",
    ),
    "journal:/// is the root directory": (lambda d: ["--storage", "journal:///", "studies"], "/ is a directory"),
    "journal path is a directory": (
        lambda d: ["--storage", f"journal://{d}", "studies"],
        "is a directory; name a file in it",
    ),
    "journal path is not a journal": (
        lambda d: ["--storage", "journal://" + str(_file(d, "notes.txt", b"my notes")), "studies"],
        "notes.txt is not an Optuna journal file",
    ),
    "a sampler option of the wrong type": (
        lambda d: [
            "--storage",
            f"sqlite:///{d}/s.db",
            "create",
            str(
                _file(
                    d,
                    "s.yaml",
                    yaml.safe_dump(study_dict(d, sampler={"name": "tpe", "n_startup_trials": "two"})).encode(),
                )
            ),
        ],
        "s.yaml: sampler.n_startup_trials: 'two' is not int",
    ),
    "an unknown architecture": (
        lambda d: _create(d, model={"arch": "resnet81", "weights": "none", "image_size": 16}),
        "s.yaml: model.arch: unknown architecture 'resnet81' (did you mean resnet18",
    ),
    "a knob that does not apply to the architecture": (
        lambda d: _create(d, model={"arch": "vit_b_16", "image_size": 224}, train={"bn": "frozen", "epochs": 2}),
        "s.yaml: train.bn: frozen: vit_b_16 has no BatchNorm layers",
    ),
    "a searched architecture that is not one": (
        lambda d: _create(d, search_space={"model.arch": {"type": "categorical", "choices": ["resnet18", "resnet5O"]}}),
        "s.yaml: search_space.model.arch: model.arch: unknown architecture 'resnet5O' (did you mean resnet50",
    ),
    "freeze_epochs not below epochs": (
        lambda d: _create(d, train={"epochs": 2, "freeze_epochs": 2}),
        "s.yaml: train.freeze_epochs: must be below train.epochs (the head-only phase is followed by full",
    ),
    "an EMA decay of 1": (
        lambda d: _create(d, train={"epochs": 2, "ema_decay": 1.0}),
        "s.yaml: train.ema_decay: must be >= 0 and < 1, got 1.0",
    ),
    "an augmentation key that does not exist": (
        lambda d: _create(d, train={"epochs": 2, "augment": {"crop": "resized", "mixupp": 0.2}}),
        "s.yaml: train.augment.mixupp: unknown key",
    ),
    "a fixed architecture that is not one, beside a searched one": (
        lambda d: _create(
            d,
            model={"arch": "resnet81", "weights": "none", "image_size": 16},
            search_space={"model.arch": {"type": "categorical", "choices": ["resnet18"]}},
        ),
        "s.yaml: model.arch: unknown architecture 'resnet81'",
    ),
    "too few trials for ASHA's rungs": (
        lambda d: _create(
            d,
            pruner={"name": "asha", "min_epochs": 1, "reduction_factor": 3},
            budget={"n_trials": 4},
            train={"epochs": 4},
        ),
        "s.yaml: budget.n_trials: 4 configurations are too few for ASHA's 2 rung(s) at reduction factor 3",
    ),
    "plan without the data on this node": (
        lambda d: [
            "plan",
            str(_file(d, "p.yaml", yaml.safe_dump(study_dict(d / "nowhere")).encode())),
            "--device",
            "cpu",
        ],
        "plan: no training images left at",
    ),
    "status on a mistyped SQLite path": (
        lambda d: ["--storage", f"sqlite:///{d}/typo.db", "status", "t"],
        "typo.db does not exist (nothing was created)",
    ),
    "studies on a missing journal file": (
        lambda d: ["--storage", f"journal://{d}/typo.log", "studies"],
        "typo.log does not exist (nothing was created)",
    ),
    "export --out is a file": (
        lambda d: ["--storage", f"sqlite:///{d}/s.db", "export", "t", "--out", str(_file(d, "f", b""))],
        "is a file, not a directory",
    ),
    "export --out under a file": (
        lambda d: ["--storage", f"sqlite:///{d}/s.db", "export", "t", "--out", str(_file(d, "f", b"") / "x")],
        "cannot create the directory",
    ),
    "retrain --out is a file": (
        lambda d: [
            "--storage",
            f"sqlite:///{d}/s.db",
            "retrain",
            "t",
            "--device",
            "cpu",
            "--out",
            str(_file(d, "f", b"")),
        ],
        "is a file, not a directory",
    ),
    "--threads -2": (lambda d: ["worker", "t", "--threads", "-2"], "argument --threads: -2 must be at least 1"),
    "--threads 0": (lambda d: ["worker", "t", "--threads", "0"], "argument --threads: 0 must be at least 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_users_mistake_is_one_line_naming_it(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_argv, expected = CASES[case]
    argv = make_argv(tmp_path)
    code, _, err = _cli(argv, capsys)
    assert code != 0
    assert expected in _one_line(err)
    if "create" in argv:
        assert not (tmp_path / "s.db").exists(), "a refused study file wrote nothing, not even a storage"
    assert "pw" not in err.replace("psycopg", "")
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "typo.log").exists(), "a look-up created a storage"


def test_a_file_that_is_not_a_journal_is_left_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = _file(tmp_path, "notes.txt", b"my notes\n")
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(study_dict(tmp_path)))
    code, _, err = _cli(["--storage", f"journal://{notes}", "create", str(study)], capsys)
    assert code == 2 and "not an Optuna journal file" in _one_line(err)
    assert notes.read_bytes() == b"my notes\n"


@pytest.mark.parametrize(
    ("choice_or_range", "expected"),
    [
        (
            {"scheduler": {"type": "categorical", "choices": ["constant", "cosin"]}},
            "search_space.scheduler.choices: 'cosin'",
        ),
        ({"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]}}, "search_space.optimizer.choices: 'adam'"),
        ({"nesterov": {"type": "categorical", "choices": [True, "yes"]}}, "search_space.nesterov.choices: 'yes'"),
        ({"momentum": {"type": "float", "low": 0.5, "high": 1.0}}, "search_space.momentum.high: value 1.0"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1}}, "search_space.lr.low: value 0.0"),
        ({"batch_size": {"type": "float", "low": 32, "high": 256}}, "search_space.batch_size.low: 32.0"),
        ({"epochs": {"type": "int", "low": 0, "high": 3}}, "search_space.epochs.low: value 0"),
    ],
)
def test_every_value_a_search_space_can_produce_is_checked_at_create(
    choice_or_range: dict[str, dict[str, object]],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: `cosin` created the study, trials ran it as cosine, and `best` printed `scheduler: cosin`.
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(study_dict(tmp_path, search_space=choice_or_range)))
    url = f"sqlite:///{tmp_path}/s.db"
    code, _, err = _cli(["--storage", url, "create", str(study)], capsys)
    assert code == 2 and expected in _one_line(err)
    assert not (tmp_path / "s.db").exists(), "nothing was created"


def test_storage_and_log_level_are_accepted_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/after.db"
    open_storage(url)  # an empty storage (a look-up command never creates one)
    code, out, _ = _cli(["studies", "--storage", url, "--log-level", "WARNING"], capsys)
    assert code == 0 and out == f"no studies in {url}\n"
    # before the command still works, and a value given before is not undone by the subcommand's default
    code, out, _ = _cli(["--storage", url, "studies"], capsys)
    assert code == 0 and out == f"no studies in {url}\n"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg://u:SEC@RET@db.example/x", "postgresql+psycopg://u:***@db.example/x"),
        (
            "postgresql+psycopg://u:s3cret@db:5432/x?sslmode=require",
            "postgresql+psycopg://u:***@db:5432/x?sslmode=require",
        ),
        ("postgresql+psycopg://db/x?user=u&password=s3cret", "postgresql+psycopg://db/x?user=u&password=***"),
        ("postgresql+psycopg://u@db/x", "postgresql+psycopg://u@db/x"),
        ("sqlite:///a/b.db", "sqlite:///a/b.db"),
        ("journal:///nfs/s.log", "journal:///nfs/s.log"),
    ],
)
def test_mask_url_hides_everything_between_the_scheme_and_the_last_at(url: str, masked: str) -> None:
    # Before: an unencoded @ in the password printed its tail ("RET@db.example") as the host.
    assert mask_url(url) == masked


def test_an_unencoded_at_in_the_password_never_reaches_an_error_message(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(["--storage", "postgresql+psycopg://sft:SEC@RET@127.0.0.1:1/x", "studies"], capsys)
    assert code == 2 and "SEC" not in err and "RET" not in err and "sft:***@127.0.0.1:1" in _one_line(err)


def test_look_up_commands_import_no_torch(tmp_path: Path) -> None:
    import subprocess

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(study_dict(tmp_path)))
    url = f"sqlite:///{tmp_path}/s.db"
    # create checks the study's architectures with torchvision: it runs in a process of its own
    create = f"from sft_optuna.cli import main\nmain(['--storage', {url!r}, 'create', {str(study)!r}])\n"
    subprocess.run([sys.executable, "-c", create], capture_output=True, text=True, check=True)
    script = (
        "import sys\nfrom sft_optuna.cli import main\n"
        f"for cmd in (['status', 't'], ['best', 't'], ['studies']):\n"
        f"    main(['--storage', {url!r}, *cmd])\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("torch imported: False"), out


def test_export_and_retrain_create_no_output_directory_when_there_is_nothing_to_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    open_storage(url)  # an empty storage: no study named t
    for command in (["export", "t"], ["retrain", "t", "--device", "cpu"]):
        out = tmp_path / f"out-{command[0]}"
        code, _, err = _cli(["--storage", url, *command, "--out", str(out)], capsys)
        assert code == 2 and "no study named 't'" in _one_line(err)
        assert not out.exists(), f"{command[0]} created {out} with nothing to write"
