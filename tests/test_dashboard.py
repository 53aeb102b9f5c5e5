"""The dashboard: notes on trials, read-only and basic auth, and the real page rendered in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import PYTHON, study_dict, worker_env

from sft_optuna.cli import main
from sft_optuna.results.dashboard import is_loopback


@pytest.fixture(scope="module")
def finished(folder_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{tmp / 'studies.db'}"
    path = tmp / "dash-study.yaml"
    path.write_text(yaml.safe_dump(study_dict(folder_root, name="dash-study", budget={"n_trials": 3})))
    assert main(["--storage", url, "run", str(path), "--device", "cpu", "--checkpoint-dir", "none"]) == 0
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(url: str, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [PYTHON, "-m", "sft_optuna", "--storage", url, "dashboard", "--port", str(port), *extra],
        env=env or worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/api/studies", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 with auth): up
        except OSError:
            time.sleep(0.3)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def dashboard(finished: str) -> Iterator[str]:
    yield from _serve(finished)


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_trials_carry_notes_and_the_best_trial_a_confusion_matrix(finished: str) -> None:
    from optuna_dashboard import get_note

    study = optuna.load_study(study_name="dash-study", storage=finished)
    assert "Created by sft-optuna" in get_note(study)
    # optuna-dashboard keeps notes and figures in the study's system attributes
    system = study._storage.get_study_system_attrs(study._study_id)
    trial_notes = [v for k, v in system.items() if "note" in k.lower()]
    assert trial_notes, "notes are stored in the study's system attributes"
    text = json.dumps(system)
    assert "COMPLETE" in text and "ran on:" in text and "images/s" in text
    assert any("best-trial-confusion-matrix" in k for k in system), list(system)[:10]
    # the study's progress table, in one attribute (whole or not at all), with the epochs its trials trained
    progress = [v for k, v in system.items() if "study-progress" in k]
    assert len(progress) == 1, "one attribute: concurrent writers replace it whole"
    table = json.loads(progress[0])["data"][0]
    assert table["cells"]["values"][0][0] == "epochs"
    trained = sum(len(t.intermediate_values) for t in study.trials)
    assert table["cells"]["values"][1][0].startswith(f"{trained} trained"), table["cells"]
    assert "after 3 finished trials" in table["header"]["values"][1]
    best = study.best_trial
    matrix = best.user_attrs["confusion_matrix"]
    assert sum(map(sum, matrix)) == 40  # every validation image once
    assert sum(matrix[i][i] for i in range(len(matrix))) / 40 == pytest.approx(best.value)


def test_api_answers_and_is_read_only_on_request(finished: str) -> None:
    for base in _serve(finished, "--read-only"):
        status, body = _request(base + "/api/studies")
        assert status == 200 and "dash-study" in body.decode()
        status, _ = _request(base + "/api/studies/1", method="DELETE")
        assert status == 403
    assert optuna.get_all_study_names(finished) == ["dash-study"], "nothing was deleted"


def test_basic_auth_password_comes_from_the_environment(finished: str) -> None:
    env = worker_env(SFT_OPTUNA_DASHBOARD_PASSWORD="s3cret")
    for base in _serve(finished, env=env):
        assert _request(base + "/api/studies")[0] == 401
        token = base64.b64encode(b"sft:s3cret").decode()
        assert _request(base + "/api/studies", headers={"Authorization": f"Basic {token}"})[0] == 200
        wrong = base64.b64encode(b"sft:guess").decode()
        assert _request(base + "/api/studies", headers={"Authorization": f"Basic {wrong}"})[0] == 401


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_dashboard_renders_the_study_and_its_trials_in_headless_chromium(dashboard: str, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is not installed (run tests/services.sh)")
        pytest.skip("no Chromium (run tests/services.sh as root)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--virtual-time-budget=15000",
    ]

    def dump(path: str) -> str:
        return subprocess.run(
            [browser, *flags, "--dump-dom", dashboard + path], capture_output=True, text=True, timeout=120
        ).stdout

    assert "dash-study" in dump("/dashboard")
    # What the trials page must show for this study: its 3 trials, each complete, one marked best, its note.
    # (Before: `"Trial 0" in dom or "#0" in dom`, which an empty study passes through the CSS colour #0096ff.)
    trials_dom = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", _strip_code(dump("/dashboard/studies/1/trials"))))
    assert "3 Trials" in trials_dom
    for number in range(3):
        assert f"Trial {number} Complete" in trials_dom
    assert "Best Trial" in trials_dom and "Parameter lr" in trials_dom and "ran on:" in trials_dom
    # The study page plots a point per trial in its history chart (an unknown study: none, and no name).
    study_dom = dump("/dashboard/studies/1")
    assert "dash-study" in study_dom and study_dom.count('class="point"') >= 3
    assert "study progress (sft-optuna)" in study_dom and "trained or planned" in study_dom
    missing = dump("/dashboard/studies/99")
    assert "dash-study" not in missing and 'class="point"' not in missing
    shot = Path(os.environ.get("SFT_TEST_ARTIFACTS", tmp_path)) / "dashboard-study.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [browser, *flags, "--window-size=1400,900", f"--screenshot={shot}", dashboard + "/dashboard/studies/1"],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1400, 900)


def _strip_code(html: str) -> str:
    """The page without its <style> and <script> blocks (their text is not what a person reads)."""
    return re.sub(r"<(style|script)\b.*?</\1>", " ", html, flags=re.S)
