"""The docs stay true: the study-file reference is generated from the code and current, every link and every
file the docs name exists, every command the README shows parses, its study file is valid, and the result files
are the ones the docs cite, small."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a path the docs name in backticks: under one of the repository's folders, or a module of the package
# (``coordination/claims.py``); a bare file name (``best.yaml``, an output) is not a path
NAMED = re.compile(r"`((?:sft_optuna|tests|benchmarks|studies|deploy|docs|\.ci)/[\w./-]*|\w+/[\w/]*\.(?:py|yaml|sh))`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _reference() -> Any:
    spec = importlib.util.spec_from_file_location("reference", REPO / "docs" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_study_file_reference_is_generated_from_the_code_and_current() -> None:
    page = (REPO / "docs" / "study-file.md").read_text()
    assert page == _reference().render(), "docs/study-file.md is stale: run python docs/reference.py"
    from sft_optuna.config import BOUNDS

    for key, bound in BOUNDS.items():  # every range the checks enforce is on the page, with its key
        assert f"| `{key}` |" in page and bound.describe() in page, key
    for study in (REPO / "studies").glob("*.yaml"):
        assert f"](../studies/{study.name})" in page, f"{study.name} is not linked from the reference"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_and_named_path_in_the_docs_exists(page: Path) -> None:
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(f"link {target}")
    for name in NAMED.findall(text):
        if any(c in name for c in "<>*$~") or name.endswith("/…"):
            continue  # a placeholder (ROOT/train/<class>/*.jpg), not a file of the repository
        candidates = [REPO / name, REPO / "sft_optuna" / name, REPO / "sft_optuna" / "coordination" / name]
        if not any(c.exists() for c in candidates):
            missing.append(f"path {name}")
    assert missing == [], f"{page.name} names what does not exist: {missing}"


def _readme_commands() -> list[list[str]]:
    """``sft-optuna ...`` commands in the README's shell blocks, one argv each (comments and chains cut)."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words and words[0] == "sft-optuna":
                    out.append(words[1:])
    return out


def test_every_command_the_readme_shows_parses_and_each_subcommand_has_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sft_optuna.cli import build_parser

    parser = build_parser()
    commands = _readme_commands()
    assert len(commands) >= 6, commands
    for argv in commands:
        args = parser.parse_args(argv)  # a wrong flag or subcommand exits 2 here
        assert args.command == argv[0]
    text = (REPO / "README.md").read_text()
    named = set(re.findall(r"`(?:sft-optuna )?([a-z]+) (?:NAME|FILE|--)", text)) | {argv[0] for argv in commands}
    subcommands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert named & subcommands, named
    for sub in sorted(named & subcommands):
        with pytest.raises(SystemExit) as done:
            parser.parse_args([sub, "--help"])
        assert done.value.code == 0, sub
    capsys.readouterr()


def test_the_readmes_study_file_is_a_valid_study() -> None:
    from sft_optuna.study_file import check_models, parse_study

    text = (REPO / "README.md").read_text()
    block = re.search(r"## A study file\n\n```yaml\n(.*?)```", text, re.S)
    assert block is not None
    config = parse_study(yaml.safe_load(block.group(1)), "README.md")
    check_models(config, "README.md")
    assert config.search_space


def test_the_readme_reads_in_five_minutes() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 125


def test_the_result_files_are_the_ones_the_docs_cite_and_small() -> None:
    cited = "\n".join(p.read_text() for p in PAGES)
    results = [p for p in (REPO / "benchmarks" / "results").rglob("*") if p.is_file()]
    uncited = [str(p.relative_to(REPO)) for p in results if str(p.relative_to(REPO)) not in cited]
    assert uncited == [], f"result files no page cites (git history keeps old ones): {uncited}"
    images = [p for p in (REPO / "docs").glob("*.png")]
    assert [p.name for p in images if f"{p.name}" not in cited] == []
    total = sum(p.stat().st_size for p in [*results, *images])
    assert total < 2.5 * 2**20, f"benchmarks/results and docs/*.png hold {total / 2**20:.1f} MiB"
