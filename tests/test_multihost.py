"""Multi-host training: two ``jax.distributed`` processes on this machine equal one process.

Two subprocesses (4 simulated CPU devices each, gloo collectives, coordinator on localhost) run
``tests/multihost_worker.py``: each joins the job, feeds only its half of every global batch and
trains CoOp on the tiny CLIP with ``jaxprompt.train.fit`` into one shared run directory. The
result must equal the same training in this pytest process on 8 devices, and the shared run
directory must hold each checkpoint and each metrics line once.

Also here: the text tower split over the ``model`` mesh axis on the class axis (1000 classes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_worker as worker  # noqa: E402

TIMEOUT = 600  # seconds for the two-process job (about 40 s on 2 busy CPU cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(
    clip_dir: str, workdir: str, out: str, opts: tuple[str, str] = ("", "")
) -> tuple[list[str], float]:
    """Starts both processes (``opts[i]``: process i's ``key=value`` options), waits for them,
    and returns their output and the wall time. A failure shows each host's barrier sequence."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    procs = []
    t0 = time.perf_counter()
    for pid in range(2):
        cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py"), clip_dir, workdir, out]
        cmd += [str(pid), "2", str(port), "4", *opts[pid].split()]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        report = []
        for pid, (p, log) in enumerate(zip(procs, logs, strict=True)):
            barriers = [ln[8:] for ln in log.splitlines() if ln.startswith("barrier ")]
            tail = "\n".join(log.splitlines()[-25:])
            report.append(
                f"--- process {pid} ({opts[pid] or 'no delay'}) exited with {p.returncode}; "
                f"barriers passed: {barriers}\n{tail}"
            )
        pytest.fail("\n".join(report), pytrace=False)
    return logs, time.perf_counter() - t0


def _check_shared_run_directory(workdir, prompt) -> None:
    """Checkpoints written once and readable, one metrics line a step."""
    from jaxprompt import checkpoint

    assert checkpoint.latest_step(workdir) == worker.STEPS
    saved, meta = checkpoint.load_prompt(workdir)
    np.testing.assert_allclose(saved["ctx"], prompt, atol=0)
    assert meta["method"] == "coop"
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, worker.STEPS + 1))


@pytest.fixture(scope="module")
def one_process(tiny_clip_dir, tmp_path_factory):
    """The reference: the same training in this pytest process on 8 devices."""
    from jaxprompt import checkpoint

    assert jax.device_count() == 8 and jax.process_count() == 1
    workdir = tmp_path_factory.mktemp("one")
    one = worker.train_and_evaluate(tiny_clip_dir, str(workdir))
    assert not np.allclose(one["ctx"], checkpoint.load_prompt(workdir, step=2)[0]["ctx"])
    return one


def _assert_same_as_one(two, one) -> float:
    # Same prompt after STEPS steps of data-parallel SGD on the same global batches.
    assert two["ctx"].shape == one["ctx"].shape == (4, 32)
    diff = float(np.max(np.abs(two["ctx"] - one["ctx"])))
    assert diff <= 1e-5, diff
    # Evaluation: every host's eval rows were counted exactly once.
    assert int(two["n"]) == int(one["n"]) == worker.EVAL_BATCHES * worker.GLOBAL_BATCH
    assert float(two["top1"]) == pytest.approx(float(one["top1"]))
    return diff


@pytest.mark.slow
def test_two_processes_train_the_same_prompt_as_one_with_a_late_host(
    tiny_clip_dir, tmp_path, one_process
):
    """Process 1 joins training 3 s late: process 0 has made the checkpoint directory by then
    (a pod with one slow host); both must still pass the same barriers and agree."""
    out = str(tmp_path / "two.npz")
    workdir = tmp_path / "two"
    logs, seconds = _run_two_processes(tiny_clip_dir, str(workdir), out, ("", "start_delay=3"))
    assert "process 0/2 done" in logs[0] and "process 1/2 done" in logs[1]
    two = np.load(out)
    diff = _assert_same_as_one(two, one_process)
    _check_shared_run_directory(workdir, two["ctx"])
    print(f"two processes: {seconds:.1f}s, max |ctx diff| {diff:.2e}")


@pytest.mark.slow
def test_two_processes_resume_a_shared_run_with_either_host_late(
    tiny_clip_dir, tmp_path, one_process
):
    """Half the steps with process 0 late (at start and at the checkpointer), then the rest,
    resumed from the shared run directory with process 1 late at the checkpointer: the result
    equals the uninterrupted one-process run."""
    from jaxprompt import checkpoint

    out = str(tmp_path / "two.npz")
    workdir = tmp_path / "two"
    half = worker.STEPS // 2
    first = (f"steps={half} start_delay=2 checkpointer_delay=2", f"steps={half}")
    _run_two_processes(tiny_clip_dir, str(workdir), out, first)
    assert checkpoint.latest_step(workdir) == half
    _run_two_processes(tiny_clip_dir, str(workdir), out, ("", "checkpointer_delay=3"))
    two = np.load(out)
    _assert_same_as_one(two, one_process)
    _check_shared_run_directory(workdir, two["ctx"])


# ------------------------------------------------------------------------------------------------
# Large label spaces: the text tower split over "model" on the class axis
# ------------------------------------------------------------------------------------------------


def test_text_tower_split_over_the_model_axis_on_classes(tiny_clip):
    """1000 class prompts on a (data=2, model=4) mesh: same features, a quarter per device."""
    from jaxprompt import clip as clip_lib
    from jaxprompt import sharding

    n_cls, length = 1000, 8
    width = tiny_clip.params["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[1]
    r = np.random.RandomState(0)
    embeds = (0.02 * r.randn(n_cls, length, width)).astype(np.float32)
    eot = r.randint(1, length, n_cls).astype(np.int32)
    ref = np.asarray(jax.jit(clip_lib.encode_text)(tiny_clip, embeds, eot))

    def encode(mesh):
        def f(clip, e, t):
            e = sharding.constrain_classes(e, mesh)
            return sharding.constrain_classes(clip_lib.encode_text(clip, e, t), mesh)

        return jax.jit(f)

    mesh = sharding.make_mesh(data=2, model=4)
    clip = sharding.shard_clip(tiny_clip, mesh)  # weights FSDP-split over "model" as well
    fn = encode(mesh)
    out = fn(clip, embeds, eot)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    assert out.sharding.spec[0] == "model"
    assert {s.data.shape for s in out.addressable_shards} == {(n_cls // 4, ref.shape[1])}
    # Inside the tower every device holds a quarter of the classes' activations.
    hlo = fn.lower(clip, embeds, eot).compile().as_text()
    assert f"f32[{n_cls // 4},{length},{width}]" in hlo
    assert f"f32[{n_cls},{length},{width}]" not in hlo

    # With the mesh set as context, methods can call it without a mesh argument.
    with jax.set_mesh(mesh):
        out2 = encode(None)(clip, embeds, eot)
    assert out2.sharding.spec[0] == "model"
    np.testing.assert_allclose(np.asarray(out2), ref, atol=1e-5)
    # No model axis (or model == 1): nothing changes.
    x = np.ones((3, 2), np.float32)
    assert sharding.constrain_classes(x) is x
    assert sharding.constrain_classes(x, sharding.make_mesh()) is x
