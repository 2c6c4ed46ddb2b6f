"""The CLIP text tower, prompt-aware: one transformer block (:func:`jaxprompt.transformer.
encoder_block`) for the plain pass and the shared-prefix pass.

Where prompts go (Khattak et al., "Self-regulating Prompts", arXiv 2307.06948, and its
reference implementation; see also CoOp, arXiv 2109.01134): ``[SOT] ctx_1..ctx_n <class-name
tokens> "." [EOT]``. The learned context takes the positions right after the start token and
receives the positional embedding like any token. Deep text prompts *replace* (not add to)
positions ``1..n`` on the residual stream entering layer ``i`` (before its first LayerNorm),
with no positional embedding. Layers past the prompt depth keep whatever the previous layer
produced at those positions. The feature is taken at the EOT position, after the final
LayerNorm, times the text projection.

EOT truncation: the tower is causal, so positions after the last EOT of a class set cannot
influence any EOT feature. A :class:`~jaxprompt.clip.Task` stores its class tokens padded only
to the longest class, so every prompted text pass runs over ``max(EOT) + 1`` positions instead of
77, with equal results.

Prefix sharing: the first ``P`` positions of a sequence see only each other, so when they are
the same for every class (start token and a shared context) their hidden states are the same at
every layer. They run once, as a batch of one; the classes' suffixes run with the prefix's keys
and values as ``past`` in the same block. A plain pass is the same block with no past.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxprompt import transformer as tf
from jaxprompt.clip.model import Clip, Task
from jaxprompt.clip.tokens import check_context

Array = jax.Array
PyTree = Any


def _block_args(clip: Clip) -> dict[str, Any]:
    s = clip.spec
    return dict(heads=s.text_heads, act=s.text_act, eps=s.text_eps, dtype=jnp.dtype(s.dtype))


def _project(clip: Clip, pooled: Array) -> Array:
    """Final LayerNorm (per token, so on the EOT rows only) and the text projection, float32."""
    kw = _block_args(clip)
    ln = clip.params["text_model"]["final_layer_norm"]
    pooled = tf.layer_norm(pooled, ln, eps=kw["eps"], dtype=kw["dtype"])
    return tf.dense(pooled, clip.params["text_projection"], kw["dtype"]).astype(jnp.float32)


def embed_tokens(clip: Clip, ids: Array) -> Array:
    """Frozen token embeddings (without positions) of token ids [..., L] -> [..., L, D]."""
    table = clip.params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    return jnp.take(table, ids, axis=0)


def encode_text(
    clip: Clip,
    embeds: Array,
    eot: Array,
    *,
    deep: Array | None = None,
    deep_start: int = 1,
    remat: bool = False,
) -> Array:
    """Prompt-aware text tower: token embeddings in, projected EOT features out.

    Args:
      clip: the frozen model.
      embeds: [N, L, D] input token embeddings (learned context already in place), without
        positional embedding; L <= context length.
      eot: [N] EOT positions.
      deep: optional deep prompts [J-1, n, D] (shared) or [J-1, N, n, D] (per sequence);
        ``deep[i]`` replaces positions ``deep_start .. deep_start + n - 1`` before layer i + 1.
      deep_start: first position deep prompts replace (1: right after the start token).
      remat: rematerialise each block in the backward pass to bound memory.

    Returns:
      [N, E] text features, float32, not normalised.
    """
    params = clip.params["text_model"]
    kw = _block_args(clip)
    length = embeds.shape[1]
    pos = params["embeddings"]["position_embedding"]["embedding"][:length]
    x = embeds.astype(kw["dtype"]) + pos.astype(kw["dtype"])

    def layer(p, x):
        return tf.encoder_block(p, x, causal=True, **kw)[0]

    def put(x, d):
        return tf.put_tokens(x, d, deep_start)

    x = tf.run_layers(
        layer, params["encoder"]["layers"], clip.spec.text_layers, x, deep=deep, put=put,
        remat=remat,
    )  # fmt: skip
    return _project(clip, x[jnp.arange(x.shape[0]), eot])


def encode_token_ids(clip: Clip, ids: Array, eot: Array, *, chunk: int | None = None) -> Array:
    """Text features of complete token sequences (no learned prompts) -> [N, E] float32.

    Args:
      ids: [N, L] token ids with start and end tokens (e.g. from :func:`tokenize`).
      eot: [N] EOT positions.
      chunk: if set, encode ``chunk`` sequences at a time with ``lax.map`` to bound memory
        (used for template ensembles over many classes).
    """
    if chunk is None or ids.shape[0] <= chunk:
        return encode_text(clip, embed_tokens(clip, ids), eot)
    n = ids.shape[0]
    pad = (-n) % chunk
    ids_p = jnp.pad(ids, ((0, pad), (0, 0)), constant_values=clip.spec.eot_id)
    eot_p = jnp.pad(eot, (0, pad))
    ids_c = ids_p.reshape(-1, chunk, ids.shape[1])
    eot_c = eot_p.reshape(-1, chunk)
    out = jax.lax.map(lambda a: encode_text(clip, embed_tokens(clip, a[0]), a[1]), (ids_c, eot_c))
    return out.reshape(-1, out.shape[-1])[:n]


def prompted_text_inputs(
    clip: Clip,
    task: Task,
    ctx: Array,
    *,
    position: str = "end",
) -> tuple[Array, Array]:
    """Builds ``[SOT] ctx <class tokens>`` embeddings for every class of a task.

    Args:
      clip: the frozen model.
      task: the class set.
      ctx: [n, D] shared or [C, n, D] class-specific context vectors (float32; cast inside).
      position: where the class name goes relative to the context, as in CoOp: ``"end"``
        (``[SOT] ctx name . EOT``), ``"middle"`` (``[SOT] ctx[:n//2] name ctx[n//2:] . EOT``)
        or ``"front"`` (``[SOT] name ctx . EOT``).

    Returns:
      ``(embeds, eot)``: [C, 1 + n + L, D] and [C] EOT positions (the same for every position).
    """
    n_cls = task.token_ids.shape[0]
    n = ctx.shape[-2]
    if ctx.ndim not in (2, 3):
        raise ValueError(f"ctx must be [n, D] or [C, n, D], got {tuple(ctx.shape)}")
    # The sequence with the class at the end is the prefix-shared split put back together
    # (one construction of both); the other positions reorder it below.
    prefix, suffix, eot = _prefix_and_suffix(clip, task, ctx)
    prefix = jnp.broadcast_to(prefix, (n_cls,) + prefix.shape[-2:])
    seq = jnp.concatenate([prefix, suffix], axis=1)  # [C, 1 + n + L, D], class at the end
    if position == "end":
        return seq, eot
    if position not in ("middle", "front"):
        raise ValueError(f"position must be 'end', 'middle' or 'front', got {position!r}")
    # Reorder per class with a gather: the name length differs between classes, so the context
    # lands at a different place in every row.
    p = jnp.arange(seq.shape[1])[None, :]
    nl = task.name_len[:, None]
    h = n // 2 if position == "middle" else 0
    src = jnp.where(
        p <= h,
        p,  # start token and the first half of the context stay
        jnp.where(
            p <= h + nl,
            n + 1 + (p - 1 - h),  # class-name tokens
            jnp.where(p <= nl + n, p - nl, p),  # rest of the context, then ". EOT pad"
        ),
    )
    return jnp.take_along_axis(seq, src[:, :, None], axis=1), eot


def encode_text_shared(
    clip: Clip,
    prefix: Array,
    suffix: Array,
    eot: Array,
    *,
    deep: Array | None = None,
    deep_start: int = 1,
    remat: bool = False,
) -> Array:
    """:func:`encode_text` of ``concat(prefix, suffix)`` with the prefix computed once.

    The text tower is causal, so the first ``P`` positions of a sequence see only each other:
    when they are the same tokens for every class (start token and a shared context, or a
    template's words before the class name), their hidden states are the same at every layer.
    They run once; each class's suffix attends to the prefix's cached keys and values. The
    result equals ``encode_text(clip, concat(prefix, suffix), eot, ...)`` with about
    ``(P + S) / S`` times less work in the blocks.

    Args:
      clip: the frozen model.
      prefix: [P, D] input embeddings of the shared positions (no positional embedding), or
        [G, P, D] for G groups, each with its own suffixes.
      suffix: [C, S, D] per-class embeddings of positions ``P .. P + S - 1`` (class-name
        tokens, ".", EOT, padding), or [G, C, S, D] with a grouped prefix.
      eot: [C] (or [G, C]) EOT positions in full-sequence coordinates.
      deep: optional shared deep prompts [J-1, n, D]; ``deep[i]`` replaces positions
        ``deep_start .. deep_start + n - 1`` before layer ``i + 1``. They must lie inside the
        prefix (per-class deep prompts break the sharing: use :func:`encode_text`).
      deep_start: first position deep prompts replace.
      remat: rematerialise each block in the backward pass; the layers then run as a
        ``lax.scan``, so the backward holds one layer's activations at a time (what bounds
        CoCoOp's and the Bayesian prompts' step memory at many classes).

    Returns:
      [C, E] (or [G, C, E]) text features, float32, not normalised.
    """
    if prefix.ndim == 3:
        if suffix.ndim != 4 or eot.ndim != 2:
            raise ValueError(
                "a grouped prefix [G, P, D] needs suffixes [G, C, S, D] and eot [G, C], got "
                f"{tuple(suffix.shape)} and {tuple(eot.shape)}"
            )
        one = functools.partial(
            encode_text_shared, clip, deep=deep, deep_start=deep_start, remat=remat
        )
        return jax.vmap(one)(prefix, suffix, eot)
    if prefix.ndim != 2 or suffix.ndim != 3:
        raise ValueError(
            f"prefix must be [P, D] and suffix [C, S, D], got {tuple(prefix.shape)} and "
            f"{tuple(suffix.shape)}"
        )
    n_p, n_s = prefix.shape[0], suffix.shape[1]
    if n_p + n_s > clip.spec.context_length:
        raise ValueError(
            f"prefix ({n_p}) + suffix ({n_s}) tokens exceed CLIP's context "
            f"{clip.spec.context_length}"
        )
    n_deep = 0 if deep is None else deep.shape[0]
    if deep is not None:
        if deep.ndim != 3:
            raise ValueError(
                f"encode_text_shared takes shared deep prompts [J-1, n, D], got "
                f"{tuple(deep.shape)}: per-class deep prompts need encode_text"
            )
        if deep_start < 0 or deep_start + deep.shape[1] > n_p:
            raise ValueError(
                f"deep prompts at positions {deep_start}..{deep_start + deep.shape[1] - 1} do "
                f"not lie inside the {n_p}-token shared prefix"
            )
        if n_deep >= clip.spec.text_layers:
            raise ValueError(
                f"prompt depth {n_deep + 1} exceeds the {clip.spec.text_layers} layers of the tower"
            )
    params = clip.params["text_model"]
    kw = _block_args(clip)
    pos = params["embeddings"]["position_embedding"]["embedding"].astype(kw["dtype"])
    # Positions are absolute: the suffix continues where the prefix ends.
    xp = prefix.astype(kw["dtype"]) + pos[:n_p]
    xs = suffix.astype(kw["dtype"]) + pos[n_p : n_p + n_s]

    def layer(p, state):
        xp, xs = state
        # The prefix as a batch of one; its keys and values are every suffix row's past.
        xp, past = tf.encoder_block(p, xp[None], causal=True, **kw)
        xs, _ = tf.encoder_block(p, xs, causal=True, past=(past[0][0], past[1][0]), **kw)
        return xp[0], xs

    def put(state, d):
        xp, xs = state
        return xp.at[deep_start : deep_start + d.shape[0]].set(d.astype(xp.dtype)), xs

    # With remat, the layers run as a scan: its backward holds one layer's [C, S, 4D]
    # activations at a time, which bounds CoCoOp's and the Bayesian prompts' step memory at
    # many classes (see jaxprompt.transformer.run_layers).
    xp, xs = tf.run_layers(
        layer, params["encoder"]["layers"], clip.spec.text_layers, (xp, xs), deep=deep, put=put,
        remat=remat, scan=remat,
    )  # fmt: skip
    # EOT normally lies in the suffix; a row whose EOT falls inside the prefix (an empty class
    # name after a template, say) reads the shared prefix row instead.
    rows = jnp.arange(xs.shape[0])
    in_suffix = (eot >= n_p)[:, None]
    pooled = jnp.where(
        in_suffix,
        xs[rows, jnp.clip(eot - n_p, 0, n_s - 1)],
        xp[jnp.clip(eot, 0, n_p - 1)],
    )
    return _project(clip, pooled)


def shared_text_inputs(clip: Clip, task: Task, ctx: Array) -> tuple[Array, Array, Array]:
    """The prefix/suffix split of :func:`prompted_text_inputs` for a shared context.

    Args:
      clip: the frozen model.
      task: the class set.
      ctx: [n, D] context shared by all classes (class name at the end).

    Returns:
      ``(prefix, suffix, eot)``: [1 + n, D] (start token and context), [C, L, D] (the task's
      class tokens) and [C] EOT positions in full-sequence coordinates, so that
      ``encode_text_shared(clip, prefix, suffix, eot)`` equals ``encode_text`` of
      ``prompted_text_inputs(clip, task, ctx)``.
    """
    if ctx.ndim != 2:
        raise ValueError(f"a shared prefix needs a [n, D] context, got {tuple(ctx.shape)}")
    return _prefix_and_suffix(clip, task, ctx)


def _prefix_and_suffix(clip: Clip, task: Task, ctx: Array) -> tuple[Array, Array, Array]:
    """``[SOT] ctx`` ([..., 1 + n, D]), class tokens ([C, L, D]) and EOT positions ([C]).

    ``ctx`` is [n, D] or [C, n, D]; the one place the prompted sequence's pieces are built.
    """
    n = ctx.shape[-2]
    check_context(clip, task, n)
    dt = jnp.dtype(clip.spec.dtype)
    sot = embed_tokens(clip, jnp.full((1,), clip.spec.sot_id, jnp.int32)).astype(dt)
    sot = jnp.broadcast_to(sot, ctx.shape[:-2] + sot.shape)
    prefix = jnp.concatenate([sot, ctx.astype(dt)], axis=-2)
    suffix = embed_tokens(clip, task.token_ids).astype(dt)
    return prefix, suffix, task.eot + 1 + n


def prompted_text_features(
    clip: Clip,
    task: Task,
    ctx: Array,
    *,
    position: str = "end",
    deep: Array | None = None,
    remat: bool = False,
    shared_prefix: bool = True,
) -> Array:
    """Text features of ``[SOT] ctx <class tokens>`` for every class, prefix-shared if possible.

    With a shared context ([n, D]), the class at the end and shared (or no) deep prompts, the
    start token and context are encoded once (:func:`encode_text_shared`); class-specific
    contexts ([C, n, D]), ``position="middle"`` / ``"front"``, per-class deep prompts or
    ``shared_prefix=False`` take the plain path (:func:`prompted_text_inputs` then
    :func:`encode_text`). Both give the same features.

    Args:
      clip: the frozen model.
      task: the class set.
      ctx: [n, D] shared or [C, n, D] class-specific context.
      position: where the class name goes, as in :func:`prompted_text_inputs`.
      deep: optional deep text prompts for positions ``1..n'`` (see :func:`encode_text`).
      remat: rematerialise each block in the backward pass.
      shared_prefix: allow the prefix-shared encoder (False: always the plain path, e.g. to
        compare the two).

    Returns:
      [C, E] float32 text features, not normalised.
    """
    if shared_prefix and ctx.ndim == 2 and position == "end" and (deep is None or deep.ndim == 3):
        prefix, suffix, eot = shared_text_inputs(clip, task, ctx)
        return encode_text_shared(clip, prefix, suffix, eot, deep=deep, remat=remat)
    embeds, eot = prompted_text_inputs(clip, task, ctx, position=position)
    return encode_text(clip, embeds, eot, deep=deep, remat=remat)
