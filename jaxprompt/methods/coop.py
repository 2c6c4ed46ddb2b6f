"""CoOp: context optimisation, learned prompt vectors in front of the class name.

Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv 2109.01134; reference github.com/KaiyangZhou/CoOp @ff61507.

The text prompt of class c is ``[SOT] v_1 .. v_n <name_c> . [EOT]`` where the context vectors
v are shared by all classes (or one set per class, ``class_specific=True``). The context
receives the positional embedding like the word embeddings it replaces. Logits are CLIP's:
``100 * cos(image, text)``; the loss is cross-entropy. Because the class tokens come from the
:class:`~jaxprompt.clip.Task` at call time, a shared context is evaluated on new classes as is.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxprompt import clip as clip_lib
from jaxprompt.methods import base

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 16  # CoOp's; with init_words the words' token count is used instead


def coop(
    n_ctx: int = DEFAULT_N_CTX,
    *,
    init_words: str | None = None,
    class_specific: bool = False,
    class_position: str = "end",
    init_std: float = 0.02,
    remat: bool = False,
    shared_prefix: bool = True,
) -> base.PromptMethod:
    """CoOp.

    Args:
      n_ctx: number of context vectors (ignored when ``init_words`` is given: then the context
        has one vector per token of those words, as in CoOp).
      init_words: initialise the context from these words' token embeddings (e.g.
        ``"a photo of a"``); ``None`` draws it from N(0, init_std^2).
      class_specific: one context per class (CoOp's CSC); the prompt is then ``[C, n, D]`` and
        only fits the class count it was initialised for. A random context is drawn
        independently for every class; ``init_words`` start every class at the same words.
      class_position: ``"end"``, ``"middle"`` or ``"front"``.
      init_std: standard deviation of the random initialisation.
      remat: rematerialise text blocks in the backward pass (memory for many classes).
      shared_prefix: encode ``[SOT] ctx`` once for all classes
        (:func:`~jaxprompt.clip.encode_text_shared`; same features, about ``(1 + n + L) / L``
        times less text-tower work). Only a shared context with the class at the end can
        share it; class-specific contexts and ``"middle"`` / ``"front"`` always take the plain
        path. ``False`` forces the plain path everywhere (for comparison).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` with prompt ``{"ctx": [n, D]}`` or
      ``{"ctx": [C, n, D]}``.
    """
    if class_position not in ("end", "middle", "front"):
        raise ValueError(
            f"class_position must be 'end', 'middle' or 'front', got {class_position!r}"
        )
    if init_words is None and n_ctx < 1:
        raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")

    def init(key, clip, task):
        if init_words:
            ctx = base.word_embeddings(clip, init_words)
            if ctx.shape[0] != n_ctx != DEFAULT_N_CTX:
                # CoOp sizes the context by the words; an n_ctx that was asked for (not the
                # default) and disagrees would otherwise be recorded in the config unnoticed.
                log.warning(
                    "init_words %r are %d tokens on this CLIP's tokenizer: the context has %d "
                    "vectors (n_ctx=%d is not used)",
                    init_words, ctx.shape[0], ctx.shape[0], n_ctx,
                )  # fmt: skip
            if class_specific:
                # Every class starts from the same words (the reference then keeps one shared
                # context; here each class gets its own copy to train).
                ctx = jnp.broadcast_to(ctx, (len(task),) + ctx.shape)
        else:
            # The reference draws a [C, n, D] tensor for CSC: every class its own random
            # context, not one draw repeated over the classes.
            shape = ((len(task),) if class_specific else ()) + (n_ctx, clip.spec.text_width)
            ctx = init_std * jax.random.normal(key, shape, jnp.float32)
        clip_lib.check_context(clip, task, ctx.shape[-2])
        return {"ctx": jnp.asarray(ctx, jnp.float32)}

    def encode_classes(prompt, clip, task):
        ctx = prompt["ctx"]
        if ctx.ndim == 3 and ctx.shape[0] != len(task):
            raise ValueError(
                f"this class-specific CoOp context has {ctx.shape[0]} classes but the task has "
                f"{len(task)}: class-specific prompts only evaluate on their own classes"
            )
        # Shared context, class at the end: the prefix-shared encoder; otherwise the plain one.
        return clip_lib.prompted_text_features(
            clip, task, ctx, position=class_position, remat=remat, shared_prefix=shared_prefix
        )

    def classify(prompt, clip, classes, images):
        del prompt
        return base.cosine_logits(clip, clip_lib.encode_image(clip, images), classes)

    logits = base.split_logits(encode_classes, classify)
    return base.PromptMethod(
        init=init,
        logits=logits,
        loss=base.supervised_loss(logits),
        name="coop",
        config=dict(
            n_ctx=n_ctx,
            init_words=init_words,
            class_specific=class_specific,
            class_position=class_position,
            init_std=init_std,
            remat=remat,
            shared_prefix=shared_prefix,
        ),
        encode_classes=encode_classes,
        # No image prompt: the image side is CLIP's frozen encoder.
        frozen_image=base.FrozenImageSide(tuned=lambda p, f: p, class_features=encode_classes),
        classify=classify,
        features=base.split_features(
            encode_classes, lambda p, c, x: clip_lib.encode_image(c, x), prompted_image=False
        ),
    )
