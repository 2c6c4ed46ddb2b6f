"""The user's path from an installed wheel: configs by name from any directory, quiet output.

The wheel is built from this repository (``pip wheel --no-deps .``) and unpacked into a
directory put first on ``PYTHONPATH``, so the subprocesses below import the installed copy (not
this checkout) and run from a temporary directory, as a user after ``pip install`` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), REPO],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel unpacked as site-packages would hold it; returns the subprocess env."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # one device, as a user's machine
    env["PYTHONPATH"] = str(site)
    env["HF_HUB_OFFLINE"] = "1"
    return env, str(site)


def test_wheel_holds_the_configs_and_py_typed(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ("base2new", "fewshot", "xdomain", "adapt", "common"):
        assert f"jaxprompt/configs/{cfg}.py" in names, sorted(names)[:20]
    assert "jaxprompt/py.typed" in names
    assert "jaxprompt/assets/toy_clip/flax_model.msgpack" in names
    # The CLIP BPE vocabulary (OpenAI checkpoints carry no tokenizer) and its MIT notice.
    assert "jaxprompt/assets/bpe_simple_vocab_16e6.txt.gz" in names
    assert "jaxprompt/assets/bpe_simple_vocab_16e6.LICENSE.txt" in names
    # The published numbers `jaxprompt reproduce` and `table` set beside ours.
    assert "jaxprompt/assets/published.json" in names
    for module in ("app/experiment.py", "app/rundir.py", "app/reproduce.py", "app/table.py",
                   "side/toyclip.py", "testing.py"):  # fmt: skip
        assert f"jaxprompt/{module}" in names


def _jaxprompt(env, cwd, *args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "jaxprompt", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_installed_cli_trains_from_another_directory_with_short_config_names(
    installed, tiny_clip_dir, tmp_path
):
    env, site = installed
    where = subprocess.run(
        [sys.executable, "-c", "import jaxprompt; print(jaxprompt.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert where.stdout.strip().startswith(site), where.stdout  # the installed copy

    help_ = _jaxprompt(env, tmp_path, "train", "--help", timeout=120)
    assert help_.returncode == 0 and "promptsrc" in help_.stdout

    train = _jaxprompt(
        env, tmp_path, "train", "--config", "base2new:coop,dataset=toy_textures,runlocal=true",
        f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=2",
        "--config.log_every=1", "--workdir", "runs/demo",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    # Progress: step lines with rate and time left, then the evaluations and results.
    steps = [ln for ln in train.stderr.splitlines() if " step " in ln and "eta" in ln]
    assert steps and "ex/s" in steps[-1], train.stderr[-3000:]
    assert "results:" in train.stderr
    run = tmp_path / "runs" / "demo"
    res = json.loads((run / "results.json").read_text())
    assert set(res["accuracy"]) == {"base", "new", "hm"}
    assert " - " not in (run / "results.md").read_text()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))

    # Evaluation: its accuracies, not pages of orbax and tensorstore logging.
    ev = _jaxprompt(env, tmp_path, "eval", "--workdir", "runs/demo")
    assert ev.returncode == 0, ev.stderr[-3000:]
    lines = (ev.stdout + ev.stderr).splitlines()
    assert len(lines) < 40, "\n".join(lines)
    assert any("top-1" in ln for ln in lines)
