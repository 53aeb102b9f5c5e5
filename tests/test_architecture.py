"""The folders are the layers: imports point down only, and training knows nothing of Optuna."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sft_optuna"

# Layer of each module or folder, lowest first; a module may import its own layer or lower ones.
LAYERS = {
    "errors": 0,
    "attrs": 0,
    "config": 0,
    "training": 1,
    "search": 1,
    "node": 1,
    "coordination": 2,
    "study_file": 2,
    "objective": 3,
    "results": 4,
    "study": 5,
    "worker": 5,
    "launch": 5,
    "packing": 5,
    "cli": 6,
    "__main__": 7,
}
ALLOWED_UPWARD: set[tuple[str, str]] = set()  # none left; a new one must be argued for here


def _unit(module: str) -> str:
    """``training.data`` -> ``training``; ``config`` -> ``config``."""
    return module.split(".")[0]


def _imports() -> dict[str, set[str]]:
    """module (dotted, below sft_optuna) -> the sft_optuna modules it imports, at any depth of the file."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sft_optuna"):
                base = node.module.removeprefix("sft_optuna").lstrip(".")
                if base:
                    targets.add(base)
                else:  # from sft_optuna import attrs
                    targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(
                    a.name.removeprefix("sft_optuna.") for a in node.names if a.name.startswith("sft_optuna.")
                )
        found[name] = targets
    return found


def test_every_module_has_a_layer() -> None:
    assert {_unit(m) for m in _imports()} - {"__init__"} <= set(LAYERS)


def test_imports_point_down_only() -> None:
    upward = [
        (module, target)
        for module, targets in _imports().items()
        for target in targets
        if module != "__init__"
        and LAYERS[_unit(target)] > LAYERS[_unit(module)]
        and (module, target) not in ALLOWED_UPWARD
    ]
    assert upward == []


def test_no_two_units_import_each_other_and_nothing_imports_the_cli() -> None:
    edges = {(_unit(m), _unit(t)) for m, ts in _imports().items() for t in ts if _unit(m) != _unit(t)}
    allowed = {(_unit(a), _unit(b)) for a, b in ALLOWED_UPWARD}
    assert {(a, b) for a, b in edges if (b, a) in edges} - allowed - {(b, a) for a, b in allowed} == set()
    assert [m for m, ts in _imports().items() if "cli" in ts and m != "__main__"] == []


def test_training_imports_nothing_but_config_and_errors_and_no_optuna() -> None:
    for path in (PACKAGE / "training").glob("*.py"):
        text = path.read_text()
        assert "import optuna" not in text and "from optuna" not in text, path.name
    targets = {t for m, ts in _imports().items() if m.startswith("training") for t in ts}
    assert {_unit(t) for t in targets} <= {"training", "config", "errors"}, targets
