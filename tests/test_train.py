"""Trainer tests: Dassl schedule values, coupled weight decay, the step's keys, fit, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprompt import checkpoint, schedules, train
from jaxprompt.methods.base import PromptMethod

HERE = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------------------------------------------------
# Schedule: numbers from specs/promptsrc.md sec. 6, written as literals.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "epochs,epoch,expected",
    [
        (20, 1, "0.00001"),
        (20, 2, ".0025"),
        (20, 5, ".002364"),
        (20, 10, ".001636"),
        (20, 12, ".00125"),
        (20, 15, ".000683"),
        (20, 17, ".000366"),
        (20, 20, ".0000611"),
        (50, 2, ".0025"),
        (50, 27, ".00125"),
        (50, 50, ".0000099"),
    ],
)
def test_dassl_schedule_spec_values(epochs, epoch, expected):
    # The spec prints 3-4 digits, some rounded (e5 .002364 for .0023638), some truncated
    # (e20 .0000611 for .00006118): agree to one unit of the last printed decimal.
    tol = 10.0 ** -len(expected.split(".")[1])
    ipe = 7
    s = schedules.dassl_cosine(0.0025, epochs=epochs, iters_per_epoch=ipe)
    # Every step of the epoch has the same rate (stepped per epoch, not per iteration).
    for count in ((epoch - 1) * ipe, (epoch - 1) * ipe + 3, epoch * ipe - 1):
        assert abs(float(s(count)) - float(expected)) <= tol * 1.0001


def test_dassl_schedule_matches_formula_every_epoch():
    n, ipe = 20, 3
    s = schedules.dassl_cosine(0.002, epochs=n, iters_per_epoch=ipe)
    got = np.array([float(s(c)) for c in range(n * ipe)])
    want = np.repeat(
        [1e-5] + [0.002 * 0.5 * (1 + math.cos(math.pi * (e - 2) / n)) for e in range(2, n + 1)],
        ipe,
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[-1] > 0  # the cosine count restarts after warm-up: never reaches 0


def test_make_optimizer_is_torch_sgd_with_coupled_decay():
    """Against PyTorch's SGD update, written out in numpy: buf = m*buf + g + wd*p; p -= lr*buf."""
    lr, wd, mom, ipe = 0.1, 0.05, 0.9, 2
    tx = train.make_optimizer(lr, epochs=3, iters_per_epoch=ipe, weight_decay=wd, warmup_lr=0.01)
    p = {"ctx": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(p)
    rates = [0.01, 0.01, 0.1, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 3))] * 1
    p_np, buf = np.array([1.0, -2.0, 3.0]), np.zeros(3)
    rng = np.random.RandomState(0)
    for t in range(5):
        g = rng.randn(3)
        updates, state = tx.update({"ctx": jnp.asarray(g, jnp.float32)}, state, p)
        p = optax.apply_updates(p, updates)
        d = g + wd * p_np
        buf = d if t == 0 else mom * buf + d
        p_np = p_np - rates[t] * buf
        np.testing.assert_allclose(np.asarray(p["ctx"]), p_np, rtol=1e-5, atol=1e-6)


def test_group_lrs_partition():
    tx = train.make_optimizer(1e-3, momentum=0.0, weight_decay=0.0, group_lrs={"logit_scale": 5e-7})
    p = {"ctx": jnp.ones((2, 3)), "logit_scale": jnp.ones(())}
    g = jax.tree.map(jnp.ones_like, p)
    updates, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(updates["ctx"], -1e-3 * np.ones((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(updates["logit_scale"], -5e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# A fixed-logit fake method (scenic's habit): fast to compile, exact to reason about.
# ------------------------------------------------------------------------------------------------

D, C = 12, 3


def linear_method(noise: float = 0.0) -> PromptMethod:
    """logits = flatten(images)[:, :D] @ w; the loss adds ``noise * sum(w * N(key))``."""

    def init(key, clip, task):
        del clip, task
        return {"w": 0.1 * jax.random.normal(key, (D, C), jnp.float32)}

    def logits(prompt, clip, task, images, *, key=None):
        del clip, task, key
        return images.reshape(images.shape[0], -1)[:, :D] @ prompt["w"]

    def loss(prompt, clip, task, batch, key):
        lg = logits(prompt, clip, task, batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, batch["label"]).mean()
        extra = noise * jnp.sum(prompt["w"] * jax.random.normal(key, prompt["w"].shape))
        return ce + extra, {"ce": ce}

    return PromptMethod(init=init, logits=logits, loss=loss, name="linear", config={})


FAKE_CLIP = {"params": np.zeros((4,), np.float32)}
FAKE_TASK = {"token_ids": np.zeros((C, 2), np.int32)}


class Batches:
    """Deterministic batch stream with grain-style position."""

    def __init__(self, n: int = 8):
        self.i, self.n = 0, n

    def __iter__(self):
        return self

    def __next__(self):
        r = np.random.RandomState(self.i)
        self.i += 1
        return {
            "image": r.randn(self.n, 2, 2, 3).astype(np.float32),
            "label": r.randint(0, C, self.n).astype(np.int32),
        }

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


class Agg(NamedTuple):
    init: Any
    update: Any
    result: Any


def mean_of_epoch_ends() -> Agg:
    """Mean of the epoch-end prompts; also counts the epoch numbers it saw."""
    return Agg(
        init=lambda p: {
            "sum": jax.tree.map(jnp.zeros_like, p),
            "epochs": jnp.zeros((), jnp.int32),
            "n": jnp.zeros((), jnp.int32),
        },
        update=lambda s, p, e: {
            "sum": jax.tree.map(jnp.add, s["sum"], p),
            "epochs": s["epochs"] * 10 + e,
            "n": s["n"] + 1,
        },
        result=lambda s: jax.tree.map(lambda x: x / s["n"], s["sum"]),
    )


def test_train_step_folds_key_with_step():
    """With SGD lr=1 the update is -grad = -noise * N(fold_in(key, step)): checked by hand."""
    method = linear_method(noise=1.0)
    tx = optax.sgd(1.0)
    state = train.init_train_state(method, tx, jax.random.key(0), None, None)
    state = state._replace(step=jnp.int32(5))
    batch = {"image": np.zeros((2, 2, 2, 3), np.float32), "label": np.zeros(2, np.int32)}
    key = jax.random.key(7)
    new, metrics = jax.jit(train.make_train_step(method, tx))(state, None, None, batch, key)
    # Zero images: the CE gradient is 0, leaving the noise term's gradient.
    want = state.prompt["w"] - jax.random.normal(jax.random.fold_in(key, 5), (D, C))
    np.testing.assert_allclose(new.prompt["w"], want, rtol=1e-6, atol=1e-6)
    assert int(new.step) == 6
    assert set(metrics) >= {"loss", "ce", "grad_norm"}


def manual_run(method, tx, steps, key, ipe):
    """The reference loop for fit: same keys, plain jit, epoch-end prompts collected."""
    init_key, step_key = jax.random.split(key)
    state = train.init_train_state(method, tx, init_key, FAKE_CLIP, FAKE_TASK)
    step = jax.jit(train.make_train_step(method, tx))
    it, ends = Batches(), []
    for s in range(steps):
        state, _ = step(state, FAKE_CLIP, FAKE_TASK, next(it), step_key)
        if (s + 1) % ipe == 0:
            ends.append(np.asarray(state.prompt["w"]))
    return state, ends


def test_fit_logs_aggregates_and_matches_manual_loop(tmp_path):
    method = linear_method(noise=0.1)
    sched = train.make_schedule(0.5, epochs=3, iters_per_epoch=2, warmup_lr=0.1)
    tx = train.make_optimizer(0.5, epochs=3, iters_per_epoch=2, warmup_lr=0.1)
    key = jax.random.key(3)
    evals = []
    state = train.fit(
        method,
        tx,
        FAKE_CLIP,
        FAKE_TASK,
        Batches(),
        steps=6,
        key=key,
        workdir=tmp_path,
        log_every=2,
        iters_per_epoch=2,
        lr_schedule=sched,
        aggregator=mean_of_epoch_ends(),
        eval_fn=lambda p, s: evals.append(s) or {"top1": 50.0},
        eval_every=3,
    )
    ref, ends = manual_run(method, tx, 6, key, ipe=2)
    # The returned prompt is the aggregate of the prompts after steps 2, 4 and 6.
    # (fit shards the batch over 8 devices, the reference does not: sums differ in order.)
    np.testing.assert_allclose(state.prompt["w"], np.mean(ends, axis=0), rtol=1e-5, atol=1e-6)
    assert int(state.step) == 6
    np.testing.assert_allclose(
        state.opt_state[1][0].trace["w"], ref.opt_state[1][0].trace["w"], rtol=1e-5, atol=1e-6
    )
    assert evals == [3, 6]

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4, 6]
    for x in train_lines:
        assert {"lr", "loss", "ce", "examples_per_sec", "steps_per_sec"} <= set(x)
        assert x["examples_per_sec"] > 0
    # lr logged is the rate the last step of the window used: epochs 1, 2, 3.
    assert [x["lr"] for x in train_lines] == pytest.approx([0.1, 0.5, 0.5 * 0.5 * 1.5])
    assert [x["step"] for x in lines if "eval/top1" in x] == [3, 6]

    # The final checkpoint holds the aggregate and says so.
    prompt, meta = checkpoint.load_prompt(tmp_path)
    np.testing.assert_array_equal(prompt["w"], np.asarray(state.prompt["w"]))
    assert meta["aggregated"] and meta["method"] == "linear" and meta["step"] == 6


def test_fit_hands_gpa_one_indexed_epochs(tmp_path):
    """fit with PromptSRC's real Gaussian aggregation returns the Gaussian-weighted sum of the
    epoch-end prompts with weights at epochs 1..N (promptsrc.md 5), computed here in NumPy. A
    trainer passing 0-indexed epochs would weight epoch e with w_{e+1}: a different sum."""
    from jaxprompt import gpa

    method = linear_method(noise=0.1)
    tx = train.make_optimizer(0.5, epochs=3, iters_per_epoch=2, warmup_lr=0.1)
    key = jax.random.key(11)
    mean, std = 2.0, 0.5  # sharp: w = .106, .787, .106 over epochs 1, 2, 3
    state = train.fit(
        method, tx, FAKE_CLIP, FAKE_TASK, Batches(), steps=6, key=key, iters_per_epoch=2,
        aggregator=gpa.gaussian_aggregation(mean=mean, std=std, num_epochs=3),
    )  # fmt: skip
    _, ends = manual_run(method, tx, 6, key, ipe=2)
    epochs = np.arange(1, 4, dtype=np.float64)
    w = np.exp(-0.5 * ((epochs - mean) / std) ** 2)
    w /= w.sum()
    want = np.tensordot(w, np.asarray(ends, np.float64), axes=1)
    np.testing.assert_allclose(state.prompt["w"], want, rtol=1e-5, atol=1e-6)
    shifted = np.tensordot(np.roll(w, -1), np.asarray(ends, np.float64), axes=1)  # 0-indexed
    assert np.abs(shifted - want).max() > 100 * 1e-6


def test_fit_resume_in_process_is_exact(tmp_path):
    method = linear_method(noise=0.1)
    tx = train.make_optimizer(0.5, epochs=4, iters_per_epoch=2, warmup_lr=0.1)
    key = jax.random.key(5)
    kw = dict(
        key=key, log_every=1, iters_per_epoch=2, checkpoint_every=2, aggregator=mean_of_epoch_ends()
    )
    full = train.fit(method, tx, FAKE_CLIP, FAKE_TASK, Batches(), steps=8, **kw)
    # First run stops after 5 steps (checkpoints 2, 4 and a final one at 5) ...
    train.fit(method, tx, FAKE_CLIP, FAKE_TASK, Batches(), steps=5, workdir=tmp_path, **kw)
    assert checkpoint.latest_step(tmp_path) == 5
    # ... the second continues from step 5 with a fresh iterator repositioned by set_state.
    resumed = train.fit(
        method, tx, FAKE_CLIP, FAKE_TASK, Batches(), steps=8, workdir=tmp_path, **kw
    )
    np.testing.assert_array_equal(np.asarray(resumed.prompt["w"]), np.asarray(full.prompt["w"]))


def test_fit_reports_exhausted_iterator():
    method = linear_method()
    with pytest.raises(ValueError, match="ran out at step 2"):
        train.fit(
            method,
            optax.sgd(0.1),
            FAKE_CLIP,
            FAKE_TASK,
            iter([next(Batches())] * 2),
            steps=4,
            key=jax.random.key(0),
        )


def test_fit_with_aggregator_needs_epochs():
    with pytest.raises(ValueError, match="iters_per_epoch"):
        train.fit(
            linear_method(),
            optax.sgd(0.1),
            FAKE_CLIP,
            FAKE_TASK,
            Batches(),
            steps=2,
            key=jax.random.key(0),
            aggregator=mean_of_epoch_ends(),
        )


# ------------------------------------------------------------------------------------------------
# Kill -9 and resume (real CoOp on the tiny CLIP, in a subprocess)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tiny_clip_dir, tmp_path):
    sys.path.insert(0, HERE)
    try:
        import resume_worker
    finally:
        sys.path.remove(HERE)
    workdir = tmp_path / "run"
    workdir.mkdir()
    cmd = [sys.executable, os.path.join(HERE, "resume_worker.py"), str(tiny_clip_dir), str(workdir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd + ["0.7"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            step = checkpoint.latest_step(workdir)
            if step is not None and step >= resume_worker.CHECKPOINT_EVERY:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the worker finished (or died) before it could be killed"
        killed_after = checkpoint.latest_step(workdir)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert killed_after is not None and killed_after < resume_worker.STEPS

    # The resumed run, in a fresh process; meanwhile the uninterrupted reference runs in this
    # one (same 8 simulated devices, same program, its own workdir), so the two overlap on a
    # multi-core machine instead of running one after the other.
    resume = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        reference = resume_worker.run(str(tiny_clip_dir), str(tmp_path / "reference"))
        stdout, stderr = resume.communicate(timeout=300)
    finally:
        if resume.poll() is None:
            resume.kill()
            resume.wait()
    assert resume.returncode == 0, stderr[-3000:]
    start = int(stdout.split("start_step=")[1].split()[0])
    assert resume_worker.CHECKPOINT_EVERY <= start < resume_worker.STEPS  # really resumed
    resumed = dict(np.load(workdir / "final.npz"))

    assert resumed.keys() == reference.keys() == {"ctx"}
    np.testing.assert_array_equal(resumed["ctx"], reference["ctx"])
    # And training moved the prompt away from its initialisation: the equality is not vacuous.
    import jaxprompt as jp

    init_key = jax.random.split(jax.random.key(42))[0]
    clip = jp.load_clip(str(tiny_clip_dir))
    init = jp.methods.get("coop", n_ctx=4).init(
        init_key, clip, jp.make_task(clip, resume_worker.CLASSNAMES)
    )
    assert np.abs(np.asarray(init["ctx"]) - reference["ctx"]).max() > 1e-4


def test_fit_on_a_model_sharded_mesh_and_progress_line(caplog):
    """A ("data": 4, "model": 2) mesh shards the frozen params and gives the same result."""
    import logging

    from jaxprompt import sharding

    method = linear_method(noise=0.1)
    tx = optax.sgd(0.3, momentum=0.9)
    kw = dict(steps=3, key=jax.random.key(11), log_every=3)
    clip = {"params": np.arange(8, dtype=np.float32)}
    ref = train.fit(method, tx, clip, FAKE_TASK, Batches(), mesh=sharding.make_mesh(), **kw)
    caplog.set_level(logging.INFO, logger="jaxprompt")
    caplog.clear()  # only this fit's lines (CLI tests before may have set INFO already)
    got = train.fit(method, tx, clip, FAKE_TASK, Batches(), mesh=sharding.make_mesh(model=2), **kw)
    np.testing.assert_allclose(got.prompt["w"], ref.prompt["w"], rtol=1e-6, atol=1e-7)
    progress = [r.getMessage() for r in caplog.records if "it/s" in r.getMessage()]
    assert (
        len(progress) == 1 and progress[0].startswith("step 3/3 ") and "eta 0:00:00" in progress[0]
    )


# --------------------------------------------------------------------------- fit's pieces


def test_periodic_actions_fall_on_multiples_but_not_the_last_step():
    due = [d for d in range(1, 13) if train._due(d, 4, 12)]
    assert due == [4, 8]  # 12 is the final evaluation / checkpoint, done once by fit
    assert not any(train._due(d, None, 12) or train._due(d, 0, 12) for d in range(1, 13))


def test_progress_lines_average_the_window_and_time_from_the_second_step():
    class Writer:
        def __init__(self):
            self.records = []

        def write(self, record):
            self.records.append(record)

    w = Writer()
    p = train._Progress(5, 2, w, lr_schedule=lambda step: 0.1 * (step + 1))
    for done in range(1, 6):
        p.add(done, {"loss": np.float32(done)}, n_batch=8)
        p.maybe_log(done)
    assert [r["step"] for r in w.records] == [2, 4, 5]
    assert [r["loss"] for r in w.records] == [1.5, 3.5, 5.0]
    np.testing.assert_allclose([r["lr"] for r in w.records], [0.2, 0.4, 0.5])
    # The first line's rate counts step 2 only (step 1 compiled): one step of 8 examples.
    r = w.records[0]
    assert r["examples_per_sec"] / r["steps_per_sec"] == pytest.approx(8.0)
    assert all(x["examples_per_sec"] / x["steps_per_sec"] == pytest.approx(8.0) for x in w.records)


def test_metrics_writer_drops_the_lines_past_a_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (2, 4, 4, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # the last line cut by a kill
    writer = train._MetricsWriter(str(tmp_path))
    writer.start_at(4)
    writer.write({"step": 5, "loss": 2.0})
    writer.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4, 4, 5]
