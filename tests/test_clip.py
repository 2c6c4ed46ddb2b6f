"""The frozen encoders: equal to transformers' PyTorch CLIPModel, and prompts placed exactly.

The prompt-placement tests run an independent NumPy forward of the tiny CLIP written from the
spec (promptsrc.md sections 2 and 9), not from our code, so each of these mistakes fails a test:
vision prompts inserted before the patches or given a positional embedding or skipping ln_pre;
deep vision prompts replacing the first instead of the last tokens; text context without
positional embedding, or deep text prompts with one; depth counted without the input layer;
prompt positions dropped after the prompt depth; deep prompts added instead of replacing.
"""

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLASSNAMES, TINY_WORDS

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import testing

ATOL = 1e-5


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory):
    """A 3-layer tiny CLIP saved by PyTorch transformers as safetensors."""
    d = tmp_path_factory.mktemp("tiny_clip_pt")
    return testing.save_random_clip(
        d, words=TINY_WORDS, seed=3, weights="safetensors", text_layers=3, vision_layers=3
    )


@pytest.fixture(scope="module")
def pt_clip(pt_dir):
    return jp.load_clip(pt_dir)


def _np_params(clip):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), clip.params)


# --------------------------------------------------------------------------- NumPy reference


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _block(x, p, heads, causal):
    """One pre-LN CLIP block on [N, L, D] in float64."""
    n, length, d = x.shape
    hd = d // heads
    h = _ln(x, p["layer_norm1"])
    a = p["self_attn"]
    q = _dense(h, a["q_proj"]).reshape(n, length, heads, hd) * hd**-0.5
    k = _dense(h, a["k_proj"]).reshape(n, length, heads, hd)
    v = _dense(h, a["v_proj"]).reshape(n, length, heads, hd)
    s = np.einsum("nqhd,nkhd->nhqk", q, k)
    if causal:
        s = s + np.triu(np.full((length, length), -1e30), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    w = s / s.sum(-1, keepdims=True)
    o = np.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, length, d)
    x = x + _dense(o, a["out_proj"])
    h = _ln(x, p["layer_norm2"])
    h = _dense(h, p["mlp"]["fc1"])
    h = h / (1 + np.exp(-1.702 * h))  # QuickGELU
    return x + _dense(h, p["mlp"]["fc2"])


def np_text(clip, ids, ctx=None, deep=None):
    """Reference text features: ids [N, L] from tokenizing '<SOT> w_1..w_n name . <EOT>'.

    ``ctx`` [n, D] replaces the embeddings at positions 1..n (it gets positions like words);
    ``deep[i]`` overwrites positions 1..n of the residual stream entering layer i + 1.
    """
    p = _np_params(clip)["text_model"]
    heads = 4
    tok = p["embeddings"]["token_embedding"]["embedding"][ids]
    if ctx is not None:
        tok[:, 1 : 1 + len(ctx)] = ctx
    x = tok + p["embeddings"]["position_embedding"]["embedding"][: ids.shape[1]]
    layers = p["encoder"]["layers"]
    for i in range(len(layers)):
        if deep is not None and 1 <= i <= len(deep):
            x[:, 1 : 1 + deep.shape[1]] = deep[i - 1]
        x = _block(x, layers[str(i)], heads, causal=True)
    eot = (ids == clip.spec.eot_id).argmax(-1)
    pooled = _ln(x[np.arange(len(ids)), eot], p["final_layer_norm"])
    return pooled @ np.asarray(clip.params["text_projection"]["kernel"], np.float64)


def np_image(clip, images, prompts=None, deep=None):
    """Reference image features for NHWC images, prompts appended after CLS + patches."""
    p = _np_params(clip)["vision_model"]
    heads = 4
    b, hh, ww, _ = images.shape
    e = p["embeddings"]
    kern = e["patch_embedding"]["kernel"]  # [ps, ps, 3, D]
    ps = kern.shape[0]
    g = hh // ps
    patches = (
        images.astype(np.float64)
        .reshape(b, g, ps, g, ps, 3)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(b, g * g, ps * ps * 3)
    )
    x = patches @ kern.reshape(ps * ps * 3, -1)
    cls = np.broadcast_to(e["class_embedding"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], 1) + e["position_embedding"]["embedding"]
    if prompts is not None:
        x = np.concatenate([x, np.broadcast_to(prompts, (b,) + prompts.shape)], 1)
    x = _ln(x, p["pre_layrnorm"])
    layers = p["encoder"]["layers"]
    for i in range(len(layers)):
        if deep is not None and 1 <= i <= len(deep):
            x[:, -deep.shape[1] :] = deep[i - 1]
        x = _block(x, layers[str(i)], heads, causal=False)
    pooled = _ln(x[:, 0], p["post_layernorm"])
    return pooled @ np.asarray(clip.params["visual_projection"]["kernel"], np.float64)


# --------------------------------------------------------------------------- equal to HF


# Random tiny configs: widths, heads, activations, depths and patch sizes all vary, so a tower
# that hard-codes any of them (QuickGELU, 4 heads, a patch of 8) fails one of these.
TORCH_CONFIGS = {
    "w32-h4-quick-2l-p8": dict(width=32, heads=4, act="quick_gelu", layers=2, patch=8, size=32),
    "w48-h3-gelu-3l-p16": dict(width=48, heads=3, act="gelu", layers=3, patch=16, size=32),
    "w64-h8-quick-4l-p4": dict(width=64, heads=8, act="quick_gelu", layers=4, patch=4, size=16),
}


@pytest.mark.parametrize("name", sorted(TORCH_CONFIGS))
def test_towers_equal_pytorch_clipmodel(tmp_path, name, images):
    """Text features, image features and logits of a CLIP saved by transformers' PyTorch
    ``CLIPModel`` (every weight perturbed, LayerNorms included), loaded through load_clip."""
    import torch
    import transformers

    c = TORCH_CONFIGS[name]
    vocab = testing.save_word_tokenizer(tmp_path, TINY_WORDS)
    tower = dict(
        hidden_size=c["width"], intermediate_size=4 * c["width"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], hidden_act=c["act"],
    )  # fmt: skip
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab, max_position_embeddings=77, bos_token_id=vocab - 2,
            eos_token_id=vocab - 1, pad_token_id=vocab - 1, **tower,
        ),
        vision_config=dict(image_size=c["size"], patch_size=c["patch"], **tower),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for prm in model.parameters():  # no LayerNorm at (1, 0), no bias at 0
            prm.add_(0.1 * torch.randn_like(prm))
    model.save_pretrained(tmp_path)
    clip = jp.load_clip(tmp_path)
    assert (clip.spec.text_heads, clip.spec.text_act) == (c["heads"], c["act"])
    texts = [f"a photo of a {n}." for n in CLASSNAMES] + ["itap of the striped zebra."]
    ids77, _ = clip_lib.tokenize(clip, texts, pad_to=77)
    ids, eot = clip_lib.tokenize(clip, texts)
    pix = np.asarray(jax.image.resize(images, (4, c["size"], c["size"], 3), "linear"))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids77, dtype=torch.long),
            pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2)),
        )
    ours_t = clip_lib.encode_token_ids(clip, jnp.asarray(ids), jnp.asarray(eot))
    ours_i = clip_lib.encode_image(clip, jnp.asarray(pix))
    np.testing.assert_allclose(ours_t, hf_reference.text_features(model, ids77), atol=ATOL)
    np.testing.assert_allclose(ours_i, hf_reference.image_features(model, pix), atol=ATOL)
    logits = clip_lib.logit_scale(clip) * clip_lib.normalize(ours_i) @ clip_lib.normalize(ours_t).T
    # Logits are scale x cosine with the scale about 16 here, so the features' 1e-5 becomes
    # about 1.6e-4 on them; measured 4-5e-6 on these configs, the tolerance 1e-4.
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=1e-4)


def test_no_prompt_encoders_equal_pytorch(pt_clip, pt_dir, images):
    import transformers

    model = transformers.CLIPModel.from_pretrained(pt_dir).eval()
    texts = [f"a photo of a {c}." for c in CLASSNAMES]
    ids77, eot77 = clip_lib.tokenize(pt_clip, texts, pad_to=77)
    ref_t = hf_reference.text_features(model, ids77)
    ref_i = hf_reference.image_features(model, images)
    ids, eot = clip_lib.tokenize(pt_clip, texts)  # truncated: must not matter
    np.testing.assert_allclose(
        clip_lib.encode_token_ids(pt_clip, jnp.asarray(ids), jnp.asarray(eot)), ref_t, atol=ATOL
    )
    np.testing.assert_allclose(clip_lib.encode_image(pt_clip, images), ref_i, atol=ATOL)
    # And our NumPy reference agrees with both, so it is a trustworthy oracle below.
    np.testing.assert_allclose(np_text(pt_clip, ids77), ref_t, atol=ATOL)
    np.testing.assert_allclose(np_image(pt_clip, images), ref_i, atol=ATOL)


def test_bin_weights_load_equal_safetensors(tmp_path, pt_clip, images):
    d = testing.save_random_clip(
        tmp_path, words=TINY_WORDS, seed=3, weights="bin", text_layers=3, vision_layers=3
    )
    clip_bin = jp.load_clip(d)
    np.testing.assert_array_equal(
        clip_lib.encode_image(clip_bin, images), clip_lib.encode_image(pt_clip, images)
    )


# --------------------------------------------------------------------------- prompt placement


def _ctx_and_deep(clip, n, depth, width, seed):
    rng = np.random.RandomState(seed)
    ctx = 0.1 * rng.randn(n, width).astype(np.float32)
    deep = 0.1 * rng.randn(depth - 1, n, width).astype(np.float32)
    return ctx, deep


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_text_prompts_match_numpy_reference(pt_clip, depth):
    """Shallow context at 1..n with positions; deep prompts replace 1..n before layer i."""
    task = jp.make_task(pt_clip, CLASSNAMES)
    n = 4
    ctx, deep = _ctx_and_deep(pt_clip, n, depth, pt_clip.spec.text_width, seed=depth)
    embeds, eot = clip_lib.prompted_text_inputs(pt_clip, task, jnp.asarray(ctx))
    ours = clip_lib.encode_text(pt_clip, embeds, eot, deep=jnp.asarray(deep) if depth > 1 else None)
    # The reference tokenizes the full string; "a photo of a" reserves the n context slots.
    ids, _ = clip_lib.tokenize(pt_clip, [f"a photo of a {c}." for c in CLASSNAMES])
    ref = np_text(pt_clip, ids, ctx=ctx, deep=deep if depth > 1 else None)
    np.testing.assert_allclose(ours, ref, atol=ATOL)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_image_prompts_match_numpy_reference(pt_clip, images, depth):
    n = 3
    ctx, deep = _ctx_and_deep(pt_clip, n, depth, pt_clip.spec.vision_width, seed=10 + depth)
    ours = clip_lib.encode_image(
        pt_clip,
        images,
        prompts=jnp.asarray(ctx),
        deep=jnp.asarray(deep) if depth > 1 else None,
    )
    ref = np_image(pt_clip, images, prompts=ctx, deep=deep if depth > 1 else None)
    np.testing.assert_allclose(ours, ref, atol=ATOL)


def test_prompts_change_the_features(pt_clip, images):
    """Guards the reference tests: prompts and deep prompts each have an effect."""
    n = 3
    ctx, deep = _ctx_and_deep(pt_clip, n, 3, pt_clip.spec.vision_width, seed=0)
    plain = np.asarray(clip_lib.encode_image(pt_clip, images))
    shallow = np.asarray(clip_lib.encode_image(pt_clip, images, prompts=jnp.asarray(ctx)))
    deep2 = np.asarray(
        clip_lib.encode_image(pt_clip, images, prompts=jnp.asarray(ctx), deep=jnp.asarray(deep))
    )
    assert np.abs(plain - shallow).max() > 1e-3
    assert np.abs(shallow - deep2).max() > 1e-3
    # The prompt before the last layer still matters (a random change: LayerNorm would hide a
    # constant shift).
    deep_b = deep.copy()
    deep_b[1] = np.random.RandomState(1).randn(*deep_b[1].shape)
    other = np.asarray(
        clip_lib.encode_image(pt_clip, images, prompts=jnp.asarray(ctx), deep=jnp.asarray(deep_b))
    )
    assert np.abs(other - deep2).max() > 1e-3


def test_per_sequence_deep_prompts_equal_shared(pt_clip):
    task = jp.make_task(pt_clip, CLASSNAMES)
    ctx, deep = _ctx_and_deep(pt_clip, 2, 3, pt_clip.spec.text_width, seed=5)
    embeds, eot = clip_lib.prompted_text_inputs(pt_clip, task, jnp.asarray(ctx))
    shared = clip_lib.encode_text(pt_clip, embeds, eot, deep=jnp.asarray(deep))
    per = jnp.broadcast_to(deep[:, None], (2, len(task), 2, deep.shape[-1]))
    np.testing.assert_allclose(clip_lib.encode_text(pt_clip, embeds, eot, deep=per), shared, 1e-6)


# --------------------------------------------------------------------------- EOT truncation


def _pad_to_context(clip, embeds, length=77):
    pad_id = jnp.full((embeds.shape[0], length - embeds.shape[1]), clip.spec.eot_id)
    return jnp.concatenate([embeds, clip_lib.embed_tokens(clip, pad_id)], axis=1)


def test_truncation_equals_full_context(pt_clip):
    names = ["cat", "a very very long striped golden retriever house", "x"]
    task = jp.make_task(pt_clip, names)
    ctx, deep = _ctx_and_deep(pt_clip, 4, 3, pt_clip.spec.text_width, seed=1)
    embeds, eot = clip_lib.prompted_text_inputs(pt_clip, task, jnp.asarray(ctx))
    assert embeds.shape[1] == int(eot.max()) + 1 < 77
    short = clip_lib.encode_text(pt_clip, embeds, eot, deep=jnp.asarray(deep))
    full = clip_lib.encode_text(pt_clip, _pad_to_context(pt_clip, embeds), eot, deep=deep)
    np.testing.assert_allclose(short, full, atol=ATOL)


def test_eot_positions_for_many_name_lengths(tiny_clip):
    names = ["x", "cat", "golden retriever", "the red striped dotted zebra fish", "q" * 9]
    task = jp.make_task(tiny_clip, names)
    ctx = clip_lib.embed_tokens(tiny_clip, jnp.zeros((4,), jnp.int32))
    _, eot = clip_lib.prompted_text_inputs(tiny_clip, task, ctx)
    for name, e in zip(names, np.asarray(eot), strict=True):
        full = tiny_clip.tokenizer(f"a photo of a {name}.")["input_ids"]
        assert full.index(tiny_clip.spec.eot_id) == e, name
    # name_len counts the name's tokens only.
    bare = [len(tiny_clip.tokenizer(n)["input_ids"]) - 2 for n in names]
    np.testing.assert_array_equal(task.name_len, bare)


def test_long_class_name_is_a_clear_error(tiny_clip):
    with pytest.raises(ValueError, match="shorten"):
        jp.make_task(tiny_clip, ["cat", "q w e r t y " * 20])
    task = jp.make_task(tiny_clip, ["q w e r t y " * 5])
    method = jp.methods.coop(n_ctx=60)
    with pytest.raises(ValueError, match="context"):
        method.init(jax.random.key(0), tiny_clip, task)


@pytest.mark.parametrize(
    "position,template", [("front", "{} a photo of a."), ("middle", "a photo {} of a.")]
)
def test_class_position(tiny_clip, position, template):
    """With ctx = embeddings of 'a photo of a', front/middle equal the tokenized sentence."""
    task = jp.make_task(tiny_clip, CLASSNAMES)
    ctx = jp.methods.base.word_embeddings(tiny_clip, "a photo of a")
    embeds, eot = clip_lib.prompted_text_inputs(tiny_clip, task, ctx, position=position)
    ids, ref_eot = clip_lib.tokenize(tiny_clip, [template.format(c) for c in CLASSNAMES])
    np.testing.assert_array_equal(eot, ref_eot)
    ref = clip_lib.encode_token_ids(tiny_clip, jnp.asarray(ids), jnp.asarray(ref_eot))
    np.testing.assert_allclose(clip_lib.encode_text(tiny_clip, embeds, eot), ref, atol=ATOL)


def test_chunked_encoding_equals_direct(tiny_clip):
    texts = [f"a photo of a {c}." for c in CLASSNAMES * 3]
    ids, eot = clip_lib.tokenize(tiny_clip, texts)
    direct = clip_lib.encode_token_ids(tiny_clip, jnp.asarray(ids), jnp.asarray(eot))
    chunked = clip_lib.encode_token_ids(tiny_clip, jnp.asarray(ids), jnp.asarray(eot), chunk=4)
    np.testing.assert_allclose(chunked, direct, atol=1e-6)


def test_nchw_images_are_rejected(tiny_clip, images):
    with pytest.raises(ValueError, match="NHWC"):
        clip_lib.encode_image(tiny_clip, images.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------- loading errors


def test_directory_without_weights_is_a_one_line_error(tmp_path):
    testing.save_word_tokenizer(tmp_path, ["cat"])
    with pytest.raises(jp.ClipLoadError, match="no CLIP weights") as e:
        jp.load_clip(tmp_path)
    assert "\n" not in str(e.value)


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(jp.ClipLoadError, match="local directory") as e:
        jp.load_clip("openai/clip-vit-base-patch16")
    assert "\n" not in str(e.value)


def test_unreachable_hub_fails_once_without_retries(monkeypatch, tmp_path, caplog):
    """No HF_HUB_OFFLINE, but nothing listens at the hub's address: the loader reads the local
    cache only (the hub client would otherwise retry for most of a minute)."""
    import logging

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    caplog.set_level(logging.WARNING)
    with pytest.raises(jp.ClipLoadError, match="hub is unreachable") as e:
        jp.load_clip("openai/clip-vit-base-patch16")
    assert "\n" not in str(e.value)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


def test_bfloat16_towers_stay_close(tiny_clip_dir, tiny_clip, images):
    clip16 = jp.load_clip(tiny_clip_dir, dtype="bfloat16")
    f32 = clip_lib.normalize(clip_lib.encode_image(tiny_clip, images))
    f16 = clip_lib.normalize(clip_lib.encode_image(clip16, images))
    assert f16.dtype == jnp.float32
    np.testing.assert_allclose(f16, f32, atol=0.05)
