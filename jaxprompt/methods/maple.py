"""MaPLe: multi-modal prompt learning with vision prompts coupled to the text prompts.

Khattak, Rasheed, Maaz, Khan, Khan, "MaPLe: Multi-modal Prompt Learning", CVPR 2023,
arXiv 2210.03117; reference github.com/muzairkhattak/multimodal-prompt-learning, as summarised
in the PromptSRC spec (section 12) checked against github.com/muzairkhattak/PromptSRC @bb95c77
(``trainers/maple.py``'s prompt learner).

Text side as in IVLP (``[SOT] ctx <fixed words> <name> . [EOT]``, deep text prompts replacing
positions ``1..n_ctx`` before layers ``1..depth-1``), which matters here because MaPLe's
context is shorter than its init words: with ``init_words="a photo of a"`` and ``n_ctx=2`` the
two learnable vectors start at the embeddings of "a photo" and the remaining words "of a" stay
as FIXED (frozen) tokens between the context and the class name, so the sequence is still
``"a photo of a <name>."`` token for token.

Vision side: the vision prompts are not parameters of their own but linear "coupling"
projections of the text prompts, one ``Linear(D_text -> D_vision)`` (with bias) per layer:
``vision_ctx = ctx @ K[0] + b[0]`` is appended after the patches, and
``deep_vision[i] = deep_text[i] @ K[i + 1] + b[i + 1]`` replaces the last tokens before layer
``i + 1`` (placement as in IVLP). The projections dominate the parameter count: about 3.55M at
ViT-B/16 with depth 9 and 2 tokens (:func:`maple_param_count`). Loss: cross-entropy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxprompt import clip as clip_lib
from jaxprompt.methods import base


def maple_param_count(*, depth: int, n_ctx: int, text_width: int, vision_width: int) -> int:
    """Trainable parameters of MaPLe: text prompts plus one biased projection per layer.

    ``depth * n_ctx * text_width`` (input context and ``depth - 1`` deep text prompts) plus
    ``depth * (text_width * vision_width + vision_width)`` (the coupling Linears).

    Example:
      >>> maple_param_count(depth=9, n_ctx=2, text_width=512, vision_width=768)
      3555072
    """
    return depth * n_ctx * text_width + depth * (text_width * vision_width + vision_width)


def text_inputs(
    prompt: base.Prompt,
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    *,
    init_words: str | None = "a photo of a",
) -> tuple[jax.Array, jax.Array]:
    """``[SOT] ctx <fixed init words> <name> . [EOT]`` embeddings for every class.

    Args:
      prompt: a MaPLe prompt (only ``"ctx"`` [n_ctx, D_text] is read).
      clip: the frozen model.
      task: the class set.
      init_words: the method's init words; those past the first ``n_ctx`` tokens are embedded
        with the frozen token table and kept fixed.

    Returns:
      ``(embeds, eot)``: [C, 1 + n_ctx + n_fixed + L, D_text] and [C].
    """
    ctx = prompt["ctx"]
    _, fixed_ids = base.split_init_words(clip, init_words, ctx.shape[0])
    # The fixed words sit where the reference's suffix buffer has them, right after the
    # learnable slots: [n_ctx + n_fixed, D].
    full = base.with_fixed_words(clip, ctx, fixed_ids)
    return clip_lib.prompted_text_inputs(clip, task, full)


def vision_prompts(prompt: base.Prompt) -> tuple[jax.Array, jax.Array]:
    """The coupled vision prompts: projections of the text prompts.

    Returns:
      ``(vision_ctx, deep_vision)``: [n_ctx, D_vision] and [depth-1, n_ctx, D_vision].
    """
    kernel, bias = prompt["proj"]["kernel"], prompt["proj"]["bias"]  # [J, Dt, Dv], [J, Dv]
    vision_ctx = prompt["ctx"] @ kernel[0] + bias[0]
    # One projection per deep layer: [J-1, n, Dt] x [J-1, Dt, Dv] -> [J-1, n, Dv].
    deep_vision = jnp.einsum("jnd,jdv->jnv", prompt["deep_text"], kernel[1:]) + bias[1:, None]
    return vision_ctx, deep_vision


def maple(
    *,
    depth: int = 9,
    n_ctx: int = 2,
    init_words: str | None = "a photo of a",
    init_std: float = 0.02,
    remat: bool = False,
    shared_prefix: bool = True,
) -> base.PromptMethod:
    """MaPLe.

    Prompt pytree (float32)::

        {"ctx": [n_ctx, D_text],
         "deep_text": [depth-1, n_ctx, D_text],
         "proj": {"kernel": [depth, D_text, D_vision], "bias": [depth, D_vision]}}

    ``proj[0]`` maps ``ctx`` to the input-level vision prompt and ``proj[i]`` maps
    ``deep_text[i-1]`` to the vision prompt that replaces the last tokens before layer ``i``.
    Kernels are ``[in, out]``.

    Initialisation: ``ctx`` from the embeddings of the first ``n_ctx`` tokens of
    ``init_words`` (random N(0, init_std^2) if there are fewer); ``deep_text`` N(0, init_std^2);
    the projections like PyTorch's ``nn.Linear`` default, kernel and bias
    U(-1/sqrt(D_text), 1/sqrt(D_text)), with ``proj[0]`` drawn on its own and ``proj[1:]``
    identical copies of one draw (the reference deep-copies a single Linear for the deep layers).

    Args:
      depth: layers carrying fresh prompts, counting the input layer (1..number of layers).
      n_ctx: learnable text tokens per layer (2 in the reference).
      init_words: initial words; tokens past the first ``n_ctx`` stay as fixed tokens before
        the class name.
      init_std: standard deviation of the random initialisations.
      remat: rematerialise the transformer blocks in the backward pass.
      shared_prefix: encode ``[SOT] ctx <fixed words>`` once for all classes
        (:func:`~jaxprompt.clip.encode_text_shared`: deep text prompts replace positions
        inside that prefix, so it is the same for every class); ``False`` runs the plain
        encoder on every class's full sequence (same features, for comparison).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"maple"``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (1 = input-level prompts only), got {depth}")
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")

    def init(key, clip, task):
        clip_lib.check_depth(clip, depth)
        dt, dv = clip.spec.text_width, clip.spec.vision_width
        learn_ids, fixed_ids = base.split_init_words(clip, init_words, n_ctx)
        clip_lib.check_context(clip, task, n_ctx + len(fixed_ids))
        k_ctx, k_deep, k_first, k_clone = jax.random.split(key, 4)
        if learn_ids is not None:
            ctx = clip_lib.embed_tokens(clip, jnp.asarray(learn_ids)).astype(jnp.float32)
        else:
            ctx = init_std * jax.random.normal(k_ctx, (n_ctx, dt), jnp.float32)
        bound = 1.0 / math.sqrt(dt)  # nn.Linear: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(in))

        def linear(k):
            kk, kb = jax.random.split(k)
            return (
                jax.random.uniform(kk, (dt, dv), jnp.float32, -bound, bound),
                jax.random.uniform(kb, (dv,), jnp.float32, -bound, bound),
            )

        # The reference builds the input-level projection on its own, but the deep ones as
        # deep copies of ONE freshly initialised Linear: proj[1:] start identical (they train
        # apart), proj[0] is an independent draw.
        first_k, first_b = linear(k_first)
        clone_k, clone_b = linear(k_clone)
        kernel = jnp.concatenate([first_k[None], jnp.broadcast_to(clone_k, (depth - 1, dt, dv))])
        bias = jnp.concatenate([first_b[None], jnp.broadcast_to(clone_b, (depth - 1, dv))])
        return {
            "ctx": ctx,
            "deep_text": init_std * jax.random.normal(k_deep, (depth - 1, n_ctx, dt)),
            "proj": {"kernel": kernel, "bias": bias},
        }

    def encode_classes(prompt, clip, task):
        deep = prompt["deep_text"] if prompt["deep_text"].shape[0] else None
        if not shared_prefix:
            embeds, eot = text_inputs(prompt, clip, task, init_words=init_words)
            return clip_lib.encode_text(clip, embeds, eot, deep=deep, remat=remat)
        # [SOT] ctx <fixed words> (text_inputs' prefix) is the same for every class: once.
        _, fixed_ids = base.split_init_words(clip, init_words, prompt["ctx"].shape[0])
        full = base.with_fixed_words(clip, prompt["ctx"], fixed_ids)
        return clip_lib.prompted_text_features(clip, task, full, deep=deep, remat=remat)

    def encode_images(prompt, clip, images):
        vision_ctx, deep_vision = vision_prompts(prompt)
        return clip_lib.encode_image(
            clip,
            images,
            prompts=vision_ctx,
            deep=deep_vision if deep_vision.shape[0] else None,
            remat=remat,
        )

    def classify(prompt, clip, classes, images):
        return base.cosine_logits(clip, encode_images(prompt, clip, images), classes)

    logits = base.split_logits(encode_classes, classify)

    return base.PromptMethod(
        init=init,
        logits=logits,
        loss=base.supervised_loss(logits),
        name="maple",
        config=dict(
            depth=depth,
            n_ctx=n_ctx,
            init_words=init_words,
            init_std=init_std,
            remat=remat,
            shared_prefix=shared_prefix,
        ),
        encode_classes=encode_classes,
        classify=classify,
        features=base.split_features(encode_classes, encode_images, prompted_image=True),
    )
