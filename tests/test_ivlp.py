"""IVLP: initialisation, and the method's wiring against the spec-written NumPy forward.

Where the prompt tokens go inside each tower is tested in ``test_clip`` against the NumPy
reference; here the reference checks that IVLP hands the right tensor to the right place:
``ctx`` at text positions 1..n_t of "a photo of a <name>.", ``deep_text[i]`` before text layer
i + 1, ``vision_ctx`` appended after the patches, ``deep_vision[i]`` before vision layer i + 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLASSNAMES
from test_clip import np_image, np_text
from test_promptsrc import sharpened

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt.methods import base


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return sharpened(tiny_clip)


def _moved(prompt, scale=0.3, seed=1):
    keys = jax.random.split(jax.random.key(seed), len(prompt))
    return {
        k: v + scale * jax.random.normal(kk, v.shape)
        for (k, v), kk in zip(sorted(prompt.items()), keys, strict=True)
    }


def test_init_shapes_and_values(clip, tiny_task):
    method = jp.methods.get("ivlp", depth=2)
    p = method.init(jax.random.key(0), clip, tiny_task)
    dt, dv = clip.spec.text_width, clip.spec.vision_width
    assert jax.tree.map(jnp.shape, p) == {
        "ctx": (4, dt),
        "vision_ctx": (4, dv),
        "deep_text": (1, 4, dt),
        "deep_vision": (1, 4, dv),
    }
    # The text context starts at the words "a photo of a" (4 tokens = n_ctx_text).
    np.testing.assert_array_equal(p["ctx"], base.word_embeddings(clip, "a photo of a"))
    # Everything else is N(0, 0.02^2).
    rest = np.concatenate([np.ravel(p[k]) for k in ("vision_ctx", "deep_text", "deep_vision")])
    assert 0.015 < rest.std() < 0.025 and abs(rest.mean()) < 0.005
    # Parameter count: depth x (n_t D_t + n_v D_v); 46,080 at ViT-B/16 widths (spec 2.4).
    assert sum(x.size for x in jax.tree.leaves(p)) == 2 * (4 * dt + 4 * dv)
    assert 9 * (4 * 512 + 4 * 768) == 46_080


def _text_tower_inputs(monkeypatch, method, prompt, clip, task):
    """The (embeds, eot) that ``method.encode_classes`` hands to the text tower.

    With the prefix-shared encoder the sequence it stands for is the shared prefix in front of
    every class's suffix.
    """
    seen = {}
    real, real_shared = clip_lib.encode_text, clip_lib.encode_text_shared

    def spy(clip_, embeds, eot, **kwargs):
        seen["embeds"], seen["eot"] = np.asarray(embeds), np.asarray(eot)
        return real(clip_, embeds, eot, **kwargs)

    def spy_shared(clip_, prefix, suffix, eot, **kwargs):
        pre = np.broadcast_to(np.asarray(prefix), (suffix.shape[0],) + prefix.shape)
        seen["embeds"] = np.concatenate([pre, np.asarray(suffix)], axis=1)
        seen["eot"] = np.asarray(eot)
        return real_shared(clip_, prefix, suffix, eot, **kwargs)

    for module in (clip_lib, clip_lib.text):  # methods' calls and prompted_text_features'
        monkeypatch.setattr(module, "encode_text", spy)
        monkeypatch.setattr(module, "encode_text_shared", spy_shared)
    method.encode_classes(prompt, clip, task)
    return seen["embeds"], seen["eot"]


def _reference_inputs(clip, texts, ctx):
    """Independent construction: the tokenizer's ids of the full sentences, looked up in CLIP's
    token table, with ``ctx`` written over positions 1..n (right after the start token)."""
    rows = clip.tokenizer(texts)["input_ids"]
    ids = np.full((len(rows), max(map(len, rows))), clip.spec.eot_id)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    table = np.asarray(clip.params["text_model"]["embeddings"]["token_embedding"]["embedding"])
    want = table[ids]
    want[:, 1 : 1 + len(ctx)] = ctx
    return want, np.array([len(r) - 1 for r in rows])


def test_fewer_ctx_than_init_words_keep_the_rest_as_fixed_words(clip, tiny_task, monkeypatch):
    # The reference (spec 12; IVLP's prompt learner does the same) with n_t = 2 and
    # "a photo of a": the context starts at "a photo", and "of a" stay as fixed tokens, so the
    # text tower still reads "a photo of a <name>." with positions 1..2 learnable.
    method = jp.methods.get("ivlp", depth=2, n_ctx_text=2)
    p = method.init(jax.random.key(0), clip, tiny_task)
    dt = clip.spec.text_width
    assert p["ctx"].shape == (2, dt) and p["deep_text"].shape == (1, 2, dt)
    words = clip.tokenizer(["a photo of a"])["input_ids"][0][1:-1]
    assert len(words) == 4
    table = np.asarray(clip.params["text_model"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(p["ctx"], table[words[:2]])

    prompt = _moved(p)
    embeds, eot = _text_tower_inputs(monkeypatch, method, prompt, clip, tiny_task)
    want, want_eot = _reference_inputs(
        clip, [f"a photo of a {c}." for c in CLASSNAMES], np.asarray(prompt["ctx"])
    )
    np.testing.assert_array_equal(embeds, want)
    np.testing.assert_array_equal(eot, want_eot)


def test_more_ctx_than_init_words_is_random_without_fixed_words(clip, tiny_task, monkeypatch):
    # 6 slots, 4 init tokens: the reference draws N(0, 0.02^2) behind "X X X X X X <name>.".
    method = jp.methods.get("ivlp", depth=1, n_ctx_text=6)
    p = method.init(jax.random.key(0), clip, tiny_task)
    assert p["ctx"].shape == (6, clip.spec.text_width)
    assert 0.015 < float(jnp.std(p["ctx"])) < 0.025  # not the word embeddings
    embeds, eot = _text_tower_inputs(monkeypatch, method, p, clip, tiny_task)
    want, want_eot = _reference_inputs(
        clip, [f"X X X X X X {c}." for c in CLASSNAMES], np.asarray(p["ctx"])
    )
    np.testing.assert_array_equal(embeds, want)
    np.testing.assert_array_equal(eot, want_eot)


@pytest.mark.parametrize("depth, n_ctx_text", [(1, 4), (2, 4), (2, 2)])
def test_logits_and_loss_equal_numpy_reference(clip, tiny_task, batch, depth, n_ctx_text):
    # With n_ctx_text=2 the NumPy reference tokenizes the same full sentence and replaces
    # positions 1..2 only, so "of a" must reach the tower as fixed words.
    method = jp.methods.get("ivlp", depth=depth, n_ctx_text=n_ctx_text)
    prompt = _moved(method.init(jax.random.key(0), clip, tiny_task))
    logits = jax.jit(method.logits)(prompt, clip, tiny_task, batch["image"])
    loss, metrics = jax.jit(method.loss)(prompt, clip, tiny_task, batch, jax.random.key(0))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), prompt)
    deep_t = p["deep_text"] if depth > 1 else None
    deep_v = p["deep_vision"] if depth > 1 else None
    ids, _ = clip_lib.tokenize(clip, [f"a photo of a {c}." for c in CLASSNAMES])
    txt = _norm(np_text(clip, ids, ctx=p["ctx"], deep=deep_t))
    img = _norm(np_image(clip, batch["image"], prompts=p["vision_ctx"], deep=deep_v))
    want = 100.0 * img @ txt.T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-3)
    z = want - want.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.mean(logp[np.arange(len(batch["label"])), batch["label"]])
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    assert set(metrics) == {"ce", "accuracy"}
    # The prompts matter in both towers (guards the reference comparison above).
    plain = 100.0 * _norm(np_image(clip, batch["image"])) @ txt.T
    assert np.abs(plain - want).max() > 1e-2


def test_encode_classes_then_classify_equals_logits(clip, tiny_task, new_task, images):
    method = jp.methods.get("ivlp", depth=2)
    prompt = _moved(method.init(jax.random.key(0), clip, tiny_task))

    @jax.jit
    def both(p, x):
        classes = method.encode_classes(p, clip, new_task)
        return method.classify(p, clip, classes, x), method.logits(p, clip, new_task, x)

    split, logits = both(prompt, images)
    assert logits.shape == (4, len(new_task))  # base -> new: the prompt is class-agnostic
    np.testing.assert_allclose(split, logits, rtol=1e-6)


def test_depth_errors(clip, tiny_task):
    with pytest.raises(ValueError, match="depth"):
        jp.methods.get("ivlp", depth=0)
    with pytest.raises(ValueError, match="depth 3 does not fit"):
        jp.methods.get("ivlp", depth=3).init(jax.random.key(0), clip, tiny_task)
    assert jp.methods.get("ivlp").config["depth"] == 9
