"""PromptSRC: every loss term and the total against an independent NumPy computation.

The NumPy side gets its features from independent paths: the frozen teacher from transformers'
PyTorch ``CLIPModel.get_text_features`` on the full template strings (77 tokens, no truncation),
the frozen image features from ``get_image_features``, and the prompted features from the float64
NumPy forward of ``test_clip`` (written from the spec, not from our encoders). The losses are
then computed in NumPy from the spec's formulas (promptsrc.md section 4), so a wrong KL
direction or normalisation, a normalised-then-averaged teacher, a teacher on other images, or
an L1 over the batch labels only, each fails here.
"""

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLASSNAMES
from test_clip import np_image, np_text

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import gpa, templates
from jaxprompt.methods.promptsrc import gpa_aggregator, teacher_text_features, with_teacher

RTOL, ATOL = 1e-4, 1e-5
SHARPEN = 6.0
TEXT = ("ctx", "deep_text")
VISION = ("vision_ctx", "deep_vision")


def sharpened(clip, factor=SHARPEN):
    """The tiny CLIP with its transformer-layer kernels scaled up.

    A random init (std 0.02) makes attention nearly uniform and the blocks nearly
    the identity, so appended vision prompts would move the image feature by ~1e-4: too little
    for the image terms to be checked meaningfully. Scaled kernels behave more like a trained
    CLIP; every path below (Hugging Face included) uses these same parameters.
    """

    def scale(path, x):
        keys = [getattr(k, "key", None) for k in path]
        return x * factor if "layers" in keys and keys[-1] == "kernel" else x

    return clip.replace(params=jax.tree_util.tree_map_with_path(scale, clip.params))


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return sharpened(tiny_clip)


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def method():
    return jp.methods.get("promptsrc", depth=2)


@pytest.fixture(scope="module")
def prompt(method, clip, tiny_task):
    """The initial prompt moved off its initialisation, so every term is clearly non-zero."""
    p = method.init(jax.random.key(0), clip, tiny_task)
    keys = jax.random.split(jax.random.key(1), 4)
    return {
        k: v + 0.3 * jax.random.normal(kk, v.shape)
        for (k, v), kk in zip(sorted(p.items()), keys, strict=True)
    }


@pytest.fixture(scope="module")
def hf(clip):
    return hf_reference.torch_clip(clip)  # the sharpened weights


@pytest.fixture(scope="module")
def reference(hf, clip, prompt, batch):
    """NumPy loss terms from independently computed features (float64)."""
    # Teacher: mean over the 60 templates of UNNORMALISED frozen features, normalised after.
    raw = []
    for t in templates.PROMPTSRC_60:
        ids, _ = clip_lib.tokenize(clip, [t.format(c) for c in CLASSNAMES], pad_to=77)
        raw.append(hf_reference.text_features(hf, ids))
    g = _norm(np.mean(raw, axis=0))
    # Frozen image features of the same images, prompt-free encoder.
    f = _norm(hf_reference.image_features(hf, batch["image"]))
    # Prompted features: the spec-written NumPy forward, prompts as float64.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), prompt)
    ids, _ = clip_lib.tokenize(clip, [f"a photo of a {c}." for c in CLASSNAMES])
    g_p = _norm(np_text(clip, ids, ctx=p["ctx"], deep=p["deep_text"]))
    f_p = _norm(np_image(clip, batch["image"], prompts=p["vision_ctx"], deep=p["deep_vision"]))
    z_p, z = 100.0 * f_p @ g_p.T, 100.0 * f @ g.T
    labels = batch["label"]
    b, c = z.shape
    log_ps, log_pt = _log_softmax(z_p), _log_softmax(z)
    terms = {
        "ce": -np.mean(log_ps[np.arange(b), labels]),
        "kl": np.sum(np.exp(log_pt) * (log_pt - log_ps)) / (b * c),
        "l1_text": np.mean(np.abs(g_p - g)),
        "l1_image": np.mean(np.abs(f_p - f)),
        "accuracy": np.mean(np.argmax(z_p, -1) == labels),
    }
    total = terms["ce"] + terms["kl"] + 25 * terms["l1_text"] + 10 * terms["l1_image"]
    # The wrong variants a reimplementation could pick, which must NOT match.
    wrong = {
        "kl_batchmean": np.sum(np.exp(log_pt) * (log_pt - log_ps)) / b,
        "kl_swapped": np.sum(np.exp(log_ps) * (log_ps - log_pt)) / (b * c),
    }
    return {"terms": terms, "total": total, "wrong": wrong, "g": g, "z_p": z_p}


@pytest.fixture(scope="module")
def result(method, prompt, clip, tiny_task, batch):
    return jax.jit(method.loss)(prompt, clip, tiny_task, batch, jax.random.key(0))


def test_each_term_and_total_equal_numpy(result, reference):
    total, metrics = result
    assert set(metrics) == {"ce", "kl", "l1_text", "l1_image", "accuracy"}
    for name, want in reference["terms"].items():
        np.testing.assert_allclose(metrics[name], want, rtol=RTOL, atol=ATOL, err_msg=name)
        assert name == "accuracy" or float(metrics[name]) > 1e-4, f"{name} is trivially 0"
    np.testing.assert_allclose(total, reference["total"], rtol=RTOL, atol=ATOL)


def test_kl_is_frozen_to_prompted_over_b_times_c(result, reference):
    kl = float(result[1]["kl"])
    for name, wrong in reference["wrong"].items():
        assert abs(kl - wrong) > 1e-2 * abs(wrong), f"kl matches the wrong variant {name}"


@pytest.mark.slow
def test_weights_scale_the_terms(prompt, clip, tiny_task, batch, result):
    m = jp.methods.get("promptsrc", depth=2, w_text=1.0, w_image=2.0, w_kl=3.0)
    total, metrics = jax.jit(m.loss)(prompt, clip, tiny_task, batch, jax.random.key(0))
    want = metrics["ce"] + 3 * metrics["kl"] + metrics["l1_text"] + 2 * metrics["l1_image"]
    np.testing.assert_allclose(total, want, rtol=1e-6)
    for k, v in result[1].items():  # the unweighted terms do not depend on the weights
        np.testing.assert_allclose(metrics[k], v, rtol=1e-6)


def test_teacher_text_features_equal_hf(reference, clip, tiny_task):
    for chunk in (None, 7):  # 300 sequences: chunked with a ragged last chunk, and at once
        g = teacher_text_features(clip, tiny_task, chunk=chunk)
        np.testing.assert_allclose(g, reference["g"], atol=ATOL)


@pytest.mark.slow
def test_gradient_routing(method, prompt, clip, tiny_task, batch):
    """L1 text touches only text prompts, L1 image only vision prompts; CE and KL touch both."""

    def terms(p):
        metrics = method.loss(p, clip, tiny_task, batch, jax.random.key(0))[1]
        return {k: metrics[k] for k in ("ce", "kl", "l1_text", "l1_image")}

    jac = jax.jit(jax.jacrev(terms))(prompt)  # one compile: {term: {prompt group: grad}}
    mags = {t: {k: float(jnp.abs(g).sum()) for k, g in d.items()} for t, d in jac.items()}
    for k in VISION:
        assert mags["l1_text"][k] == 0.0 and mags["l1_image"][k] > 0, k
    for k in TEXT:
        assert mags["l1_image"][k] == 0.0 and mags["l1_text"][k] > 0, k
    for t in ("ce", "kl"):
        assert all(v > 0 for v in mags[t].values()), t


def test_precomputed_teacher_paths_equal_inline(method, prompt, clip, tiny_task, batch, result):
    key = jax.random.key(0)
    g = teacher_text_features(clip, tiny_task)
    via_batch = jax.jit(method.loss)(prompt, clip, tiny_task, {**batch, "teacher_text": g}, key)
    cached = with_teacher(method, clip, tiny_task)
    assert cached.name == "promptsrc" and cached.config == method.config
    via_cache = jax.jit(cached.loss)(prompt, clip, tiny_task, batch, key)
    for other in (via_batch, via_cache):
        np.testing.assert_allclose(other[0], result[0], rtol=1e-6)
    # A batch teacher of the wrong size is a clear error, not a broadcast.
    with pytest.raises(ValueError, match="teacher_text"):
        jax.eval_shape(method.loss, prompt, clip, tiny_task, {**batch, "teacher_text": g[:2]}, key)
    # The trainer's hook is the same cache: trainers call method.prepare, never with_teacher.
    prepared = method.prepare(clip, tiny_task)
    assert prepared.prepare is None and prepared.config == method.config
    assert prepared.aggregator is not None  # preparing keeps GPA
    via_hook = jax.jit(prepared.loss)(prompt, clip, tiny_task, batch, key)
    np.testing.assert_allclose(via_hook[0], result[0], rtol=1e-6)


def test_gpa_is_the_methods_aggregator_hook(method):
    """PromptSRC declares its GPA for trainers; methods without one declare none."""
    agg, ref = method.aggregator(20), gpa_aggregator(method, num_epochs=20)
    prompt = {"ctx": jnp.ones((2, 3))}
    state, state_ref = agg.init(prompt), ref.init(prompt)
    for epoch in range(1, 21):
        p = jax.tree.map(lambda x: x * epoch, prompt)  # noqa: B023 - used at once
        state = agg.update(state, p, jnp.asarray(epoch))
        state_ref = ref.update(state_ref, p, jnp.asarray(epoch))
    np.testing.assert_allclose(agg.result(state)["ctx"], ref.result(state_ref)["ctx"])
    # Gaussian around epoch 15 (std 1): the aggregate is close to 15x the unit prompt.
    assert 14.0 < float(agg.result(state)["ctx"][0, 0]) < 16.0
    for other in ("coop", "ivlp", "maple", "cocoop"):
        m = jp.methods.get(other)
        assert m.prepare is None and m.aggregator is None


@pytest.mark.slow
def test_cached_teacher_falls_back_on_another_task(prompt, clip, tiny_task, new_task, batch):
    # One template keeps the inline teacher cheap; the cache must not leak across class sets.
    method = jp.methods.get("promptsrc", depth=2, templates="single")
    cached = with_teacher(method, clip, tiny_task)
    b = {"image": batch["image"], "label": np.array([0, 1, 2, 0], np.int32)}
    key = jax.random.key(0)
    got = jax.jit(cached.loss)(prompt, clip, new_task, b, key)[1]["l1_text"]
    want = jax.jit(method.loss)(prompt, clip, new_task, b, key)[1]["l1_text"]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_eval_logits_are_the_prompted_path_only(method, prompt, clip, tiny_task, batch, reference):
    """Evaluation is IVLP's prompted forward: no teacher, no templates, no frozen logits."""
    logits = jax.jit(method.logits)(prompt, clip, tiny_task, batch["image"])
    np.testing.assert_allclose(logits, reference["z_p"], rtol=RTOL, atol=1e-3)
    # Evaluation can encode the class set once (the text side does not see the image).
    assert method.encode_classes is not None and method.classify is not None


def test_base_to_new(method, prompt, clip, new_task, images):
    logits = jax.jit(method.logits)(prompt, clip, new_task, images)
    assert logits.shape == (4, len(new_task)) and np.all(np.isfinite(logits))


def test_short_text_context_keeps_the_rest_of_the_init_words(clip, tiny_task):
    # n_ctx_text=2 with "a photo of a" (spec 12, as in the reference's prompt learner): the
    # context starts at the embeddings of "a photo" and the prompted text tower (what the CE,
    # KL and text L1 terms all use) reads "a photo of a <name>." with positions 1..2 learned.
    method = jp.methods.get("promptsrc", depth=2, n_ctx_text=2)
    p = method.init(jax.random.key(0), clip, tiny_task)
    table = np.asarray(clip.params["text_model"]["embeddings"]["token_embedding"]["embedding"])
    words = clip.tokenizer(["a photo of a"])["input_ids"][0][1:-1]
    np.testing.assert_array_equal(p["ctx"], table[words[:2]])
    keys = iter(jax.random.split(jax.random.key(3), 4))
    moved = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape), p)
    got = jax.jit(method.encode_classes)(moved, clip, tiny_task)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), moved)
    ids, _ = clip_lib.tokenize(clip, [f"a photo of a {c}." for c in CLASSNAMES])
    want = np_text(clip, ids, ctx=q["ctx"], deep=q["deep_text"])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_config_carries_gpa_and_defaults():
    m = jp.methods.get("promptsrc")
    cfg = m.config
    assert (cfg["depth"], cfg["n_ctx_text"], cfg["n_ctx_vision"]) == (9, 4, 4)
    assert (cfg["w_text"], cfg["w_image"], cfg["w_kl"]) == (25.0, 10.0, 1.0)
    assert cfg["templates"] == list(templates.PROMPTSRC_60) and len(cfg["templates"]) == 60
    assert (cfg["gpa_mean"], cfg["gpa_std"]) == (15.0, 1.0)
    agg = gpa_aggregator(m, num_epochs=20)
    want = gpa.gaussian_weights(mean=15.0, std=1.0, num_epochs=20)
    state = agg.init({"x": jnp.zeros(())})
    for epoch in range(1, 21):  # prompt value = epoch number, so the result is sum_e w_e * e
        state = agg.update(state, {"x": jnp.float32(epoch)}, epoch)
    np.testing.assert_allclose(agg.result(state)["x"], np.sum(want * np.arange(1, 21)), rtol=1e-5)
    assert jp.methods.get("promptsrc", templates="single").config["templates"] == [
        "a photo of a {}."
    ]


def test_bad_arguments_are_clear_errors(clip, tiny_task):
    with pytest.raises(ValueError, match="depth"):
        jp.methods.get("promptsrc", depth=0)
    with pytest.raises(ValueError, match="depth"):
        jp.methods.get("promptsrc", depth=3).init(jax.random.key(0), clip, tiny_task)
    with pytest.raises(ValueError, match="template"):
        jp.methods.get("promptsrc", templates="nope")


@pytest.mark.slow
def test_cached_teacher_in_the_sharded_train_step(method, clip, tiny_task):
    """with_teacher's constant works in the trainer's step on 8 devices and changes nothing."""
    from jaxprompt import sharding, train

    mesh = sharding.make_mesh()
    tx = train.make_optimizer(0.01)
    clip_s, task_s = sharding.shard_clip(clip, mesh), sharding.replicate(tiny_task, mesh)
    r = np.random.RandomState(0)
    batch = sharding.put_batch(
        {
            "image": r.randn(8, 32, 32, 3).astype(np.float32),
            "label": (np.arange(8) % 5).astype(np.int32),
        },
        mesh,
    )
    key = sharding.replicate(jax.random.key(3), mesh)
    out = []
    for m in (method, with_teacher(method, clip, tiny_task)):
        state = sharding.replicate(
            train.init_train_state(m, tx, jax.random.key(0), clip, tiny_task), mesh
        )
        state, metrics = jax.jit(train.make_train_step(m, tx))(state, clip_s, task_s, batch, key)
        out.append((state.prompt, metrics["loss"]))
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-6)
    # Rounding of the two steps' gradients is relative to the leaf's scale, not to each entry:
    # an entry near 0 (here -0.005 in a leaf up to 0.4) differed by 1.8e-7 on one CPU.
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[0][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
