"""Reliability trials through the installed console script, run from a temp directory as a user
runs it: kill -9 at ten random moments of a training run, an online TPT run and a sweep, each
then resumed to the end, gives the uninterrupted run's results bit for bit, with each step
logged once; a run whose newest checkpoint is damaged falls back to the previous one.

One chain of kills per trial: start, wait until the run has saved something new, kill it at a
random moment (seeded: the trial is reproducible) within about one save interval after that,
start again, ... ten times, then let it finish. The processes share a persistent compilation
cache (conftest's directory), so a restart costs the imports and reading the cache, not XLA.
"""

import glob
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE

SCRIPT = os.path.join(os.path.dirname(sys.executable), "jaxprompt")  # the installed command
KILLS = 10
# Few-shot CoOp on the toy world and its shipped CLIP: 4 steps an epoch (16 classes x 2 shots,
# batch 8 on one device), a checkpoint every epoch. The first process sees two new checkpoints,
# each later one one or two (kill_chain), so 30 checkpoints leave room for all ten kills.
TRAIN = ["fewshot:coop,dataset=toy_textures,runlocal=true", "--config.optim.epochs=30"]
TRAIN_STEPS = 120
# Online TPT (each image starts from the prompt the previous one ended with) on 64 test images,
# 2 a batch, progress saved after every batch (runlocal's save_every=1); 8 views, 2 kept,
# without AugMix, so a batch takes a fraction of a second.
TPT = [
    "adapt:tpt,dataset=toy_textures,runlocal=true,online=true,limit=64,batch_size=2",
    "--config.method.views=8", "--config.method.keep=0.25", "--config.data.augmix=false",
]  # fmt: skip
# A sweep of two seeds, each run 12 epochs: 24 checkpoints and 2 finished runs to kill after.
SWEEP = [
    "--config", "fewshot:coop,runlocal=true", "--datasets", "toy_textures", "--seeds", "1,2",
    "--config.optim.epochs=12",
]  # fmt: skip


@pytest.fixture(scope="module")
def env():
    import jax

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    assert cache, "conftest sets a session compilation cache for the subprocesses"
    settings = {
        "JAX_COMPILATION_CACHE_DIR": cache,
        # Cache every program, however quick to compile or small: the restarts need them all.
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    for name in settings:  # the names this jax reads (a renamed option would be ignored)
        assert hasattr(jax.config, name.lower()), name
    return {**os.environ, **settings, "XLA_FLAGS": FAST_COMPILE}  # one device, as a user's


def _newest_checkpoint(run):
    names = [os.path.basename(p) for p in glob.glob(os.path.join(run, "checkpoints", "*"))]
    return max((int(n) for n in names if n.isdigit()), default=-1)  # not a save in progress


def _tpt_batches(run):
    try:
        with open(os.path.join(run, "progress.json")) as f:
            return json.load(f)["batches"]
    except (OSError, ValueError):  # none yet (or a finished run)
        return -1


def _sweep_saves(root):
    """Every checkpoint and finished run under the sweep's root."""
    names = glob.glob(os.path.join(root, "**", "checkpoints", "*"), recursive=True)
    names = [n for n in names if os.path.basename(n).isdigit()]  # not a save in progress
    return sorted(names + glob.glob(os.path.join(root, "**", "results.json"), recursive=True))


class Timer:
    """Wall time and the CPU time of the finished child processes (the latter hardly depends on
    what else the machine runs, so it says what an idle machine would take)."""

    def __init__(self):
        self.wall, self.cpu = time.monotonic(), self._children()

    @staticmethod
    def _children():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def __str__(self):
        return (f"{time.monotonic() - self.wall:.1f} s wall, "
                f"{self._children() - self.cpu:.1f} s CPU of its processes")  # fmt: skip


def _tail(path, n=3000):
    with open(path) as f:
        return f.read()[-n:]


def _wait_for_change(p, log_path, saved, before):
    """Polls ``saved()`` until it differs from ``before`` -> ``(value, time)``; the process
    must stay alive meanwhile."""
    deadline = time.monotonic() + 300
    while (now := saved()) == before:
        assert p.poll() is None, f"{log_path}: exit {p.returncode}\n{_tail(log_path)}"
        assert time.monotonic() < deadline, f"{log_path}: nothing saved in 300 s"
        time.sleep(0.01)
    return now, time.monotonic()


def kill_chain(cmd, cwd, env, saved, *, seed, resumed):
    """Starts ``cmd`` and kills it (SIGKILL) KILLS times, each at a random moment after it has
    saved something new (``saved()`` changed); then runs it to the end. Every process after
    the first must say one of ``resumed`` (it found the previous one's saves).

    The moment is uniform over one save interval after the new save (measured by the first
    process, between its second and third saves), so kills land anywhere between two saves,
    in the middle of writing one too, and each process moves the run on by one or two saves
    whatever the machine's speed."""
    rng = random.Random(seed)
    interval = None
    for i in range(KILLS):
        log_path = os.path.join(cwd, f"attempt{i}.log")
        with open(log_path, "w") as log:
            p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=log)
            try:
                now, t = _wait_for_change(p, log_path, saved, saved())
                if interval is None:
                    # The gap between the second and third saves: the first ones include
                    # compiling (an online TPT run's first gap was many times its later ones,
                    # and the run ended inside one such "interval" on an idle machine).
                    now, t = _wait_for_change(p, log_path, saved, now)
                    interval = _wait_for_change(p, log_path, saved, now)[1] - t
                time.sleep(rng.uniform(0.0, interval))
                assert p.poll() is None, f"attempt {i} finished before its kill: lengthen the run"
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert p.returncode == -signal.SIGKILL
        if i:
            text = _tail(log_path, 10**6)
            assert any(r in text for r in resumed), f"attempt {i} did not resume:\n{text[-2000:]}"
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    # The last kill may land after the results were written: the run is then finished.
    assert out.returncode == 0, out.stderr[-3000:]


def _train_steps(run):
    """The training records of metrics.jsonl, step by step, without the timings."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [
        {k: v for k, v in r.items() if not k.endswith("_per_sec")} for r in records if "loss" in r
    ]


def _assert_same_run(run, ref):
    """Bit-identical prompt, the same accuracies, and each step logged once with the same
    values as the uninterrupted run."""
    from jaxprompt import checkpoint

    got, want = checkpoint.load_prompt(run)[0], checkpoint.load_prompt(ref)[0]
    assert got.keys() == want.keys() == {"ctx"}
    np.testing.assert_array_equal(got["ctx"], want["ctx"])
    with open(os.path.join(run, "results.json")) as f, open(os.path.join(ref, "results.json")) as g:
        assert json.load(f)["accuracy"] == json.load(g)["accuracy"]
    steps, ref_steps = _train_steps(run), _train_steps(ref)
    assert [r["step"] for r in steps] == list(range(1, len(ref_steps) + 1))
    assert steps == ref_steps


def _start_reference(cmd, cwd, env):
    """The uninterrupted run, started beside the chain (the two overlap in time)."""
    os.makedirs(cwd, exist_ok=True)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _finish(p):
    err = p.communicate(timeout=600)[1]
    assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def train_reference(env, tmp_path_factory):
    """An uninterrupted training run (shared by the kill trial and the damaged-checkpoint one)."""
    d = tmp_path_factory.mktemp("train_ref")
    subprocess.run(
        [SCRIPT, "train", "--config", *TRAIN, "--workdir", "run"],
        cwd=d, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return str(d / "run")


@pytest.mark.slow
def test_training_killed_ten_times_resumes_bit_identical(env, tmp_path, train_reference):
    t0 = Timer()
    run = str(tmp_path / "run")
    cmd = [SCRIPT, "train", "--config", *TRAIN, "--workdir", "run"]
    newest = lambda: _newest_checkpoint(run)  # noqa: E731
    kill_chain(cmd, tmp_path, env, newest, seed=1, resumed=["resumed from"])
    _assert_same_run(run, train_reference)
    print(f"training trial: {t0}")


@pytest.mark.slow
def test_online_tpt_killed_ten_times_resumes_bit_identical(env, tmp_path):
    t0 = Timer()
    cmd = [SCRIPT, "adapt", "--config", *TPT, "--workdir", "run"]
    ref = _start_reference(cmd, tmp_path / "ref", env)
    batches = lambda: _tpt_batches(tmp_path / "run")  # noqa: E731
    kill_chain(cmd, tmp_path, env, batches, seed=2, resumed=["resuming at batch"])
    _finish(ref)
    run, ref_run = tmp_path / "run", tmp_path / "ref" / "run"
    # The carry is the prompt the last test image ended with: every image's update is in it.
    with np.load(run / "carry.npz") as got, np.load(ref_run / "carry.npz") as want:
        assert got.files == want.files and int(got["batches"]) == 32
        for k in got.files:
            np.testing.assert_array_equal(got[k], want[k])
    results = json.loads((run / "results.json").read_text())
    ref_results = json.loads((ref_run / "results.json").read_text())
    assert results["accuracy"] == ref_results["accuracy"] and results["n"] == 64
    assert not (run / "progress.json").exists() and not (run / "carry.npz.next").exists()
    print(f"TPT trial: {t0}")


@pytest.mark.slow
def test_sweep_killed_ten_times_resumes_bit_identical(env, tmp_path):
    t0 = Timer()
    cmd = [SCRIPT, "sweep", *SWEEP, "--root", "sweep"]
    ref = _start_reference(cmd, tmp_path / "ref", env)
    root = str(tmp_path / "sweep")
    # A kill just after a run's results: the next process skips it and starts the next run.
    resumed = ["resumed from", "exists: skipping"]
    kill_chain(cmd, tmp_path, env, lambda: _sweep_saves(root), seed=3, resumed=resumed)
    _finish(ref)
    runs = sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True))
    assert len(runs) == 2
    for results in runs:
        run = os.path.dirname(results)
        _assert_same_run(run, os.path.join(tmp_path, "ref", os.path.relpath(run, tmp_path)))
    summary = glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)
    assert len(summary) == 1
    ref_summary = os.path.join(tmp_path, "ref", os.path.relpath(summary[0], tmp_path))
    with open(summary[0]) as f, open(ref_summary) as g:
        got = json.load(f)
        assert got == json.load(g) and len(got["runs"]) == 2  # no timings in it: all equal
    print(f"sweep trial: {t0}")


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_with_one_warning(env, tmp_path, train_reference):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(train_reference, run)
    for name in ("results.json", "results.md", "results.png"):
        (run / name).unlink()  # an interrupted run: its newest checkpoint is the last step's
    newest = run / "checkpoints" / str(TRAIN_STEPS)
    previous = TRAIN_STEPS - 4
    assert (run / "checkpoints" / str(previous)).is_dir()
    for root, _, files in os.walk(newest / "state"):
        for name in files:  # every array file cut short: a half-copied or damaged checkpoint
            with open(os.path.join(root, name), "r+b") as fh:
                fh.truncate(3)
    cmd = [SCRIPT, "train", "--config", *TRAIN, "--workdir", "run"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    warned = [ln for ln in lines if "unreadable" in ln and "resumed" not in ln]
    assert len(warned) == 1, out.stderr[-3000:]
    assert f"checkpoints/{TRAIN_STEPS} is unreadable" in warned[0]
    assert "falling back to the previous one" in warned[0]
    assert "Traceback" not in out.stderr and "Event loop" not in out.stderr
    resumed = [ln for ln in lines if "resumed from" in ln]
    assert len(resumed) == 1 and f"at step {previous} " in resumed[0], resumed
    # The damaged checkpoint is kept aside, and the run saved its last step again.
    assert (run / "checkpoints_unreadable" / str(TRAIN_STEPS)).is_dir()
    _assert_same_run(str(run), train_reference)

    # Every checkpoint damaged: one line naming the fix, exit 2.
    shutil.rmtree(run)
    shutil.copytree(train_reference, run)
    (run / "results.json").unlink()
    for root, _, files in os.walk(run / "checkpoints"):
        for name in files:
            if "ocdbt.process_0" in root:
                with open(os.path.join(root, name), "r+b") as fh:
                    fh.truncate(3)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxprompt: error: no readable checkpoint in ") and last.endswith(
        "move that directory away to start the run again"
    ), last


def test_online_tpt_resumes_from_the_carry_its_progress_file_names(tmp_path):
    """A kill between the carry's save and the progress file leaves the new carry beside the old
    one (``carry.npz.next``); resume takes whichever is from the progress file's batch."""
    from jaxprompt.app import experiment, tpt

    path = str(tmp_path / tpt.CARRY)
    like = {"ctx": np.zeros((2, 3), np.float32)}
    tpt.save_carry(path, {"ctx": np.full((2, 3), 3.0, np.float32)}, None, 3)
    tpt.save_carry(path + tpt.NEXT, {"ctx": np.full((2, 3), 4.0, np.float32)}, None, 4)
    for batches in (3, 4):  # killed before / after the progress file of batch 4 was written
        prompt, state = tpt.resume_carry(path, like, None, batches)
        assert state is None and np.all(np.asarray(prompt["ctx"]) == batches)
    with pytest.raises(experiment.ConfigError, match=r"from batch 4; .* from batch 3 but"):
        tpt.resume_carry(path, like, None, 5)
