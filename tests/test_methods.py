"""The method contract suite: every registered method must pass it (optax contrib's habit).

For each name in ``jp.methods.names()`` on the tiny CLIP: ``init`` gives float32 leaves of the
documented shapes; ``loss`` is finite; its gradient has the prompt's structure and is non-zero;
``logits`` is [B, C'] for a DIFFERENT task; jit equals eager; the train step compiles once over
3 calls; 8 devices equal 1 device; checkpoint save -> restore is the identity.

A new method gets tiny-CLIP settings in ``TINY`` (its default hyperparameters may not fit a
2-layer CLIP); names missing there run with their defaults.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprompt as jp
from jaxprompt import checkpoint, sharding, train
from jaxprompt.methods import base

_T2 = ["a photo of a {}.", "a drawing of a {}."]

# name -> [(variant id, kwargs factory)]: settings that fit the tiny 2-layer CLIP.
TINY: dict[str, list[tuple[str, Callable[[], dict[str, Any]]]]] = {
    "zeroshot": [("zeroshot", dict)],
    "coop": [
        ("coop", lambda: dict(n_ctx=4)),
        ("coop-csc", lambda: dict(n_ctx=4, class_specific=True)),
    ],
    "cocoop": [("cocoop", lambda: dict(n_ctx=4))],
    "ivlp": [("ivlp", lambda: dict(depth=2))],
    "maple": [("maple", lambda: dict(depth=2))],
    # Two teacher templates, as the other self-regulated variants: the 60-template teacher is
    # checked against the PyTorch reference in test_promptsrc, and here it only made every
    # program of this variant four times larger to compile.
    "promptsrc": [("promptsrc", lambda: dict(depth=2, templates=_T2))],
    "bayes": [
        ("bayes", lambda: dict(mc_samples=2)),
        ("bayes-cond", lambda: dict(mc_samples=2, conditional=True)),
    ],
    "pouf": [("pouf", lambda: dict(base=jp.methods.get("coop", n_ctx=4)))],
    # Self-regulation and its presets, on tiny bases with a two-template teacher.
    "selfreg": [
        ("selfreg-bayes", lambda: dict(base="bayes", base_kwargs=dict(mc_samples=2), templates=_T2))
    ],
    "coop+src": [("coop+src", lambda: dict(base="coop", base_kwargs=dict(n_ctx=4), templates=_T2))],
    "cocoop+src": [
        ("cocoop+src", lambda: dict(base="cocoop", base_kwargs=dict(n_ctx=4), templates=_T2))
    ],
    "maple+src": [
        ("maple+src", lambda: dict(base="maple", base_kwargs=dict(depth=2), templates=_T2))
    ],
    "kgcoop": [("kgcoop", lambda: dict(templates=["a photo of a {}."]))],
}
CLASS_SPECIFIC = {"coop-csc"}  # prompts sized by the class count: no transfer to new classes


def _variants() -> list[tuple[str, str]]:
    out = []
    for name in jp.methods.names():
        for vid, _ in TINY.get(name, [(name, dict)]):
            out.append((name, vid))
    return out


VARIANTS = _variants()
IDS = [vid for _, vid in VARIANTS]


def build(name: str, vid: str) -> base.PromptMethod:
    kwargs = dict(dict(TINY.get(name, [(name, dict)]))[vid]())
    return jp.methods.get(name, **kwargs)


def make_batch(clip, n: int = 8, seed: int = 0, num_classes: int = 5):
    r = np.random.RandomState(seed)
    s = clip.spec.image_size
    return {
        "image": r.randn(n, s, s, 3).astype(np.float32),
        "label": (np.arange(n) % num_classes).astype(np.int32),
    }


def expected_shapes(vid: str, clip, task) -> dict[str, Any] | None:
    """The documented prompt shapes (DESIGN.md), where the tiny settings pin them down."""
    dt = clip.spec.text_width
    if vid == "zeroshot":
        return {}
    if vid == "coop":
        return {"ctx": (4, dt)}
    if vid == "coop-csc":
        return {"ctx": (len(task), 4, dt)}
    if vid in ("ivlp", "promptsrc"):  # depth 2, 4 + 4 tokens
        dv = clip.spec.vision_width
        return {
            "ctx": (4, dt),
            "vision_ctx": (4, dv),
            "deep_text": (1, 4, dt),
            "deep_vision": (1, 4, dv),
        }
    if vid == "maple":  # depth 2, 2 text tokens; vision prompts are projections
        dv = clip.spec.vision_width
        return {
            "ctx": (2, dt),
            "deep_text": (1, 2, dt),
            "proj": {"kernel": (2, dt, dv), "bias": (2, dv)},
        }
    if vid in ("bayes", "bayes-cond"):  # context from "a photo of a"; posterior over [D]
        n = base.word_embeddings(clip, "a photo of a").shape[0]
        if vid == "bayes":
            return {"ctx": (n, dt), "mean": (dt,), "logvar": (dt,)}
        e, h = clip.spec.embed_dim, clip.spec.embed_dim // 2  # MLPs E -> E/2 -> E/2 -> D
        net = {
            "linear1": {"kernel": (e, h), "bias": (h,)},
            "linear2": {"kernel": (h, h), "bias": (h,)},
            "linear3": {"kernel": (h, dt), "bias": (dt,)},
        }
        return {"ctx": (n, dt), "mean_net": net, "logvar_net": net}
    if vid == "cocoop":  # context from "a photo of a"; meta-net hidden = embed dim / 16
        n = base.word_embeddings(clip, "a photo of a").shape[0]
        e, h = clip.spec.embed_dim, max(clip.spec.embed_dim // 16, 1)
        return {
            "ctx": (n, dt),
            "meta_net": {
                "linear1": {"kernel": (e, h), "bias": (h,)},
                "linear2": {"kernel": (h, dt), "bias": (dt,)},
            },
        }
    return None


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def variant(request):
    name, vid = request.param
    return name, vid, build(name, vid)


@pytest.fixture(scope="module")
def initial(variant, tiny_clip, tiny_task):
    _, _, method = variant
    return method.init(jax.random.key(0), tiny_clip, tiny_task)


def test_registry_lists_methods():
    assert {"zeroshot", "coop"} <= set(jp.methods.names())
    with pytest.raises(ValueError, match="coop"):
        jp.methods.get("no-such-method")


def test_init_float32_documented_shapes(variant, initial, tiny_clip, tiny_task):
    name, vid, method = variant
    assert method.name == name
    leaves = jax.tree.leaves(initial)
    for leaf in leaves:
        assert jnp.asarray(leaf).dtype == jnp.float32
    want = expected_shapes(vid, tiny_clip, tiny_task)
    if want is not None:
        assert jax.tree.map(jnp.shape, initial) == want
    # The method's config is JSON-able meta, enough to rebuild it.
    assert isinstance(checkpoint._jsonable(dict(method.config)), dict)


def test_coop_class_specific_random_context_is_drawn_per_class(tiny_clip, tiny_task):
    # CoOp's CSC draws a [n_cls, n_ctx, D] tensor from N(0, 0.02^2): every class its own
    # context, not one draw repeated over the classes.
    method = jp.methods.get("coop", n_ctx=4, class_specific=True)
    ctx = np.asarray(method.init(jax.random.key(0), tiny_clip, tiny_task)["ctx"], np.float64)
    n_cls, dt = len(tiny_task), tiny_clip.spec.text_width
    assert ctx.shape == (n_cls, 4, dt)
    assert abs(ctx.std() - 0.02) < 0.002 and abs(ctx.mean()) < 0.003
    for c in range(n_cls):
        assert abs(ctx[c].std() - 0.02) < 0.004
    # Independent draws: near-zero correlation between any two classes' contexts (128 values
    # each, so |r| > 0.4 would be a 4.5-sigma event); copies would correlate at exactly 1.
    r = np.corrcoef(ctx.reshape(n_cls, -1))
    assert np.abs(r[~np.eye(n_cls, dtype=bool)]).max() < 0.4
    # With init words every class starts at those words (the reference's ctx_init path).
    words = jp.methods.get("coop", init_words="a photo of a", class_specific=True)
    w = words.init(jax.random.key(0), tiny_clip, tiny_task)["ctx"]
    np.testing.assert_array_equal(
        w, np.broadcast_to(base.word_embeddings(tiny_clip, "a photo of a"), (n_cls, 4, dt))
    )


@pytest.mark.slow
def test_loss_finite_and_gradient(variant, initial, tiny_clip, tiny_task):
    name, _, method = variant
    batch = make_batch(tiny_clip)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(method.loss, has_aux=True))(
        initial, tiny_clip, tiny_task, batch, jax.random.key(1)
    )
    assert loss.shape == () and np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values())
    if not jax.tree.leaves(initial):
        # Only a method with nothing to learn may skip the gradient checks.
        assert name == "zeroshot" and initial == {} and grads == {}
        return
    assert jax.tree.structure(grads) == jax.tree.structure(initial)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(initial), strict=True):
        assert g.shape == p.shape and g.dtype == jnp.float32
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0


@pytest.mark.slow
def test_logits_on_a_different_task(variant, initial, tiny_clip, tiny_task, new_task):
    _, vid, method = variant
    images = make_batch(tiny_clip, n=4)["image"]
    assert len(new_task) != len(tiny_task)
    if vid in CLASS_SPECIFIC:
        with pytest.raises(ValueError, match="class-specific"):
            method.logits(initial, tiny_clip, new_task, images)
        return
    logits = method.logits(initial, tiny_clip, new_task, images, key=jax.random.key(2))
    assert logits.shape == (4, len(new_task)) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.slow
def test_jit_equals_eager(variant, initial, tiny_clip, tiny_task):
    _, _, method = variant
    batch = make_batch(tiny_clip, n=4, seed=3, num_classes=len(tiny_task))
    key = jax.random.key(4)
    eager_logits = method.logits(initial, tiny_clip, tiny_task, batch["image"], key=key)
    jit_logits = jax.jit(lambda p, c, t, x, k: method.logits(p, c, t, x, key=k))(
        initial, tiny_clip, tiny_task, batch["image"], key
    )
    np.testing.assert_allclose(jit_logits, eager_logits, rtol=1e-5, atol=1e-5)
    eager_loss, _ = method.loss(initial, tiny_clip, tiny_task, batch, key)
    jit_loss, _ = jax.jit(method.loss)(initial, tiny_clip, tiny_task, batch, key)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Training on 8 and on 1 device (one fixture, shared by the compile, device and checkpoint tests)
# ------------------------------------------------------------------------------------------------

_COMPILES = threading.local()


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if "backend_compile" in event and getattr(_COMPILES, "on", False):
        _COMPILES.n += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)

STEPS = 3


def run_steps(method, clip, task, mesh):
    """3 train steps with the trainer's shardings; returns states, metrics, compile counts."""
    tx = train.make_optimizer(0.01)
    rep = sharding.replicated(mesh)
    clip = sharding.shard_clip(clip, mesh)
    task = sharding.replicate(task, mesh)
    key = sharding.replicate(jax.random.key(5), mesh)
    state = sharding.replicate(
        train.init_train_state(method, tx, jax.random.key(0), clip, task), mesh
    )
    state_sh = jax.tree.map(lambda _: rep, state)
    step = jax.jit(
        train.make_train_step(method, tx),
        in_shardings=(
            state_sh,
            sharding.clip_shardings(clip, mesh),
            jax.tree.map(lambda _: rep, task),
            sharding.batch_sharding(mesh),
            rep,
        ),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    batches = [sharding.put_batch(make_batch(clip, seed=10 + i), mesh) for i in range(STEPS)]
    _COMPILES.n, _COMPILES.on = 0, True
    try:
        # Everything is placed up front: any implicit host<->device copy in the step is a bug.
        with jax.transfer_guard("disallow"):
            for b in batches:
                state, metrics = step(state, clip, task, b, key)
            jax.block_until_ready(state)
    finally:
        _COMPILES.on = False
    return {
        "state": state,
        "metrics": metrics,
        "compiles": _COMPILES.n,
        "cache_size": step._cache_size(),
    }


@pytest.fixture(scope="module")
def trained(variant, tiny_clip, tiny_task):
    _, _, method = variant
    eight = run_steps(method, tiny_clip, tiny_task, sharding.make_mesh())
    one = run_steps(method, tiny_clip, tiny_task, sharding.make_mesh(devices=jax.devices()[:1]))
    return {"8": eight, "1": one}


@pytest.mark.slow
def test_train_step_compiles_once(trained):
    for run in trained.values():
        assert run["cache_size"] == 1
        assert run["compiles"] == 1, f"{run['compiles']} XLA compilations over {STEPS} steps"
        assert int(run["state"].step) == STEPS


@pytest.mark.slow
def test_8_devices_equal_1_device(variant, trained, initial):
    p8, p1 = trained["8"]["state"].prompt, trained["1"]["state"].prompt
    for leaf in jax.tree.leaves(p8):
        assert len(leaf.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        trained["8"]["metrics"]["loss"], trained["1"]["metrics"]["loss"], rtol=1e-5, atol=1e-5
    )
    if jax.tree.leaves(initial):  # the steps really changed the prompt
        moved = max(
            float(jnp.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(initial), strict=True)
        )
        assert moved > 1e-6


@pytest.mark.slow
def test_checkpoint_round_trip(variant, trained, tiny_clip, tiny_task, tmp_path):
    name, _, method = variant
    state = trained["8"]["state"]
    meta = {"method": method.name, "method_config": dict(method.config)}
    checkpoint.save(tmp_path, state, meta=meta)
    like = train.init_train_state(
        method, train.make_optimizer(0.01), jax.random.key(9), tiny_clip, tiny_task
    )
    restored, got_meta, _ = checkpoint.restore(tmp_path, like)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got_meta["method"] == name
    prompt, _ = checkpoint.load_prompt(tmp_path)
    for a, b in zip(jax.tree.leaves(prompt), jax.tree.leaves(state.prompt), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
