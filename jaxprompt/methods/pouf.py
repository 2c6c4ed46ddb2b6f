"""POUF: prompt-oriented unsupervised fine-tuning of a zero-shot CLIP on unlabeled target data.

Tanwisuth, Zhang, Zheng, He, Zhou, "POUF: Prompt-Oriented Unsupervised Fine-tuning for Large
Pre-trained Models", ICML 2023, arXiv 2305.00350; reference github.com/korawat-tanwisuth/POUF
@9e12dbb (``pouf_lvm/examples/pouf/image_classification/{pouf,clip_classifier}.py``).
Spec: ``specs/pouf.md`` sections 1 and 4. The masked-LM half of the paper is
:mod:`jaxprompt.side.mlm`.

POUF wraps a base method, as optax wrappers wrap a transformation. On an UNLABELED target batch
of M images, with s the [M, K] cosine between the image features and the K class features the
base produces, and ``a = exp(logit_scale) * s``::

    L = w_transport * CT(s; exp(logit_scale)) + w_info * IM(a)

* CT (:func:`jaxprompt.losses.transport_loss_from_cosine`): cost ``1 - s``; forward plan the
  row softmax of ``a`` (each image over the classes), backward plan the COLUMN softmax of ``a``
  (each class over the images of the batch); both directions weight 1, uniform marginals.
* IM (:func:`jaxprompt.losses.mutual_information_loss`): mean per-image entropy of
  ``softmax(a)`` minus the entropy of its batch mean (eps 1e-5 and 1e-6).

Both terms normalise over the batch, so the loss is a function of the whole (global) batch.
Under ``jit`` with the batch sharded over a ``data`` mesh axis the arrays are global arrays, and
XLA inserts the collectives: the value is that of one device (tested, 8 simulated devices vs 1).
No ``shard_map`` here: a per-device loss would change the objective.

What is trained (the prompt pytree):

* the base's prompt (CoOp: ``{"ctx": [4, D]}`` from "a photo of a", class name then ".");
* ``"logit_scale"``: a float32 scalar, initialised from CLIP's own (ln 100 for OpenAI's), used
  (as ``exp``) in the logits, both plans and the IM softmax instead of CLIP's frozen one. No
  clamp, as in the reference. Off with ``train_logit_scale=False`` (CLIP's frozen scale).
* ``"clip"`` (``full_model=True``, the reference's "model tuning"): a nested dict with the same
  keys as ``clip.params`` (the CLIP tree, Hugging Face's Flax layout) holding the leaves to
  train. Every function of this method first builds
  ``clip.replace(params=merge(clip.params, prompt["clip"]))`` (:func:`override_clip`): each
  leaf present in the group replaces the frozen leaf at the same path (cast to the frozen
  leaf's dtype, so a bfloat16 CLIP computes in bfloat16 from float32 master weights); leaves
  absent from the group stay frozen. CLIP itself therefore stays a
  plain argument that the optimizer never sees, and "frozen CLIP" becomes "frozen unless
  the prompt overrides it". The default group is every CLIP weight except ``logit_scale``,
  which lives in its own group; ``clip_params`` restricts it to sub-trees (e.g.
  ``("text_model",)``). The full variant's default base is the fixed prompt
  "a photo of a {}" (no period) through :func:`~jaxprompt.methods.zeroshot.zeroshot`.

The optimiser is :func:`make_optimizer`: SGD, Nesterov momentum 0.9, coupled weight decay 1e-3,
and tllib's inverse decay ``lr_group * (1 + 2e-4 t)^-0.75`` with the EFFECTIVE rates of the
reference (spec 1.8): ctx 1e-3, ``logit_scale`` 5e-7, CLIP weights 5e-7.

The loss never reads ``batch["label"]`` (a batch without labels works). Model selection is the
runner's business (:mod:`jaxprompt.app.pouf`): label-free by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprompt import clip as clip_lib
from jaxprompt import losses
from jaxprompt.methods import base as base_lib

Array = jax.Array
Prompt = base_lib.Prompt

__all__ = [
    "clip_group",
    "inverse_decay",
    "make_optimizer",
    "override_clip",
    "pouf",
    "pouf_cosine",
]

# The groups this wrapper adds to the base's prompt; a base may not use these names.
LOGIT_SCALE = "logit_scale"
CLIP = "clip"

# Default bases (spec 1.2): prompt tuning learns 4 context vectors from "a photo of a" with the
# class name then "."; model tuning keeps the fixed prompt "a photo of a {c}" without period.
_PROMPT_BASE = {"n_ctx": 4, "init_words": "a photo of a"}
_FULL_BASE = {"templates": ["a photo of a {}"]}


# --------------------------------------------------------------------------------------------
# The CLIP override (the full-model variant)
# --------------------------------------------------------------------------------------------


def _select(tree: Mapping[str, Any], prefixes: Sequence[str] | None) -> dict[str, Any]:
    """The sub-tree of ``tree`` under the ``/``-joined path prefixes (all if None)."""

    def walk(node, path):
        if not isinstance(node, Mapping):
            if prefixes is None or any(
                path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes
            ):
                return node
            return None
        out = {}
        for k, v in node.items():
            sub = walk(v, f"{path}/{k}" if path else str(k))
            if sub is not None and not (isinstance(sub, Mapping) and not sub):
                out[str(k)] = sub
        return out

    return walk(tree, "")


def clip_group(clip: clip_lib.Clip, prefixes: Sequence[str] | None = None) -> dict[str, Any]:
    """The trainable ``clip`` group: a float32 copy of CLIP's weights (without ``logit_scale``).

    Args:
      clip: the frozen CLIP.
      prefixes: ``/``-joined paths into ``clip.params`` to train (e.g. ``("text_model",)`` or
        ``("vision_model/post_layernorm",)``); ``None`` is every weight (the reference).

    Returns:
      Nested dicts with ``clip.params``' keys, float32 leaves.

    Raises:
      ValueError: if the prefixes select nothing.
    """
    params = {k: v for k, v in dict(clip.params).items() if k != LOGIT_SCALE}
    group = _select(params, None if prefixes is None else tuple(prefixes))
    if not jax.tree.leaves(group):
        raise ValueError(
            f"clip_params={list(prefixes or [])} selects no CLIP weight; top-level keys are "
            f"{sorted(params)}"
        )
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32), group)


def override_clip(clip: clip_lib.Clip, overrides: Mapping[str, Any] | None) -> clip_lib.Clip:
    """``clip`` with the leaves of ``overrides`` (same nested keys) in place of its own.

    Leaves are cast to the dtype of the leaf they replace; paths absent from ``overrides`` keep
    the frozen value. Gradients flow into ``overrides`` (it is part of the prompt).

    Raises:
      KeyError: an override path that CLIP does not have.
    """
    if not overrides:
        return clip

    def merge(frozen, new, path):
        if not isinstance(new, Mapping):
            if isinstance(frozen, Mapping):
                raise KeyError(f"the clip group has a leaf at {path!r} where CLIP has a sub-tree")
            return jnp.asarray(new).astype(jnp.asarray(frozen).dtype)
        if not isinstance(frozen, Mapping):
            raise KeyError(f"the clip group has a sub-tree at {path!r} where CLIP has a leaf")
        out = dict(frozen)
        for k, v in new.items():
            if k not in frozen:
                raise KeyError(f"the clip group overrides {path}/{k}, which CLIP does not have")
            out[k] = merge(frozen[k], v, f"{path}/{k}")
        return out

    return clip.replace(params=merge(dict(clip.params), overrides, ""))


# --------------------------------------------------------------------------------------------
# Optimiser (spec 1.8)
# --------------------------------------------------------------------------------------------


def inverse_decay(lr: float, *, gamma: float = 2e-4, decay: float = 0.75) -> optax.Schedule:
    r"""tllib's schedule ``lr * (1 + gamma t)^(-decay)`` over global steps (never reset).

    ``t`` is optax's count: the number of updates done before this one (0 for the first),
    the reference's ``LambdaLR`` iteration index.
    """

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        return jnp.float32(lr) * (1.0 + gamma * t) ** (-decay)

    return schedule


def make_optimizer(
    *,
    ctx_lr: float = 1e-3,
    logit_scale_lr: float = 5e-7,
    clip_lr: float = 5e-7,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    gamma: float = 2e-4,
    decay: float = 0.75,
) -> optax.GradientTransformation:
    """POUF's SGD: Nesterov 0.9, coupled L2 1e-3, inverse decay, per-group EFFECTIVE rates.

    The reference stores multipliers (ctx 0.1, the rest 5e-5) and multiplies by ``lr = 0.01``
    in its scheduler, so the rates below are what its parameters really see (spec 1.8; the
    full-model 5e-7 is not a typo). Every update is, per leaf,
    ``g' = g + wd * p; buf = g' + m * buf; p -= lr_t * (g' + m * buf)`` (PyTorch's Nesterov).

    Args:
      ctx_lr: the base prompt's groups (``ctx`` ...): 1e-3.
      logit_scale_lr: the ``logit_scale`` group: 5e-7.
      clip_lr: the ``clip`` group of the full-model variant: 5e-7.
      momentum: Nesterov momentum.
      weight_decay: coupled L2 on every trainable leaf, ``ctx`` and ``logit_scale`` included.
      gamma: schedule ``(1 + gamma t)^-decay``.
      decay: schedule exponent.

    Returns:
      An optax transformation over the POUF prompt (per-group through ``optax.partition``).
    """

    # The trainer loads orbax; importing it here keeps `import jaxprompt.methods` light.
    from jaxprompt import train as train_lib

    def sched(lr):
        return inverse_decay(lr, gamma=gamma, decay=decay)

    return train_lib.make_optimizer(
        sched(ctx_lr),
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=True,
        group_lrs={LOGIT_SCALE: sched(logit_scale_lr), CLIP: sched(clip_lr)},
    )


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


def default_base(full_model: bool = False) -> base_lib.PromptMethod:
    """POUF's base: the fixed prompt "a photo of a {}" for ``full_model``, else CoOp with 4
    context vectors from "a photo of a"."""
    # A wrapper may build its default base from the public constructors.
    from jaxprompt.methods.coop import coop
    from jaxprompt.methods.zeroshot import zeroshot

    if full_model:
        return zeroshot(**_FULL_BASE)
    return coop(**_PROMPT_BASE)


def _split(prompt: Prompt) -> tuple[dict[str, Any], Array | None, Any]:
    """(base prompt, trained logit scale or None, clip overrides or None)."""
    prompt = dict(prompt)
    scale = prompt.pop(LOGIT_SCALE, None)
    overrides = prompt.pop(CLIP, None)
    return prompt, scale, overrides


def pouf_cosine(
    base: base_lib.PromptMethod,
    prompt: Prompt,
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    images: Array,
    *,
    key: Array | None = None,
) -> tuple[Array, Array]:
    """The [B, K] cosine between image and class features, and the scale ``exp(logit_scale)``.

    The base's logits are ``s_frozen * cos`` with CLIP's frozen scale ``s_frozen``
    (:func:`jaxprompt.clip.logit_scale`, never overridden: the trained scale is its own group),
    so the cosine is recovered exactly by dividing by it; this works for any base whose logits
    are CLIP's scaled cosine, with or without image-side prompts.
    """
    base_prompt, log_scale, overrides = _split(prompt)
    clip_eff = override_clip(clip, overrides)
    cos = base.logits(base_prompt, clip_eff, task, images, key=key) / clip_lib.logit_scale(clip)
    if log_scale is None:
        scale = clip_lib.logit_scale(clip)
    else:
        scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
    return cos.astype(jnp.float32), scale


def pouf(
    base: base_lib.PromptMethod | None = None,
    *,
    w_transport: float = 1.0,
    w_info: float = 0.3,
    train_logit_scale: bool = True,
    full_model: bool = False,
    clip_params: Sequence[str] | None = None,
) -> base_lib.PromptMethod:
    """POUF around a base method (label-free transport + information maximisation).

    Args:
      base: the method producing the class features (``None``: :func:`default_base`). A
        registry name with ``base_kwargs``, or the ``{"method", "method_config"}`` form of
        checkpoint meta, goes through ``jp.methods.get("pouf", base=..., base_kwargs=...)``.
      w_transport: weight of the transport term (1.0).
      w_info: weight of the mutual-information term (0.3 for CLIP).
      train_logit_scale: learn ``logit_scale`` as its own prompt group (the reference does).
      full_model: also learn CLIP's weights through the ``clip`` group (the reference's
        "model tuning"); see the module docstring for how the override works.
      clip_params: with ``full_model``, ``/``-joined ``clip.params`` paths to train (``None``:
        every weight but ``logit_scale``).

    Returns:
      A :class:`PromptMethod` named ``"pouf"``. ``loss`` ignores ``batch["label"]``; its
      metrics are ``transport``, ``mutual_information`` and ``scale`` (``exp(logit_scale)``).
    """
    if base is None:
        base_m = default_base(full_model)
    else:
        base_m = base_lib.check_base(base, wrapper="pouf")
    if clip_params is not None and not full_model:
        raise ValueError("clip_params selects CLIP weights to train: it needs full_model=True")
    clip_params = None if clip_params is None else [str(p) for p in clip_params]

    def init(key, clip, task):
        prompt = dict(base_m.init(key, clip, task))
        for group in (LOGIT_SCALE, CLIP):
            if group in prompt:
                raise ValueError(f"base {base_m.name!r} already has a prompt group {group!r}")
        if train_logit_scale:
            prompt[LOGIT_SCALE] = jnp.asarray(clip.params[LOGIT_SCALE], jnp.float32).reshape(())
        if full_model:
            prompt[CLIP] = clip_group(clip, clip_params)
        return prompt

    def scale_of(prompt, clip):
        if LOGIT_SCALE in prompt:
            return jnp.exp(jnp.asarray(prompt[LOGIT_SCALE], jnp.float32))
        return clip_lib.logit_scale(clip)

    def logits(prompt, clip, task, images, *, key=None):
        cos, scale = pouf_cosine(base_m, prompt, clip, task, images, key=key)
        return scale * cos

    def loss(prompt, clip, task, batch, key):
        # Label-free: only the images are read.
        cos, scale = pouf_cosine(base_m, prompt, clip, task, batch["image"], key=key)
        ct = losses.transport_loss_from_cosine(cos, scale=scale)
        mi = losses.mutual_information_loss(scale * cos)
        total = w_transport * ct + w_info * mi
        return total, {"transport": ct, "mutual_information": mi, "scale": scale}

    encode_classes = classify = None
    if base_m.encode_classes is not None and base_m.classify is not None:
        # Evaluation encodes the classes once per class set (see jaxprompt.evaluate).

        def encode_classes(prompt, clip, task):
            base_prompt, _, overrides = _split(prompt)
            return base_m.encode_classes(base_prompt, override_clip(clip, overrides), task)

        def classify(prompt, clip, classes, images):
            base_prompt, _, overrides = _split(prompt)
            z = base_m.classify(base_prompt, override_clip(clip, overrides), classes, images)
            return scale_of(prompt, clip) * (z / clip_lib.logit_scale(clip))

    return base_lib.PromptMethod(
        init=init,
        logits=logits,
        loss=loss,
        name="pouf",
        config=dict(
            base=base_m,
            w_transport=w_transport,
            w_info=w_info,
            train_logit_scale=train_logit_scale,
            full_model=full_model,
            clip_params=clip_params,
        ),
        encode_classes=encode_classes,
        classify=classify,
    )
