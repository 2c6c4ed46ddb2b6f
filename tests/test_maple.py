"""MaPLe: fixed init words, coupled vision prompts, parameter count, method wiring.

A tiny CLIP with DIFFERENT text and vision widths (32 and 48) is used so that a transposed or
misplaced projection kernel fails on shape or value. The NumPy reference is ``test_clip``'s
spec-written forward: the text side tokenizes the full sentence "a photo of a <name>." and lets
the context replace only positions 1..2 (so "of a" must be there as fixed tokens), and the
vision prompts given to it are the projections computed in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLASSNAMES, TINY_WORDS
from test_clip import np_image, np_text
from test_promptsrc import sharpened

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import testing
from jaxprompt.methods import base
from jaxprompt.methods.maple import maple_param_count, text_inputs, vision_prompts


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_clip_w48")
    saved = testing.save_random_clip(d, words=TINY_WORDS, preset="tiny", seed=1, vision_width=48)
    return sharpened(jp.load_clip(saved))


@pytest.fixture(scope="module")
def task(clip):
    return jp.make_task(clip, CLASSNAMES)


@pytest.fixture(scope="module")
def method():
    return jp.methods.get("maple", depth=2)


@pytest.fixture(scope="module")
def prompt(method, clip, task):
    p = method.init(jax.random.key(0), clip, task)
    keys = iter(jax.random.split(jax.random.key(1), 4))
    # Move every leaf off its initialisation so the reference comparison sees real tensors.
    return jax.tree.map(lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape), p)


def test_param_count_at_vit_b16_and_pytree_size(method, clip, task):
    # Independent arithmetic from the spec (section 12): 9 Linear(512 -> 768) with bias, the
    # 2 x 512 input context, and 8 deep 2 x 512 text prompts.
    linears = 9 * (512 * 768 + 768)
    prompts = 2 * 512 + 8 * (2 * 512)
    assert linears + prompts == 3_555_072
    count = maple_param_count(depth=9, n_ctx=2, text_width=512, vision_width=768)
    assert count == linears + prompts
    assert round(count / 1e6, 2) == 3.56 and abs(count - 3.55e6) < 0.01e6  # "~3.55M"
    # ~77x PromptSRC's 46,080 (spec 0).
    assert 77 <= count / 46_080 < 78
    p = method.init(jax.random.key(0), clip, task)
    dt, dv = clip.spec.text_width, clip.spec.vision_width
    assert jax.tree.map(jnp.shape, p) == {
        "ctx": (2, dt),
        "deep_text": (1, 2, dt),
        "proj": {"kernel": (2, dt, dv), "bias": (2, dv)},
    }
    size = sum(x.size for x in jax.tree.leaves(p))
    assert size == maple_param_count(depth=2, n_ctx=2, text_width=dt, vision_width=dv)


def test_init_values(method, clip, task):
    p = method.init(jax.random.key(0), clip, task)
    # The two learnable vectors start at "a photo"; the projections like torch nn.Linear.
    np.testing.assert_array_equal(p["ctx"], base.word_embeddings(clip, "a photo"))
    bound = 1 / np.sqrt(clip.spec.text_width)
    for leaf in jax.tree.leaves(p["proj"]):
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound
    assert 0.01 < float(jnp.std(p["deep_text"])) < 0.03


@pytest.fixture(scope="module")
def clip3(tmp_path_factory):
    """Three layers per tower: depth 3 has two deep projections to compare."""
    d = tmp_path_factory.mktemp("tiny_clip_3_layers")
    saved = testing.save_random_clip(
        d, words=TINY_WORDS, preset="tiny", seed=2, vision_width=48, text_layers=3, vision_layers=3
    )
    return jp.load_clip(saved)


def test_deep_projections_start_as_copies_of_one_linear(clip3):
    # The reference builds the input-level projection as its own nn.Linear and the deep ones
    # as deep copies of ONE further nn.Linear: proj[1] and proj[2] equal bit for bit, proj[0]
    # an independent draw; all with nn.Linear's U(-1/sqrt(in), 1/sqrt(in)).
    task3 = jp.make_task(clip3, CLASSNAMES)
    p = jp.methods.get("maple", depth=3).init(jax.random.key(0), clip3, task3)
    k, b = np.asarray(p["proj"]["kernel"]), np.asarray(p["proj"]["bias"])
    assert k.shape == (3, 32, 48) and b.shape == (3, 48)
    np.testing.assert_array_equal(k[1], k[2])
    np.testing.assert_array_equal(b[1], b[2])
    bound = 1 / np.sqrt(32)
    assert np.abs(k[0] - k[1]).max() > bound and np.abs(b[0] - b[1]).max() > 0.5 * bound
    for x in (k[0], k[1], b[0], b[1]):
        assert np.abs(x).max() <= bound
        assert abs(x.std() - bound / np.sqrt(3)) < 0.15 * bound  # the uniform's std
    # The copies are a fresh draw per key, not a constant.
    q = jp.methods.get("maple", depth=3).init(jax.random.key(1), clip3, task3)
    assert np.abs(np.asarray(q["proj"]["kernel"][1]) - k[1]).max() > bound


def test_fixed_words_and_eot(prompt, clip, task):
    embeds, eot = text_inputs(prompt, clip, task)
    ids, ref_eot = clip_lib.tokenize(clip, [f"a photo of a {c}." for c in CLASSNAMES])
    np.testing.assert_array_equal(eot, ref_eot)
    assert embeds.shape[1] == ids.shape[1]
    # Positions 1..2 are the learned context, 3..4 the frozen "of a", then the sentence.
    np.testing.assert_array_equal(embeds[:, 1:3], jnp.broadcast_to(prompt["ctx"], (5, 2, 32)))
    np.testing.assert_allclose(
        embeds[:, 3:], clip_lib.embed_tokens(clip, jnp.asarray(ids[:, 3:])), rtol=0, atol=0
    )


def test_vision_prompts_are_the_projections(prompt):
    vis, deep = vision_prompts(prompt)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), prompt)
    k, b = p["proj"]["kernel"], p["proj"]["bias"]
    np.testing.assert_allclose(vis, p["ctx"] @ k[0] + b[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deep[0], p["deep_text"][0] @ k[1] + b[1], rtol=1e-5, atol=1e-5)


def test_logits_and_loss_equal_numpy_reference(method, prompt, clip, task, batch):
    logits = jax.jit(method.logits)(prompt, clip, task, batch["image"])
    loss, metrics = jax.jit(method.loss)(prompt, clip, task, batch, jax.random.key(0))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), prompt)
    k, b = p["proj"]["kernel"], p["proj"]["bias"]
    ids, _ = clip_lib.tokenize(clip, [f"a photo of a {c}." for c in CLASSNAMES])
    txt = _norm(np_text(clip, ids, ctx=p["ctx"], deep=p["deep_text"]))
    vis = p["ctx"] @ k[0] + b[0]
    deep = (p["deep_text"][0] @ k[1] + b[1])[None]
    img = _norm(np_image(clip, batch["image"], prompts=vis, deep=deep))
    want = 100.0 * img @ txt.T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-3)
    z = want - want.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -np.mean(logp[np.arange(4), batch["label"]]), rtol=1e-5)
    assert set(metrics) == {"ce", "accuracy"}


@pytest.mark.slow
def test_gradient_reaches_every_group(method, prompt, clip, task, batch):
    g = jax.jit(jax.grad(lambda q: method.loss(q, clip, task, batch, None)[0]))(prompt)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert float(jnp.abs(leaf).sum()) > 0, path


def test_without_init_words_and_base_to_new(clip, task, images):
    method = jp.methods.get("maple", depth=1, init_words=None)
    p = method.init(jax.random.key(0), clip, task)
    assert p["deep_text"].shape == (0, 2, 32) and p["proj"]["kernel"].shape == (1, 32, 48)
    _, eot = text_inputs(p, clip, task, init_words=None)
    np.testing.assert_array_equal(eot, task.eot + 1 + 2)  # no fixed words
    new_task = jp.make_task(clip, ["tree", "bird", "blue car"])
    logits = jax.jit(method.logits)(p, clip, new_task, images)
    assert logits.shape == (4, 3) and np.all(np.isfinite(logits))


def test_depth_errors(clip, task):
    with pytest.raises(ValueError, match="depth"):
        jp.methods.get("maple", depth=0)
    with pytest.raises(ValueError, match="depth 3 does not fit"):
        jp.methods.get("maple", depth=3).init(jax.random.key(0), clip, task)
