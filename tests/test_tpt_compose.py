"""TPT composed with the rest: online TPT (the prompt carried from sample to sample) and
test-time tuning of any trained prompt (IVLP, MaPLe, PromptSRC, Bayesian bases).

The references here are Python loops over samples written from the definitions (specs/tpt.md
sections 2.3-2.6) through the base's own ``logits``, not through the episode code.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LOGIT_TOL

import jaxprompt as jp
from jaxprompt import checkpoint, share
from jaxprompt.app import tpt as adapt
from jaxprompt.methods.tpt import adamw_torch, episode, online_episodes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPT = os.path.join(REPO, "configs", "adapt.py")
B, V, KEEP = 4, 16, 0.25  # 4 of 16 views kept


def np_entropy(z):
    z = np.asarray(z, np.float64)
    lp = z - z.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return -(np.exp(lp) * lp).sum(-1)


def entropy_of_mean_probability(z):
    """H(mean_k softmax(z_k)), written directly (not losses.marginal_entropy)."""
    p = jnp.mean(jax.nn.softmax(z, axis=-1), axis=0)
    return -jnp.sum(p * jnp.log(p))


def sequential(base, tx, prompt, clip, task, views, *, steps, carry_optimizer, online=True):
    """The definition as a Python loop over samples: select on the step-0 logits of the
    prompt the sample starts from, ``steps`` optimiser steps on the entropy of the mean
    probability of the selected views, predict view 0; carry the prompt (and the state)."""
    k = int(views.shape[1] * KEEP)
    p, s = prompt, tx.init(prompt)
    out = []
    for vb in views:
        start = p if online else prompt
        p = start
        if not carry_optimizer:
            s = tx.init(p)
        z0 = np.asarray(base.logits(p, clip, task, vb))
        sel = np.argsort(np_entropy(z0), kind="stable")[:k]

        def loss(q, sel=sel, vb=vb):
            return entropy_of_mean_probability(base.logits(q, clip, task, vb[sel]))

        for _ in range(steps):
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        out.append(np.asarray(base.logits(p, clip, task, vb[:1])[0]))
    return np.stack(out), p, s


@pytest.fixture(scope="module")
def views(tiny_clip):
    s = tiny_clip.spec.image_size
    return np.random.RandomState(3).randn(B, V, s, s, 3).astype(np.float32)


# A smooth AdamW: eps comparable to the gradients. The entropy gradients of the tiny CLIP's
# context are 0.02-0.3 per coordinate (10th-90th percentile). A fresh AdamW's first step is
# lr * g / (|g| + eps), whose slope in g is at most lr / eps: with TPT's eps = 1e-8, or even
# 1e-3, a coordinate whose gradient is near zero turns a rounding difference of the gradient
# into a step lr / eps times larger, and the online chain (4 samples x 2 steps, each starting
# from the last) carries it on. With eps = 1e-3 the reference loop alone moved by 2e-4 in its
# logits when its views were perturbed at float32 rounding (relative 1e-7), and the jitted scan
# and the loop (which batch the image tower differently) differed by 5e-4 on one Xeon: float
# noise amplified, not a different computation (the selected views agreed on every sample).
# With eps = 0.1 the slope is at most lr / eps = 0.2: no amplification, and the steps still move
# the logits by several units, so a wrong carry is caught by orders of magnitude.
TX = adamw_torch(2e-2, eps=0.1)

# Logits: conftest.LOGIT_TOL (1e-5 relative to the logit, ten times the rounding of either
# side). Measured here: 2e-5 apart on |z| ~ 30 already at the first sample, where nothing is
# carried, from the two batchings of the image tower (one jitted call for all B x V views
# against V views per sample, eagerly).


# ------------------------------------------------------------------------------------------------
# Online TPT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carry_optimizer", [False, True])
def test_online_equals_a_python_loop_that_carries_the_prompt(
    tiny_clip, tiny_task, views, carry_optimizer
):
    base = jp.methods.coop(n_ctx=4, init_words="a photo of a")
    prompt = base.init(jax.random.key(0), tiny_clip, tiny_task)
    fn = jax.jit(
        lambda p, v: online_episodes(
            base, TX, p, tiny_clip, tiny_task, v, steps=2, keep=KEEP,
            carry_optimizer=carry_optimizer,
        )
    )  # fmt: skip
    out = fn(prompt, views)
    want, p_end, s_end = sequential(
        base, TX, prompt, tiny_clip, tiny_task, views, steps=2, carry_optimizer=carry_optimizer
    )
    np.testing.assert_allclose(
        np.asarray(out["logits"]), want, **LOGIT_TOL
    )  # measured 2.3e-5 on |z| ~ 30 (a tenth of the tolerance)
    # The context itself: 1e-7 apart after 8 steps (measured), the tolerance 2e-5.
    np.testing.assert_allclose(np.asarray(out["prompt"]["ctx"]), p_end["ctx"], atol=2e-5)
    if carry_optimizer:
        got_leaves = jax.tree.leaves(out["opt_state"])
        for a, b in zip(got_leaves, jax.tree.leaves(s_end), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-7)
    else:
        assert out["opt_state"] is None
    # The carry really carries: sample 1 started from sample 0's tuned prompt, so online
    # differs from episodic after the first sample, and equals it on the first.
    episodic, _, _ = sequential(
        base, TX, prompt, tiny_clip, tiny_task, views, steps=2, carry_optimizer=False,
        online=False,
    )  # fmt: skip
    np.testing.assert_allclose(want[0], episodic[0], atol=1e-5)
    assert not np.allclose(want[1:], episodic[1:], atol=1e-4)
    # Batches are a unit of work only: 2 + 2 with the carry passed on equals 4 at once.
    first = fn(prompt, views[:2])
    if carry_optimizer:
        second = online_episodes(
            base, TX, first["prompt"], tiny_clip, tiny_task, views[2:], steps=2, keep=KEEP,
            carry_optimizer=True, opt_state=first["opt_state"],
        )  # fmt: skip
    else:
        second = fn(first["prompt"], views[2:])
    halves = np.concatenate([np.asarray(first["logits"]), np.asarray(second["logits"])])
    np.testing.assert_allclose(
        halves, np.asarray(out["logits"]), **LOGIT_TOL
    )  # the eager second half against the jitted whole: 1.1e-5 measured


def test_online_mask_leaves_the_carry_and_method_option(tiny_clip, tiny_task, views):
    base = jp.methods.coop(n_ctx=4, init_words="a photo of a")
    prompt = base.init(jax.random.key(0), tiny_clip, tiny_task)
    kw = dict(steps=1, keep=KEEP)
    full = online_episodes(base, TX, prompt, tiny_clip, tiny_task, views[:2], **kw)
    # A padded (masked) row after the real ones leaves the carried prompt as it was.
    padded = online_episodes(
        base, TX, prompt, tiny_clip, tiny_task, views[:3], mask=np.array([1, 1, 0], bool), **kw
    )
    np.testing.assert_allclose(
        np.asarray(padded["prompt"]["ctx"]), np.asarray(full["prompt"]["ctx"]), atol=1e-6
    )
    # The method option: reset="online" runs online_episodes over the rows of a call;
    # the episodic default is TPT (each row from the initial prompt).
    m = jp.methods.get("tpt", base=base, optimizer=None, views=V, keep=KEEP, reset="online")
    assert m.config["reset"] == "online" and not m.config["carry_optimizer"]
    got = jax.jit(m.logits)(prompt, tiny_clip, tiny_task, views)
    # TPT's own AdamW (eps 1e-8) amplifies rounding differences (see TX): the reference is
    # jitted too, so both sides are the same computation, compared at the logits' tolerance.
    tx = adamw_torch()
    want = jax.jit(
        lambda p, v: online_episodes(base, tx, p, tiny_clip, tiny_task, v, steps=1, keep=KEEP)
    )(prompt, views)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want["logits"]), **LOGIT_TOL)
    episodic = jp.methods.get("tpt", base=base, views=V, keep=KEEP)
    assert episodic.config["reset"] == "episodic"
    one = jax.jit(lambda p, v: episode(base, tx, p, tiny_clip, tiny_task, v, keep=KEEP))(
        prompt, views[2]
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(episodic.logits)(prompt, tiny_clip, tiny_task, views))[2],
        np.asarray(one),
        **LOGIT_TOL,
    )
    with pytest.raises(ValueError, match="reset"):
        jp.methods.get("tpt", reset="sometimes")
    with pytest.raises(ValueError, match="carry_optimizer"):
        jp.methods.get("tpt", carry_optimizer=True)
    with pytest.raises(ValueError, match="depends on the image"):
        jp.methods.get("tpt", base="cocoop", reset="online")


def _cli(*extra, workdir):
    from jaxprompt import cli

    return cli.main(["jaxprompt", "adapt", *extra, "--workdir", str(workdir)])


class _Preempted(Exception):
    pass


def _stop_after_one_batch(real):
    def make(*a, **k):
        it = real(*a, **k)

        class Once:
            n = 0

            def __len__(self):
                return len(it)

            def __iter__(self):
                return self

            def __next__(self):
                self.n += 1
                if self.n > 1:
                    raise _Preempted
                return next(it)

            def get_state(self):
                return it.get_state()

            def set_state(self, s):
                it.set_state(s)

        return Once()

    return make


def _carry(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_online_adapt_resumes_exactly_after_an_interruption(tiny_clip_dir, tmp_path, monkeypatch):
    """Online TPT with the optimiser state carried: a run stopped after its first batch resumes
    from the saved carry and ends with the same carried prompt, state and accuracies."""
    from jaxprompt import data as data_lib

    args = [
        "--config", f"{ADAPT}:tpt,dataset=toy_textures,runlocal=true,online=true",
        f"--config.clip.name={tiny_clip_dir}", "--config.data.limit=0",
        "--config.data.every=50", "--config.save_every=1",  # 16 images: 2 batches of 8
        "--config.method.carry_optimizer=true",
    ]  # fmt: skip
    assert _cli(*args, workdir=tmp_path / "whole") == 0
    whole = json.load(open(tmp_path / "whole" / "results.json"))
    assert whole["reset"] == "online" and whole["carry_optimizer"] and whole["n"] == 16

    real = data_lib.eval_iterator
    monkeypatch.setattr(data_lib, "eval_iterator", _stop_after_one_batch(real))
    with pytest.raises(_Preempted):
        _cli(*args, workdir=tmp_path / "cut")
    cut = tmp_path / "cut"
    assert json.load(open(cut / "progress.json"))["batches"] == 1
    assert int(_carry(cut / "carry.npz")["batches"]) == 1
    monkeypatch.setattr(data_lib, "eval_iterator", real)
    assert _cli(*args, workdir=cut) == 0
    resumed = json.load(open(cut / "results.json"))
    assert resumed["accuracy"] == whole["accuracy"] and resumed["n"] == 16
    a, b = _carry(tmp_path / "whole" / "carry.npz"), _carry(cut / "carry.npz")
    assert set(a) == set(b) and any(k.startswith("opt.") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The carried prompt moved away from the initial one (16 images of tuning).
    init = share.read_prompt_file(str(tmp_path / "whole" / "prompt.safetensors"))[0]
    assert not np.allclose(a["prompt.ctx"], init["ctx"], atol=1e-4)


@pytest.mark.slow
def test_online_adapt_carries_across_batches_whatever_the_batch_size(tiny_clip_dir, tmp_path):
    """The carried prompt goes from batch to batch: 16 images as one batch of 16 or two of 8 end
    with the same carry and accuracies (a runner that restarted each batch from the initial
    prompt would start image 8 afresh in the second run only).

    The two runs are different XLA programs (a scan over 16 images or two over 8), so their
    float rounding differs. With TPT's AdamW (eps 1e-8, a fresh state per image) each step is
    lr * g / (|g| + eps), a sign step wherever |g| >> eps, so a coordinate whose gradient is
    within rounding of 0 can step +lr in one run and -lr in the other (measured: 127 of 128
    coordinates apart by up to 0.0099 = 2 lr). As in the online equality test above, eps = 0.1
    (comparable to the gradients) makes the step a smooth function of g (slope at most
    lr / eps = 0.2), and lr 2e-2 keeps the carry moving."""
    runs = {}
    for batch in (16, 8):
        wd = tmp_path / f"b{batch}"
        args = [
            "--config", f"{ADAPT}:tpt,dataset=toy_textures,runlocal=true,online=true",
            f"--config.clip.name={tiny_clip_dir}", "--config.data.limit=16",
            f"--config.data.batch_size={batch}", "--config.method.optimizer.eps=0.1",
            "--config.method.optimizer.learning_rate=0.02",
        ]  # fmt: skip
        assert _cli(*args, workdir=wd) == 0
        runs[batch] = (json.load(open(wd / "results.json")), _carry(wd / "carry.npz"))
    (r16, c16), (r8, c8) = runs[16], runs[8]
    assert r16["accuracy"] == r8["accuracy"] and r16["n"] == r8["n"] == 16
    assert r16["stream_head"] == r8["stream_head"]
    np.testing.assert_allclose(c16["prompt.ctx"], c8["prompt.ctx"], rtol=1e-5, atol=1e-6)
    init = share.read_prompt_file(str(tmp_path / "b8" / "prompt.safetensors"))[0]
    assert not np.allclose(c8["prompt.ctx"], init["ctx"], atol=1e-4)  # it did move


# ------------------------------------------------------------------------------------------------
# Test-time tuning of any trained prompt
# ------------------------------------------------------------------------------------------------


def test_ivlp_tuned_logits_equal_a_manual_loop(tiny_clip, tiny_task, views):
    """IVLP base (vision prompts): episode == base.logits on the views, the confident views,
    the entropy of their mean probability, one optax step on the whole prompt, view 0."""
    base = jp.methods.ivlp(depth=2)
    prompt = base.init(jax.random.key(1), tiny_clip, tiny_task)
    got = jax.jit(lambda p, v: episode(base, TX, p, tiny_clip, tiny_task, v, keep=KEEP))(
        prompt, views[0]
    )
    want, tuned, _ = sequential(
        base, TX, prompt, tiny_clip, tiny_task, views[:1], steps=1, carry_optimizer=False
    )
    np.testing.assert_allclose(np.asarray(got), want[0], **LOGIT_TOL)
    # Every leaf moved, the vision prompts included.
    for k in ("ctx", "vision_ctx", "deep_text", "deep_vision"):
        assert not np.allclose(np.asarray(tuned[k]), np.asarray(prompt[k])), k


def test_bayes_base_tunes_mean_and_variance_deterministically(tiny_clip, tiny_task, views):
    """A Bayesian base runs the generic path: its logits are the MC predictive at the fixed
    evaluation key, so the episode is deterministic and the gradient reaches mean/logvar."""
    base = jp.methods.bayes(n_ctx=4, mc_samples=3)
    prompt = base.init(jax.random.key(2), tiny_clip, tiny_task)
    fn = jax.jit(
        lambda p, v: online_episodes(base, TX, p, tiny_clip, tiny_task, v, steps=1, keep=KEEP)
    )
    a, b = fn(prompt, views[:2]), fn(prompt, views[:2])
    np.testing.assert_array_equal(np.asarray(a["logits"]), np.asarray(b["logits"]))
    assert np.all(np.isfinite(np.asarray(a["logits"])))
    for k in ("ctx", "mean", "logvar"):
        assert not np.allclose(np.asarray(a["prompt"][k]), np.asarray(prompt[k])), k
    want, _, _ = sequential(
        base, TX, prompt, tiny_clip, tiny_task, views[:2], steps=1, carry_optimizer=False
    )
    np.testing.assert_allclose(np.asarray(a["logits"]), want, **LOGIT_TOL)


BASES = {
    "tpt_ivlp": ("ivlp", {"depth": 2}),
    "tpt_maple": ("maple", {"depth": 2}),
    "tpt_promptsrc": ("promptsrc", {"depth": 2}),
    "tpt_bayes": ("bayes", {"n_ctx": 4, "mc_samples": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(BASES))
def test_adapt_preset_per_base_from_an_exported_prompt(
    preset, tiny_clip, tiny_clip_dir, tmp_path, capsys
):
    """Each base's preset runs TPT from a prompt file (.safetensors, as `jaxprompt export`
    writes) on the toy world and writes results; without init_from it is a one-line error."""
    name, kwargs = BASES[preset]
    method = jp.methods.get(name, **kwargs)
    ds = jp.data.load_dataset("toy_textures")
    task = jp.make_task(tiny_clip, list(ds.classnames))
    prompt = method.init(jax.random.key(0), tiny_clip, task)
    meta = share.prompt_meta(
        method=name, method_config=dict(method.config), backbone_name=tiny_clip_dir,
        fingerprint=share.backbone_fingerprint(tiny_clip), classnames=list(ds.classnames),
    )  # fmt: skip
    path = share.save_prompt(tmp_path / f"{name}.safetensors", prompt, meta)
    args = [
        "--config", f"{ADAPT}:{preset},dataset=toy_textures,runlocal=true",
        f"--config.clip.name={tiny_clip_dir}", "--config.data.limit=0",
        "--config.data.every=200", "--config.method.views=8", "--config.method.keep=0.25",
    ]  # fmt: skip
    # 4 images, 8 views each, 2 kept. Without the trained prompt: a one-line error.
    capsys.readouterr()
    assert _cli(*args, workdir=tmp_path / "no_init") == 2
    assert "init_from" in capsys.readouterr().err
    assert _cli(*args, f"--config.init_from={path}", workdir=tmp_path / "run") == 0
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert res["base"] == name and res["n"] == 4 and set(res["accuracy"]) == {"zero_shot", "tpt"}
    assert res["preset"] == preset


@pytest.mark.slow
def test_adapt_from_a_trained_ivlp_run_directory(tiny_clip, tiny_task, tmp_path):
    """The run-directory source: an orbax checkpoint of an IVLP training state."""
    from jaxprompt import train

    ivlp = jp.methods.ivlp(depth=2)
    key = jax.random.key(0)
    state = train.init_train_state(ivlp, train.make_optimizer(0.01), key, tiny_clip, tiny_task)
    checkpoint.save(
        tmp_path / "run", state, meta={"method": "ivlp", "method_config": dict(ivlp.config)}
    )
    base, prompt, source = adapt.initial_prompt(
        str(tmp_path / "run"), "coop", {}, tiny_clip, tiny_task, key
    )
    assert base.name == "ivlp" and base.config["remat"] and base.config["depth"] == 2
    np.testing.assert_array_equal(
        np.asarray(prompt["vision_ctx"]), np.asarray(state.prompt["vision_ctx"])
    )
    # A TPT export as the source gives its base and the base's prompt.
    tpt = jp.methods.get("tpt", base=ivlp)
    meta = share.prompt_meta(
        method="tpt", method_config=dict(tpt.config), backbone_name="x", fingerprint=None,
        classnames=[],
    )  # fmt: skip
    path = share.save_prompt(tmp_path / "tpt.safetensors", state.prompt, meta)
    base, prompt2, _ = adapt.initial_prompt(path, "coop", {}, tiny_clip, tiny_task, key)
    assert base.name == "ivlp"
    np.testing.assert_array_equal(np.asarray(prompt2["ctx"]), np.asarray(state.prompt["ctx"]))
