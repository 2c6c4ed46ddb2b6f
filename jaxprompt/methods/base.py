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
import numpy as np

from jaxprompt import clip as clip_lib
from jaxprompt import losses

Array = jax.Array
Prompt = Any  # a pytree of float32 arrays with named top-level groups ("ctx", "deep_text", ...)
Metrics = dict[str, Array]
Batch = dict[str, Array]  # {"image": [B, H, W, 3] float32 normalised, "label": [B] int32}


class FrozenImageSide(NamedTuple):
    """What a method whose image side is CLIP's frozen image encoder offers test-time tuning.

    Its logits are ``scale * normalize(encode_image(x)) @ normalize(C).T`` with class features
    ``C = class_features(tuned(prompt, f), clip, task)``, where ``f`` is the image's feature:
    so TPT encodes every view once and tunes only the text side.

    Attributes:
      tuned: ``tuned(prompt, feature [E]) -> pytree``: what the class features of one image
        depend on (the prompt itself for CoOp; CoCoOp's ``ctx + meta_net(feature)``).
      class_features: ``class_features(tuned, clip, task) -> [C, E]`` (not normalised).
      per_image: whether ``tuned`` depends on the image (then no text work is shared between
        the images of a batch).
    """

    tuned: Callable[[Prompt, Array], Any]
    class_features: Callable[..., Array]
    per_image: bool = False


class Forward(NamedTuple):
    """One prompted forward pass, split into what a feature-regularising wrapper reads.

    Returned by :attr:`PromptedFeatures.forward`. The self-regulation wrapper
    (:func:`jaxprompt.methods.selfreg.self_regulated`) trains on ``CE(logits) + penalty`` (the
    method's own loss) plus agreement terms between these features and the frozen CLIP's.

    Attributes:
      logits: [B, C] float32, what the method's ``logits`` returns for these images (for a
        deterministic method ``scale * cos(image, text)``; Bayesian prompts: the log of the
        Monte Carlo predictive).
      image: [B, E] the L2-normalised image features the logits use. For a method whose image
        side is prompt-free these are CLIP's frozen features.
      text: [..., C, E] the L2-normalised class features the logits use: [C, E] for a
        context shared by all images, [B, C, E] per image (CoCoOp), [L, C, E] or [B, L, C, E]
        per Monte Carlo sample (Bayesian prompts). Leading axes are read as repetitions of
        the class set.
      penalty: the rest of the method's own loss, so that ``loss == CE(logits, labels) +
        penalty`` (0 for methods trained with cross-entropy alone; Bayesian prompts: the
        weighted posterior KL).
      metrics: the method's own extra metrics (named so they do not collide with a wrapper's).
    """

    logits: Array
    image: Array
    text: Array
    penalty: Array | float = 0.0
    metrics: Mapping[str, Array] = {}


class PromptedFeatures(NamedTuple):
    """What a method declares so that a wrapper can regularise its features (self-regulation).

    Attributes:
      forward: ``forward(prompt, clip, task, images, *, key=None) -> Forward``: one forward pass
        of the method (``key`` drives sampling where the method samples).
      prompted_image: whether the image features depend on the prompt (IVLP, MaPLe); False
        when the image side is CLIP's frozen encoder (CoOp, CoCoOp, Bayesian prompts), so a
        wrapper neither regularises it nor encodes the images a second time.
    """

    forward: Callable[..., Forward]
    prompted_image: bool


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
      prepare: optional ``prepare(clip, task) -> PromptMethod``: the same method with work
        that depends only on the frozen model and the training classes done once, before
        training (PromptSRC's teacher text features). Trainers call it if present.
      aggregator: optional ``aggregator(num_epochs) -> (init, update, result)``: how the
        method combines its per-epoch prompts into the one it reports (PromptSRC's Gaussian
        prompt aggregation, :mod:`jaxprompt.gpa`). Trainers use it if present.
      frozen_image: optional :class:`FrozenImageSide` for methods whose image features do not
        depend on the prompt (CoOp, CoCoOp, zero-shot); TPT takes its fast path from it.
      features: optional :class:`PromptedFeatures`: the method's forward pass with its image
        and class features, which the self-regulation wrapper
        (:func:`jaxprompt.methods.selfreg.self_regulated`) needs; methods without it cannot be
        wrapped.
    """

    init: Callable[..., Prompt]
    logits: Callable[..., Array]
    loss: Callable[..., tuple[Array, Metrics]]
    name: str = ""
    config: Mapping[str, Any] = {}
    encode_classes: Callable[..., Array] | None = None
    classify: Callable[..., Array] | None = None
    prepare: Callable[..., PromptMethod] | None = None
    aggregator: Callable[[int], Any] | None = None
    frozen_image: FrozenImageSide | None = None
    features: PromptedFeatures | None = None


def split_features(
    encode_classes: Callable[..., Array],
    encode_images: Callable[..., Array],
    *,
    prompted_image: bool,
) -> PromptedFeatures:
    """:class:`PromptedFeatures` of a method whose logits are ``cosine_logits`` of one image
    encoding and one class encoding shared by the batch (CoOp, IVLP, MaPLe, zero-shot).

    Args:
      encode_classes: ``encode_classes(prompt, clip, task) -> [C, E]``.
      encode_images: ``encode_images(prompt, clip, images) -> [B, E]``.
      prompted_image: whether ``encode_images`` depends on the prompt.
    """

    def forward(prompt, clip, task, images, *, key=None):
        del key  # deterministic
        # cosine_logits' arithmetic, with the normalised features kept for the wrapper (one
        # normalisation feeding both the logits and any agreement term, as PromptSRC has it).
        text = clip_lib.normalize(encode_classes(prompt, clip, task))
        image = clip_lib.normalize(encode_images(prompt, clip, images))
        if not prompted_image:
            image = jax.lax.stop_gradient(image)
        logits = clip_lib.logit_scale(clip) * image @ text.T
        return Forward(logits=logits, image=image, text=text)

    return PromptedFeatures(forward=forward, prompted_image=prompted_image)


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


def split_init_words(
    clip: clip_lib.Clip, words: str | None, n_ctx: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """Token ids of the init words, split into the learnable slots and the fixed rest.

    The IVLP / PromptSRC / MaPLe reference tokenizes the whole init phrase into the prompt
    ("a photo of a <name>.") and lets the learnable context replace only its first ``n_ctx``
    tokens, so the words past them stay in the sentence as frozen tokens.

    Args:
      clip: the model whose tokenizer to use.
      words: the init phrase (``_`` read as a space), or ``None`` / ``""``.
      n_ctx: number of learnable context vectors.

    Returns:
      ``(learn_ids [n_ctx], fixed_ids [k])`` NumPy int32, or ``(None, [])`` when there are no
      words or fewer than ``n_ctx`` tokens (random context behind an "X X ..." placeholder in
      the reference, which is the same token sequence as no fixed words).
    """
    empty = np.zeros((0,), np.int32)
    if not words:
        return None, empty
    ids, eot = clip_lib.tokenize(clip, [words.replace("_", " ")])
    tokens = ids[0, 1 : eot[0]]  # without SOT / EOT
    if tokens.shape[0] < n_ctx:
        return None, empty
    return tokens[:n_ctx], tokens[n_ctx:]


def with_fixed_words(clip: clip_lib.Clip, ctx: Array, fixed_ids: np.ndarray) -> Array:
    """``ctx`` [n, D] followed by the frozen embeddings of ``fixed_ids`` -> [n + k, D] float32.

    The fixed words are constants (``stop_gradient``): gradients are taken w.r.t. the prompt
    only, and the token table is CLIP's.
    """
    fixed = clip_lib.embed_tokens(clip, jnp.asarray(fixed_ids, jnp.int32)).astype(jnp.float32)
    return jnp.concatenate([ctx, jax.lax.stop_gradient(fixed)], axis=0)


def check_base(base: Any, *, wrapper: str) -> PromptMethod:
    """``base`` if it is a :class:`PromptMethod` a wrapper (TPT, POUF, self-regulation) can
    take, else a one-line ``ValueError`` (names and dicts are resolved by
    ``jaxprompt.methods.get``)."""
    if not isinstance(base, PromptMethod):
        raise ValueError(
            f"{wrapper}: base must be a PromptMethod, got {type(base).__name__}; for a name "
            f"use jaxprompt.methods.get({wrapper!r}, base=NAME, base_kwargs={{...}})"
        )
    if base.name == wrapper:
        raise ValueError(f"{wrapper} cannot wrap itself")
    return base
