"""CoCoOp: meta-net init, per-image prompts against NumPy, and batch B == B single images.

The reference runs one image at a time; ours vmaps the per-image text pass over the batch, so
the batch-4 logits and loss must equal four batch-1 calls. The NumPy side computes the
meta-net shift from the (independently computed) normalised image feature and feeds
``ctx + shift`` to ``test_clip``'s spec-written text forward.
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


# Hidden width E // 4 = 4: the default E // 16 is a single ReLU unit at the tiny embed dim of 16,
# which can be dead for every image and then hides the per-image shift.
RATIO = 4


@pytest.fixture(scope="module")
def method():
    return jp.methods.get("cocoop", n_ctx=4, meta_ratio=RATIO)


@pytest.fixture(scope="module")
def prompt(method, clip, tiny_task):
    p = method.init(jax.random.key(0), clip, tiny_task)
    # A larger meta-net output so the per-image shift visibly changes the text features.
    keys = iter(jax.random.split(jax.random.key(1), 5))
    return jax.tree.map(lambda v: v + 0.5 * jax.random.normal(next(keys), v.shape), p)


def test_init_shapes_and_values(method, clip, tiny_task):
    p = method.init(jax.random.key(0), clip, tiny_task)
    e, dt = clip.spec.embed_dim, clip.spec.text_width
    h = e // RATIO
    assert jax.tree.map(jnp.shape, p) == {
        "ctx": (4, dt),
        "meta_net": {
            "linear1": {"kernel": (e, h), "bias": (h,)},
            "linear2": {"kernel": (h, dt), "bias": (dt,)},
        },
    }
    np.testing.assert_array_equal(p["ctx"], base.word_embeddings(clip, "a photo of a"))
    # torch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    for name, fan_in in (("linear1", e), ("linear2", h)):
        for leaf in p["meta_net"][name].values():
            assert np.abs(leaf).max() <= 1 / np.sqrt(fan_in)
    with pytest.raises(ValueError, match="meta_ratio"):
        jp.methods.get("cocoop", meta_ratio=64).init(jax.random.key(0), clip, tiny_task)


def test_logits_equal_numpy_reference(method, prompt, clip, tiny_task, images):
    logits = jax.jit(method.logits)(prompt, clip, tiny_task, images)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), prompt)
    img = _norm(np_image(clip, images))  # [B, E]
    m = p["meta_net"]
    hidden = np.maximum(img @ m["linear1"]["kernel"] + m["linear1"]["bias"], 0.0)
    shift = hidden @ m["linear2"]["kernel"] + m["linear2"]["bias"]  # [B, D]
    ids, _ = clip_lib.tokenize(clip, [f"a photo of a {c}." for c in CLASSNAMES])
    txts = [_norm(np_text(clip, ids, ctx=p["ctx"] + shift[b])) for b in range(len(images))]
    want = np.stack([100.0 * t @ x for t, x in zip(txts, img, strict=True)])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-3)
    # Each image has its own text features (otherwise this would be CoOp).
    assert np.abs(txts[0] - txts[1]).max() > 1e-3


def test_batch_of_four_equals_four_single_images(method, prompt, clip, tiny_task, batch):
    logits_fn = jax.jit(method.logits)
    loss_fn = jax.jit(method.loss)
    key = jax.random.key(0)
    four = logits_fn(prompt, clip, tiny_task, batch["image"])
    loss4, _ = loss_fn(prompt, clip, tiny_task, batch, key)
    singles, losses = [], []
    for i in range(4):
        one = {"image": batch["image"][i : i + 1], "label": batch["label"][i : i + 1]}
        singles.append(logits_fn(prompt, clip, tiny_task, one["image"])[0])
        losses.append(loss_fn(prompt, clip, tiny_task, one, key)[0])
    # 1e-4 on logits of scale 100 is 1e-6 on the cosines: batch shapes change XLA's float32
    # reduction order, which moves a logit by ~1.5e-5 here.
    np.testing.assert_allclose(four, np.stack(singles), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(loss4, np.mean(losses), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_gradients_with_and_without_remat(prompt, clip, tiny_task, batch):
    grads = []
    for remat in (True, False):
        m = jp.methods.get("cocoop", meta_ratio=RATIO, remat=remat)
        grads.append(
            jax.jit(jax.grad(lambda q, m=m: m.loss(q, clip, tiny_task, batch, None)[0]))(prompt)
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads[0]):
        assert float(jnp.abs(leaf).sum()) > 0, path
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_base_to_new_and_no_split_encoding(method, prompt, clip, new_task, images):
    logits = jax.jit(method.logits)(prompt, clip, new_task, images)
    assert logits.shape == (4, len(new_task)) and np.all(np.isfinite(logits))
    # The text side depends on the image: there is no per-class-set encoding.
    assert method.encode_classes is None and method.classify is None


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_images_equal_the_whole_batch(prompt, clip, tiny_task, batch, chunk):
    """``chunk`` images per lax.map step (3 pads the batch of 4): same logits, loss, grads."""
    whole = jp.methods.get("cocoop", n_ctx=4, meta_ratio=RATIO)
    part = jp.methods.get("cocoop", n_ctx=4, meta_ratio=RATIO, chunk=chunk)
    assert part.config["chunk"] == chunk and whole.config["chunk"] is None
    key = jax.random.key(0)
    outs = []
    for m in (whole, part):
        logits = jax.jit(m.logits)(prompt, clip, tiny_task, batch["image"])
        value, grad = jax.jit(
            jax.value_and_grad(lambda q, m=m: m.loss(q, clip, tiny_task, batch, key)[0])
        )(prompt)
        outs.append((logits, value, grad))
    # Tolerances as for batch 4 against four single images: the group shapes change XLA's
    # float32 reduction order, which moves a logit (100 x cosine) by ~1e-5.
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(outs[0][1:]), jax.tree.leaves(outs[1][1:]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
