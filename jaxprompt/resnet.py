"""OpenAI CLIP's modified ResNet image tower (RN50, RN101, RN50x4, ...), frozen, in plain JAX.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (arXiv
2103.00020), section 2.4, change torchvision's ResNet in three ways, all reproduced here:

* a stem of three 3x3 convolutions (stride 2, 1, 1; widths w/2, w/2, w) each followed by
  BatchNorm and ReLU, then a 2x2 average pool, instead of one 7x7 convolution and a max pool;
* anti-aliased downsampling: a strided bottleneck keeps its convolutions at stride 1 and
  average-pools (kernel = stride) after its 3x3 convolution, and its shortcut average-pools
  before its 1x1 projection;
* an attention-pooling head instead of global average pooling: the mean of the final feature
  map is prepended to its flattened positions, a learned positional embedding is added, and one
  multi-head attention layer with the mean as its only query gives the image feature, whose
  output projection maps to the joint embedding (no separate visual projection).

The towers are frozen, so BatchNorm runs in inference mode with the checkpoint's running
statistics; :func:`fold_batchnorm` turns each (gamma, beta, mean, var) into a per-channel
``mean``, ``scale`` and ``bias`` at load time, applied as ``(x - mean) * scale + bias``. No batch
statistics are ever computed.

Parameters (``clip.params["vision_model"]`` for a ResNet CLIP), kernels in HWIO / [in, out]:
``stem/{conv1,conv2,conv3}/kernel``, ``stem/{bn1,bn2,bn3}/{mean,scale,bias}``;
``layer{1..4}/<block>/{conv1,conv2,conv3}/kernel``, ``.../{bn1,bn2,bn3}/{mean,scale,bias}``
and, where the block changes the shape, ``.../downsample/{conv/kernel, bn/{mean,scale,bias}}``;
``attnpool/positional_embedding`` [S*S + 1, C] and ``attnpool/{q,k,v,c}_proj/{kernel,bias}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import transformer as tfm

Array = jax.Array
PyTree = Any

__all__ = ["BN_EPS", "encode", "fold_batchnorm"]

# torch.nn.BatchNorm2d's default, which OpenAI's ResNets use.
BN_EPS = 1e-5
# The stem halves the resolution twice (stride-2 conv, 2x2 pool), each later stage once more.
DOWNSAMPLING = 32


def fold_batchnorm(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, *, eps: float = BN_EPS
) -> dict[str, np.ndarray]:
    """Inference-mode BatchNorm ``gamma (x - mean) / sqrt(var + eps) + beta`` as ``(x - mean) *
    scale + bias``: ``scale = gamma / sqrt(var + eps)`` (computed in float64), ``bias = beta``,
    float32.

    The mean is kept rather than folded into the bias (``x * scale + (beta - mean * scale)``)
    because of the channels real checkpoints have with a running variance near 0 and a mean
    far from it: their activations sit close to the mean, so ``x * scale`` and the folded bias
    are two large numbers that cancel, and float32 loses the output to their rounding (about
    4e-4 absolute on outputs of size 4 for variances 1e-6..1e-3 and means 5..20). ``x - mean``
    of two nearby float32 numbers is exact, so the subtraction first leaves only the rounding
    of an O(1) product and sum.
    """
    g, b, m, v = (np.asarray(a, np.float64) for a in (gamma, beta, mean, var))
    scale = g / np.sqrt(v + eps)
    return {
        "mean": m.astype(np.float32),
        "scale": scale.astype(np.float32),
        "bias": b.astype(np.float32),
    }


def _conv(x: Array, p: PyTree, *, stride: int = 1) -> Array:
    k = p["kernel"]
    pad = (k.shape[0] - 1) // 2  # OpenAI's 3x3 convolutions pad by 1, the 1x1 ones by 0
    return jax.lax.conv_general_dilated(
        x,
        k.astype(x.dtype),
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _bn(x: Array, p: PyTree) -> Array:
    # Subtract first (fold_batchnorm says why): exact for activations near the running mean.
    return (x - p["mean"].astype(x.dtype)) * p["scale"].astype(x.dtype) + p["bias"].astype(x.dtype)


def _avg_pool(x: Array, k: int) -> Array:
    """``nn.AvgPool2d(k)``: kernel = stride = k, no padding; a ragged edge is dropped."""
    if k == 1:
        return x
    # A Python 0.0 start lets JAX see a windowed sum, which it can differentiate.
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k, 1), (1, k, k, 1), "VALID")
    return s / jnp.asarray(k * k, x.dtype)


def _bottleneck(p: PyTree, x: Array, stride: int) -> Array:
    out = jax.nn.relu(_bn(_conv(x, p["conv1"]), p["bn1"]))
    out = jax.nn.relu(_bn(_conv(out, p["conv2"]), p["bn2"]))
    out = _bn(_conv(_avg_pool(out, stride), p["conv3"]), p["bn3"])
    shortcut = x
    if "downsample" in p:
        d = p["downsample"]
        shortcut = _bn(_conv(_avg_pool(x, stride), d["conv"]), d["bn"])
    return jax.nn.relu(out + shortcut)


def _attention_pool(p: PyTree, x: Array, heads: int) -> Array:
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)  # row-major positions, as PyTorch's flatten of NCHW
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    pos = p["positional_embedding"]
    if pos.shape[0] != tokens.shape[1]:
        raise ValueError(
            f"the attention pool was trained on {pos.shape[0] - 1} positions but the image gives "
            f"{h}x{w}: feed images of the checkpoint's size"
        )
    tokens = tokens + pos.astype(x.dtype)

    # One query, the mean token, over all positions: no mask, nothing causal. The shared
    # helper scales by 1/sqrt(d) and takes the softmax in float32 whatever the compute dtype.
    q = tfm.split_heads(tfm.dense(tokens[:, :1], p["q_proj"], x.dtype), heads)
    k = tfm.split_heads(tfm.dense(tokens, p["k_proj"], x.dtype), heads)
    v = tfm.split_heads(tfm.dense(tokens, p["v_proj"], x.dtype), heads)
    o = tfm.attention(q, k, v, causal=False).reshape(b, c)
    return tfm.dense(o, p["c_proj"], x.dtype)


def encode(
    params: PyTree, images: Array, *, layers: Sequence[int], heads: int, remat: bool = False
) -> Array:
    """Image features of the modified ResNet.

    Args:
      params: the tower's parameters (module docstring), BatchNorm folded.
      images: [B, H, W, 3] NHWC in the compute dtype, normalised with the CLIP mean and std;
        H and W are the checkpoint's image size.
      layers: bottleneck blocks per stage (RN50: (3, 4, 6, 3)).
      heads: attention heads of the pooling head (OpenAI: stem width * 32 // 64).
      remat: rematerialise each bottleneck in the backward pass (only gradients into the
        frozen weights, as in POUF's weight tuning, pass through the tower).

    Returns:
      [B, E] image features in the compute dtype, not normalised.
    """
    stem = params["stem"]
    x = images
    for i, stride in ((1, 2), (2, 1), (3, 1)):
        x = jax.nn.relu(_bn(_conv(x, stem[f"conv{i}"], stride=stride), stem[f"bn{i}"]))
    x = _avg_pool(x, 2)
    block = jax.checkpoint(_bottleneck, static_argnums=(2,)) if remat else _bottleneck
    for stage, n in enumerate(layers):
        blocks = params[f"layer{stage + 1}"]
        for j in range(n):
            x = block(blocks[str(j)], x, 2 if stage > 0 and j == 0 else 1)
    return _attention_pool(params["attnpool"], x, heads)
