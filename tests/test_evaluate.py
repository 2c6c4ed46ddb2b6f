"""Evaluation and sharding tests: masked sums, padded sharded accuracy, HM, seeds, tables."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxprompt as jp
from jaxprompt import evaluate, sharding
from jaxprompt.methods.base import PromptMethod

D, C = 12, 4


def linear_method() -> PromptMethod:
    """logits = flatten(images)[:, :D] @ w (no encode_classes: the per-batch path)."""

    def logits(prompt, clip, task, images, *, key=None):
        del clip, task, key
        return images.reshape(images.shape[0], -1)[:, :D] @ prompt["w"]

    return PromptMethod(init=None, logits=logits, loss=None, name="linear")


def numpy_sums(w, images, labels, mask):
    lg = images.reshape(len(images), -1)[:, :D].astype(np.float64) @ w.astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(labels)), np.clip(labels, 0, C - 1)]
    correct = (lg.argmax(-1) == labels) & mask
    return correct.sum(), mask.sum(), (nll * mask).sum()


def data(n, seed):
    r = np.random.RandomState(seed)
    return r.randn(n, 2, 2, 3).astype(np.float32), r.randint(0, C, n).astype(np.int32)


W = np.random.RandomState(9).randn(D, C).astype(np.float32)


def test_eval_step_sums_with_mask():
    images, labels = data(8, 0)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    labels[2] = -1  # padding rows may carry any label
    step = jax.jit(evaluate.make_eval_step(linear_method()))
    out = step({"w": W}, None, None, {"image": images, "label": labels, "mask": mask}, None)
    correct, count, loss_sum = numpy_sums(W, images, labels, mask)
    assert int(out["correct"]) == correct and int(out["count"]) == 6 == count
    assert float(out["loss_sum"]) == pytest.approx(loss_sum, rel=1e-5)
    # Without a mask every row counts.
    out = step({"w": W}, None, None, {"image": images, "label": np.abs(labels)}, None)
    assert int(out["count"]) == 8


def test_evaluate_pads_short_batches_over_8_devices():
    batches = [data(8, 1), data(8, 2), data(5, 3)]  # the last one does not fill 8 devices
    method = linear_method()
    feed = [{"image": x, "label": y} for x, y in batches]
    res = evaluate.evaluate(
        method,
        {"w": W},
        {"params": np.zeros(2)},
        {"t": np.zeros(1)},
        feed,
        mesh=sharding.make_mesh(),
    )
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    correct, count, loss_sum = numpy_sums(W, images, labels, np.ones(21, bool))
    assert res["n"] == 21 == count
    assert res["top1"] == pytest.approx(100.0 * correct / 21)
    assert res["loss"] == pytest.approx(loss_sum / 21, rel=1e-5)
    # Evaluating again (a later training step) reuses the compiled step: one shape, one entry.
    evaluate.evaluate(method, {"w": W + 1}, {"params": np.zeros(2)}, {"t": np.zeros(1)}, feed)
    assert evaluate._jitted_logits(method.logits)._cache_size() == 1


@pytest.mark.slow
def test_evaluate_encode_classes_path_on_new_classes(tiny_clip, new_task):
    """CoOp has encode_classes: evaluate must equal argmax of method.logits on a new task."""
    method = jp.methods.get("coop", n_ctx=4)
    prompt = method.init(jax.random.key(0), tiny_clip, new_task)
    r = np.random.RandomState(4)
    batches = [
        {
            "image": r.randn(8, 32, 32, 3).astype(np.float32),
            "label": r.randint(0, len(new_task), 8).astype(np.int32),
        }
        for _ in range(2)
    ]
    batches[1]["mask"] = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    res = evaluate.evaluate(method, prompt, tiny_clip, new_task, batches)
    correct = 0
    for b in batches:
        pred = np.asarray(method.logits(prompt, tiny_clip, new_task, b["image"])).argmax(-1)
        mask = b.get("mask", np.ones(8, bool))
        correct += int(((pred == b["label"]) & mask).sum())
    assert res["n"] == 13
    assert res["top1"] == pytest.approx(100.0 * correct / 13)


def test_harmonic_mean():
    assert evaluate.harmonic_mean(80.0, 70.0) == pytest.approx(2 * 80 * 70 / 150)
    # PromptSRC's 11-dataset average row: 84.26 base, 76.10 new -> 79.97 HM.
    assert evaluate.harmonic_mean(84.26, 76.10) == pytest.approx(79.97, abs=0.005)
    assert evaluate.harmonic_mean(0.0, 0.0) == 0.0
    assert evaluate.harmonic_mean(50.0, 0.0) == 0.0


def test_summarize_seeds_population_std():
    seeds = [
        {"base": 80.0, "new": 70.0, "seed": 1, "dataset": "dtd"},
        {"base": 82.0, "new": 74.0, "seed": 2, "dataset": "dtd"},
        {"base": 84.0, "new": 72.0, "seed": 3, "dataset": "dtd"},
    ]
    s = evaluate.summarize_seeds(seeds)
    assert s["base"]["mean"] == pytest.approx(82.0)
    assert s["base"]["std"] == pytest.approx(np.sqrt(8 / 3))  # population, not sample (2.0)
    assert s["new"]["mean"] == pytest.approx(72.0)
    assert s["hm"]["mean"] == pytest.approx(2 * 82 * 72 / 154)  # HM of the means
    assert "dataset" not in s


def test_write_results_and_markdown_table(tmp_path):
    path = evaluate.write_results(tmp_path / "run", {"base": 80.0, "new": np.float32(60.0)})
    assert json.loads(open(path).read()) == {"base": 80.0, "new": 60.0}
    table = evaluate.markdown_table(
        {
            "dtd": {"base": 80.0, "new": 60.0, "hm": 68.5714},
            "eurosat": {"base": {"mean": 90.0, "std": 1.0}, "new": 70.0, "hm": 78.75},
        }
    )
    lines = table.splitlines()
    assert lines[0] == "| Dataset | Base | New | HM |"
    assert lines[2] == "| dtd | 80.00 | 60.00 | 68.57 |"
    assert lines[3] == "| eurosat | 90.00 | 70.00 | 78.75 |"
    # The average row's HM is the HM of the averaged base (85) and new (65): 73.67.
    assert lines[4] == "| Average | 85.00 | 65.00 | 73.67 |"


# ------------------------------------------------------------------------------------------------
# sharding.py
# ------------------------------------------------------------------------------------------------


def test_make_mesh_and_put_batch():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.shape == {"data": 8, "model": 1}
    assert sharding.make_mesh(model=2).shape == {"data": 4, "model": 2}
    assert sharding.make_mesh(devices=jax.devices()[:1]).shape == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="divide"):
        sharding.make_mesh(model=3)
    batch = sharding.put_batch({"image": np.ones((16, 2, 2, 3)), "label": np.arange(16)}, mesh)
    assert batch["image"].shape == (16, 2, 2, 3)
    assert batch["label"].sharding.spec == P("data")
    assert len(batch["label"].addressable_shards) == 8
    assert batch["label"].addressable_shards[3].data.shape == (2,)
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(16))
    with pytest.raises(ValueError, match="multiple of 8"):
        sharding.put_batch({"label": np.arange(6)}, mesh)


def test_clip_params_sharded_over_model_axis():
    mesh = sharding.make_mesh(model=4)
    params = {"w": jnp.ones((6, 16)), "b": jnp.ones((3,)), "s": jnp.ones(())}
    sh = sharding.clip_shardings(params, mesh)
    assert sh["w"].spec == P(None, "model")  # 16 is the largest axis divisible by 4
    assert sh["b"].spec == P() and sh["s"].spec == P()
    placed = sharding.shard_clip(params, mesh)
    assert placed["w"].addressable_shards[0].data.shape == (6, 4)
    assert sharding.clip_shardings(params, sharding.make_mesh())["w"].spec == P()
    rep = sharding.replicate({"x": np.arange(3)}, mesh)
    assert rep["x"].sharding.is_fully_replicated
