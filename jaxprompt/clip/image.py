"""The CLIP image towers: the ViT (prompt-aware) and OpenAI's modified ResNet.

Vision prompts (Khattak et al., "Self-regulating Prompts", arXiv 2307.06948): ``[CLS]
<patches>`` plus positional embedding, then ``n_v`` learned tokens are *appended* (no positional
embedding) and the whole sequence goes through the pre-LayerNorm. Deep vision prompts replace the
*last* ``n_v`` tokens before layer ``i``. The feature is the CLS token after the post-LayerNorm,
times the visual projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprompt import resnet
from jaxprompt import transformer as tf
from jaxprompt.clip.model import Clip
from jaxprompt.clip.tokens import check_vision_prompts

Array = jax.Array


def _embed_patches(p, images: Array, patch: int) -> Array:
    """``[CLS] <patches>`` plus positions: the ViT's stride-``patch`` convolution (no bias) as one
    matmul over non-overlapping patches, row-major over the grid as the convolution's output."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh * gw, patch * patch * c)
    kernel = p["patch_embedding"]["kernel"]  # [patch, patch, c, D] (HWIO)
    x = x @ kernel.reshape(-1, kernel.shape[-1]).astype(x.dtype)
    cls = jnp.broadcast_to(p["class_embedding"].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + p["position_embedding"]["embedding"].astype(x.dtype)[None]


def encode_image(
    clip: Clip,
    images: Array,
    *,
    prompts: Array | None = None,
    deep: Array | None = None,
    remat: bool = False,
) -> Array:
    """Prompt-aware image tower: a ViT, or OpenAI's modified ResNet (:mod:`jaxprompt.resnet`,
    which takes no prompts).

    Args:
      clip: the frozen model.
      images: [B, H, W, 3] float32, NHWC, normalised with the CLIP mean and std.
      prompts: optional [n_v, Dv] or [B, n_v, Dv] tokens appended after CLS and patches (no
        positional embedding; they go through the pre-LayerNorm).
      deep: optional [J-1, n_v, Dv] or [J-1, B, n_v, Dv]; ``deep[i]`` replaces the last n_v
        tokens before layer i + 1. Requires ``prompts``.
      remat: rematerialise each block in the backward pass.

    Returns:
      [B, E] image features, float32, not normalised.
    """
    if deep is not None and prompts is None:
        raise ValueError("deep vision prompts need input-level prompts (the tokens they replace)")
    size = clip.spec.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images must be NHWC [B, {size}, {size}, 3] normalised with the CLIP mean/std, got "
            f"shape {tuple(images.shape)} (NCHW? use images.transpose(0, 2, 3, 1))"
        )
    params = clip.params["vision_model"]
    dt = jnp.dtype(clip.spec.dtype)
    if clip.spec.image_tower == "resnet":
        if prompts is not None:
            check_vision_prompts(clip)
        out = resnet.encode(
            params,
            images.astype(dt),
            layers=clip.spec.resnet_layers,
            heads=clip.spec.resnet_heads,
            remat=remat,
        )
        return out.astype(jnp.float32)
    s = clip.spec
    kw = dict(heads=s.vision_heads, act=s.vision_act, eps=s.vision_eps, dtype=dt)
    x = _embed_patches(params["embeddings"], images.astype(dt), s.patch_size)
    if prompts is not None:
        pr = prompts.astype(dt)
        if pr.ndim == 2:
            pr = jnp.broadcast_to(pr, (x.shape[0],) + pr.shape)
        x = jnp.concatenate([x, pr], axis=1)
    x = tf.layer_norm(x, params["pre_layrnorm"], eps=s.vision_eps, dtype=dt)

    def layer(p, x):
        return tf.encoder_block(p, x, causal=False, **kw)[0]

    def put(x, d):  # deep vision prompts replace the last n_v tokens
        return tf.put_tokens(x, d, x.shape[1] - d.shape[-2])

    x = tf.run_layers(
        layer, params["encoder"]["layers"], s.vision_layers, x, deep=deep, put=put, remat=remat
    )
    pooled = tf.layer_norm(x[:, 0], params["post_layernorm"], eps=s.vision_eps, dtype=dt)
    return tf.dense(pooled, clip.params["visual_projection"], dt).astype(jnp.float32)
