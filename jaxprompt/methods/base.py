"""The method contract: a prompt-learning method is a bundle of pure functions.

As an optax transformation is an ``(init, update)`` pair, a method is ``(init, logits, loss)``
over a prompt pytree. The frozen :class:`~jaxprompt.clip.Clip` and the class set
:class:`~jaxprompt.clip.Task` are arguments of every function, never closure constants, so a
learned prompt is evaluated on new classes by passing another Task, and jitted functions take
CLIP's parameters as (shardable) inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprompt import clip as clip_lib
from jaxprompt import losses

Array = jax.Array
Prompt = Any  # a pytree of float32 arrays with named top-level groups ("ctx", "deep_text", ...)
Metrics = dict[str, Array]
Batch = dict[str, Array]  # {"image": [B, H, W, 3] float32 normalised, "label": [B] int32}


class PromptMethod(NamedTuple):
    """A prompt-learning method.

    Attributes:
      init: ``init(key, clip, task) -> prompt``, the trainable pytree (float32 leaves).
      logits: ``logits(prompt, clip, task, images, *, key=None) -> [B, C]`` float32, C =
        ``len(task)``. ``key`` drives Monte Carlo sampling where a method samples at test time.
      loss: ``loss(prompt, clip, task, batch, key) -> (scalar, metrics)``. Gradients are taken
        with respect to ``prompt`` only, which is what keeps CLIP frozen.
      name: the registry name.
      config: the constructor's keyword arguments (JSON-able), stored in checkpoints so a run
        can be rebuilt from its meta.
      encode_classes: optional ``encode_classes(prompt, clip, task) -> [C, E]`` for methods whose
        text side does not depend on the image; evaluation computes it once per class set.
      classify: optional ``classify(prompt, clip, classes, images) -> [B, C]`` paired with
        ``encode_classes``; ``logits`` equals ``classify(prompt, clip, encode_classes(...), x)``.
    """

    init: Callable[..., Prompt]
    logits: Callable[..., Array]
    loss: Callable[..., tuple[Array, Metrics]]
    name: str = ""
    config: Mapping[str, Any] = {}
    encode_classes: Callable[..., Array] | None = None
    classify: Callable[..., Array] | None = None


def cosine_logits(clip: clip_lib.Clip, image_features: Array, text_features: Array) -> Array:
    """``exp(logit_scale) * normalize(img) @ normalize(txt).T`` in float32 -> [B, C]."""
    img = clip_lib.normalize(image_features)
    txt = clip_lib.normalize(text_features)
    return clip_lib.logit_scale(clip) * img @ txt.T


def split_logits(
    encode_classes: Callable[..., Array], classify: Callable[..., Array]
) -> Callable[..., Array]:
    """Builds ``logits(prompt, clip, task, images, *, key=None)`` from the two halves."""

    def logits(prompt, clip, task, images, *, key=None):
        del key  # deterministic methods
        return classify(prompt, clip, encode_classes(prompt, clip, task), images)

    return logits


def supervised_loss(logits_fn: Callable[..., Array]) -> Callable[..., tuple[Array, Metrics]]:
    """Cross-entropy on the batch labels, with accuracy, for methods whose loss is CE alone."""

    def loss(prompt, clip, task, batch, key):
        logits = logits_fn(prompt, clip, task, batch["image"], key=key)
        labels = batch["label"]
        ce = losses.cross_entropy(logits, labels)
        acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        return ce, {"ce": ce, "accuracy": acc}

    return loss


def word_embeddings(clip: clip_lib.Clip, words: str) -> Array:
    """Frozen token embeddings of ``words`` without start/end tokens -> [n, D] float32."""
    ids, eot = clip_lib.tokenize(clip, [words])
    return clip_lib.embed_tokens(clip, jnp.asarray(ids[0, 1 : eot[0]])).astype(jnp.float32)


def resolve_base(
    base: Any,
    base_kwargs: Mapping[str, Any] | None,
    *,
    wrapper: str,
    default: tuple[str, Mapping[str, Any]],
) -> PromptMethod:
    """The base method of a wrapper (TPT, POUF) from any of the forms users and meta give.

    Args:
      base: a :class:`PromptMethod`, a registry name, the ``{"method", "method_config"}`` form
        checkpoint meta stores a nested method in, or None for ``default``.
      base_kwargs: keyword arguments for a base given by name (or overriding the meta form's).
      wrapper: the wrapper's own name (a wrapper cannot wrap itself).
      default: ``(name, kwargs)`` of the base used when ``base`` is None.

    Raises:
      ValueError: a one-line message for a self-wrap, kwargs with a method object, or a base of
        the wrong type.
    """
    if base is None:
        base, base_kwargs = default[0], {**dict(default[1]), **dict(base_kwargs or {})}
    if isinstance(base, Mapping) and "method" in base:
        base_kwargs = {**dict(base.get("method_config") or {}), **dict(base_kwargs or {})}
        base = base["method"]
    if isinstance(base, str):
        if base == wrapper:
            raise ValueError(f"{wrapper} cannot wrap itself")
        from jaxprompt import methods  # the registry imports the wrappers: import on use

        return methods.get(base, **dict(base_kwargs or {}))
    if base_kwargs:
        raise ValueError("base_kwargs is only for a base given by name")
    if not isinstance(base, PromptMethod):
        raise ValueError(f"base must be a PromptMethod or a method name, got {type(base)}")
    return base
