"""The pieces of the frozen transformers, as pure functions over Hugging Face's Flax parameter
layout (``{"kernel", "bias"}`` dense layers, ``{"scale", "bias"}`` LayerNorms).

The CLIP towers (:mod:`jaxprompt.clip`) and the masked LM of POUF's text variant
(:mod:`jaxprompt.side.mlm`) are written with these, so attention has one implementation: it goes
through ``jax.nn.dot_product_attention``, which an accelerator may run as a fused kernel (cuDNN
on GPU). Nothing here is trained: the parameters are frozen inputs, and gradients flow only to
the activations (the prompts).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

__all__ = [
    "ACTIVATIONS", "activation", "attention", "dense", "encoder_block", "layer_norm",
    "put_tokens", "run_layers", "split_heads",
]  # fmt: skip


def _quick_gelu(x: Array) -> Array:
    # OpenAI CLIP's approximation x * sigmoid(1.702 x).
    return x * jax.nn.sigmoid(1.702 * x)


# Hugging Face's names for the activations its CLIP and RoBERTa configs use. "gelu" is the exact
# (erf) GELU, as in PyTorch's default; "gelu_new" / "gelu_pytorch_tanh" the tanh approximation.
ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function a Hugging Face config names (``hidden_act``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def dense(x: Array, p: PyTree, dtype: Any) -> Array:
    """``x @ kernel + bias`` in the compute dtype (the kernel is ``[in, out]``; bias optional)."""
    y = x.astype(dtype) @ p["kernel"].astype(dtype)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def layer_norm(x: Array, p: PyTree, *, eps: float, dtype: Any) -> Array:
    """LayerNorm over the last axis. Statistics are taken in float32 (at least), as
    ``flax.linen.LayerNorm`` does, then the result is cast to the compute dtype."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(y.dtype) + p["bias"].astype(y.dtype)
    return y.astype(dtype)


def split_heads(x: Array, heads: int) -> Array:
    """``[..., L, D] -> [..., L, heads, D // heads]``."""
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    key_mask: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> Array:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v`` per head.

    Args:
      q: ``[B, T, H, d]`` queries (the last ``T`` positions of the sequence).
      k: ``[B, S, H, d]`` keys, ``S >= T``; with ``causal``, the queries are the last ``T`` of
        these ``S`` positions (the first ``S - T`` keys are an earlier, shared prefix that every
        query sees).
      v: ``[B, S, H, d]`` values.
      causal: query ``t`` sees keys ``0 .. S - T + t`` only.
      key_mask: optional ``[B, S]`` bool, False for keys no query may see (padding).
      dropout_rate: dropout on the attention probabilities, applied only with a
        ``dropout_key`` (training the masked LM of :mod:`jaxprompt.side.mlm`). One ``[T, S]``
        mask is shared by every batch row and head, as Hugging Face's Flax RoBERTa drew it
        (``broadcast_dropout=True``); kept probabilities are scaled by ``1 / (1 - rate)``.
      dropout_key: PRNG key of that dropout; None (the default) is deterministic.

    Returns:
      ``[B, T, H, d]``.
    """
    n_q, n_k = q.shape[1], k.shape[1]
    mask = None
    if causal:
        seen = jnp.arange(n_k)[None, :] <= jnp.arange(n_q)[:, None] + (n_k - n_q)
        mask = seen[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        km = key_mask[:, None, None, :]
        mask = km if mask is None else mask & km
    scale = 1.0 / math.sqrt(q.shape[-1])
    if dropout_key is None or dropout_rate <= 0.0:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    # The fused kernel has no dropout on the probabilities: spell the softmax out.
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, (1, 1) + probs.shape[-2:])
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def encoder_block(
    p: PyTree,
    x: Array,
    *,
    heads: int,
    act: str,
    eps: float,
    dtype: Any,
    causal: bool,
    past: tuple[Array, Array] | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """One pre-LayerNorm encoder layer of CLIP (both towers): attention then MLP, each residual.

    ``x + out_proj(attn(LN1(x)))``, then ``x + fc2(act(fc1(LN2(x))))``, with Hugging Face's
    CLIP layer parameters (``layer_norm1``, ``self_attn/{q,k,v,out}_proj``, ``layer_norm2``,
    ``mlp/{fc1,fc2}``).

    Args:
      p: the layer's parameters.
      x: ``[B, T, D]`` residual stream.
      heads: attention heads.
      act: the MLP's activation (a Hugging Face ``hidden_act`` name).
      eps: the LayerNorms' epsilon.
      dtype: compute dtype.
      causal: causal self-attention (the text tower).
      past: optional ``(k, v)``, each ``[P, H, d]``: keys and values of ``P`` earlier positions
        shared by every row of ``x`` (a prefix computed once, see
        :func:`jaxprompt.clip.encode_text_shared`); the rows of ``x`` are positions
        ``P .. P + T - 1`` and see all of them.

    Returns:
      ``(x, (k, v))``: the updated stream and this layer's keys and values of ``x``
      (``[B, T, H, d]``), which a later suffix can take as its ``past``.
    """
    a = p["self_attn"]
    h = layer_norm(x, p["layer_norm1"], eps=eps, dtype=dtype)
    q, k, v = (split_heads(dense(h, a[n], dtype), heads) for n in ("q_proj", "k_proj", "v_proj"))
    kk, vv = k, v
    if past is not None:
        kp, vp = (jnp.broadcast_to(t.astype(dtype), (x.shape[0],) + t.shape) for t in past)
        kk, vv = jnp.concatenate([kp, k], axis=1), jnp.concatenate([vp, v], axis=1)
    o = attention(q, kk, vv, causal=causal)
    x = x + dense(o.reshape(x.shape[:-1] + (-1,)), a["out_proj"], dtype)
    h = layer_norm(x, p["layer_norm2"], eps=eps, dtype=dtype)
    x = x + dense(activation(act)(dense(h, p["mlp"]["fc1"], dtype)), p["mlp"]["fc2"], dtype)
    return x, (k, v)


def put_tokens(x: Array, d: Array, start: int) -> Array:
    """``x`` ``[B, L, D]`` with positions ``start .. start + n - 1`` replaced by ``d`` (``[n, D]``
    for every row, or ``[B, n, D]``): how deep prompts replace their tokens before a layer."""
    d = d.astype(x.dtype)
    if d.ndim == 2:
        d = jnp.broadcast_to(d, (x.shape[0],) + d.shape)
    return x.at[:, start : start + d.shape[-2]].set(d)


def run_layers(
    layer: Any,
    layers: PyTree,
    n_layers: int,
    state: Any,
    *,
    deep: Array | None = None,
    put: Any = None,
    remat: bool = False,
    scan: bool = False,
) -> Any:
    """Runs ``n_layers`` layers, writing deep prompts before layers ``1 .. J - 1``.

    Args:
      layer: ``layer(params_i, state) -> state``.
      layers: ``{"0": params_0, "1": ...}`` (Hugging Face's layer tree).
      n_layers: how many layers.
      state: what the layers carry (an array or a tuple of arrays).
      deep: optional ``[J - 1, ...]``; ``deep[i]`` is written by ``put(state, deep[i])`` before
        layer ``i + 1``.
      put: ``put(state, d) -> state``.
      remat: recompute each layer in the backward pass (memory of one layer's activations).
      scan: run the layers as a ``lax.scan`` over stacked parameters. With ``remat``, a scan's
        backward is a loop that recomputes one layer at a time, whereas XLA (on CPU) schedules
        the recomputations of an unrolled loop of checkpointed layers together and keeps every
        layer's activations alive at once; the price is one stacked copy of the layers' weights.

    Returns:
      The final state.
    """
    n_deep = 0 if deep is None else deep.shape[0]
    if n_deep >= n_layers:
        raise ValueError(f"prompt depth {n_deep + 1} exceeds the {n_layers} layers of the tower")
    step = jax.checkpoint(layer) if remat else layer
    if not scan:
        for i in range(n_layers):
            if 1 <= i <= n_deep:
                state = put(state, deep[i - 1])
            state = step(layers[str(i)], state)
        return state
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[layers[str(i)] for i in range(n_layers)])
    if deep is None:
        xs: tuple = (stacked,)
    else:
        # deep[i] goes in before layer i + 1: zero rows for layer 0 and the layers past the
        # prompt depth, with a flag saying which rows to write.
        deep_all = jnp.zeros((n_layers,) + deep.shape[1:], deep.dtype).at[1 : 1 + n_deep].set(deep)
        idx = jnp.arange(n_layers)
        xs = (stacked, deep_all, (idx >= 1) & (idx <= n_deep))

    def body(state, per_layer):
        if deep is not None:
            _, d, flag = per_layer
            state = jax.tree.map(lambda new, old: jnp.where(flag, new, old), put(state, d), state)
        return step(per_layer[0], state), None

    state, _ = jax.lax.scan(body, state, xs)
    return state
