"""CoCoOp: conditional context optimisation, a context shifted by each image.

Zhou, Yang, Loy, Liu, "Conditional Prompt Learning for Vision-Language Models", CVPR 2022,
arXiv 2203.05557; reference github.com/KaiyangZhou/CoOp @ff61507 (``trainers/cocoop.py``).

A small meta-network maps the L2-normalised image feature x to a shift pi(x) added to every
context vector, so each image gets its own prompts:

    pi(x) = W2 relu(W1 x + b1) + b2,        t_c(x) = [SOT] (v_1 + pi) .. (v_n + pi) <name_c> . [EOT]
    logits[b, c] = 100 * cos(x_b, text(t_c(x_b)))

The loss is CoOp's cross-entropy on these per-image logits. The reference loops over the images
of a batch (and runs batch 1); here the per-image text pass is a ``jax.vmap`` over the batch, so
the text tower sees B x C sequences, and its blocks are rematerialised by default to keep the
backward pass at one layer's activations. By default (``shared_prefix``) each image's
``[SOT] ctx(x)`` prefix runs once and the class suffixes attend to it.

The text side depends on the image, so this method has no ``encode_classes`` / ``classify``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxprompt import clip as clip_lib
from jaxprompt.methods import base


def _linear_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    # PyTorch nn.Linear's default: kaiming_uniform(a=sqrt(5)) on the weight, which is
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound),
    }


def meta_net(params: base.Prompt, x: jax.Array) -> jax.Array:
    """The meta-network: ``linear2(relu(linear1(x)))`` on [..., E] -> [..., D_text]."""
    h = jax.nn.relu(x @ params["linear1"]["kernel"] + params["linear1"]["bias"])
    return h @ params["linear2"]["kernel"] + params["linear2"]["bias"]


def cocoop(
    n_ctx: int = 4,
    *,
    init_words: str | None = "a photo of a",
    meta_ratio: int = 16,
    init_std: float = 0.02,
    remat: bool = True,
    shared_prefix: bool = True,
    chunk: int | None = None,
) -> base.PromptMethod:
    """CoCoOp.

    Prompt pytree (float32, kernels ``[in, out]``)::

        {"ctx": [n, D_text],
         "meta_net": {"linear1": {"kernel": [E, E // meta_ratio], "bias": [E // meta_ratio]},
                      "linear2": {"kernel": [E // meta_ratio, D_text], "bias": [D_text]}}}

    with E the CLIP embedding width (512 at ViT-B/16, hidden 32).

    Initialisation: ``ctx`` from the token embeddings of ``init_words`` (or N(0, init_std^2)
    without them); both Linears like PyTorch's ``nn.Linear`` default, weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the reference builds them.

    Args:
      n_ctx: context length; ignored when ``init_words`` is given, where the context has one
        vector per token of those words (as in the reference and in :func:`coop`).
      init_words: initial context words (``"a photo of a"`` in the reference).
      meta_ratio: the meta-net's hidden width is ``E // meta_ratio`` (16 in the reference).
      init_std: standard deviation of the random context initialisation.
      remat: rematerialise the text blocks in the backward pass (B x C text sequences per
        step make this the memory bound of CoCoOp).
      shared_prefix: encode each image's ``[SOT] ctx(x)`` once for all classes
        (:func:`~jaxprompt.clip.encode_text_shared`, one prefix group per image, the class
        suffixes shared): the same features with about ``(1 + n + L) / L`` times less
        text-tower work and activation memory. ``False`` takes the plain path (for comparison).
      chunk: images whose text passes run together (a ``lax.map`` over groups of ``chunk``
        images, each group a ``vmap``); None (or 0, for configs) runs the whole batch at once.
        Memory: with remat, a step keeps each text layer's input for every image
        (layers x B x C x S x D floats) plus the working set of ONE layer for the images
        running together, so ``chunk`` shrinks only the second part: at ViT-B/16, 1000
        classes, batch 4, a training step's temporaries go from about 2.0 GiB (all at once)
        to 1.5 GiB (``chunk=1``; ``benchmarks/text_tower.py --only cocoop`` measures them).
        Speed: no extra recomputation, only smaller matrix products per step, which costs
        little on CPUs and more on accelerators that need large batches to fill. Under a
        data-sharded batch each step takes the same share of every device's images, so
        ``chunk`` should be a multiple of the data axis.

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"cocoop"``.
    """
    if init_words is None and n_ctx < 1:
        raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
    if meta_ratio < 1:
        raise ValueError(f"meta_ratio must be >= 1, got {meta_ratio}")
    if chunk is not None and chunk < 0:
        raise ValueError(f"chunk must be a number of images (0 or None: all), got {chunk}")
    chunk = chunk or None  # 0 from a config means "all at once"

    def init(key, clip, task):
        embed, dt = clip.spec.embed_dim, clip.spec.text_width
        # The reference hard-codes vis_dim // 16 with vis_dim = CLIP's embed dim (512 -> 32).
        hidden = embed // meta_ratio
        if hidden < 1:
            raise ValueError(
                f"meta_ratio {meta_ratio} leaves no hidden units for embed dim {embed}: "
                f"use meta_ratio <= {embed}"
            )
        k_ctx, k1, k2 = jax.random.split(key, 3)
        if init_words:
            ctx = base.word_embeddings(clip, init_words)
        else:
            ctx = init_std * jax.random.normal(k_ctx, (n_ctx, dt), jnp.float32)
        clip_lib.check_context(clip, task, ctx.shape[0])
        return {
            "ctx": jnp.asarray(ctx, jnp.float32),
            "meta_net": {
                "linear1": _linear_init(k1, embed, hidden),
                "linear2": _linear_init(k2, hidden, dt),
            },
        }

    def forward(prompt, clip, task, images, *, key=None):
        del key  # deterministic
        # The image tower has no prompt: its features are constants of the prompt.
        img = jax.lax.stop_gradient(clip_lib.normalize(clip_lib.encode_image(clip, images)))
        shift = meta_net(prompt["meta_net"], img)  # [B, D_text]
        scale = clip_lib.logit_scale(clip)

        def one_image(shift_b, img_b):
            ctx = prompt["ctx"] + shift_b[None, :]  # [n, D]: the same shift on every vector
            # Under the vmap only the prefix carries the batch axis: the class suffixes are
            # the task's, so they are embedded once and shared by every image's group.
            txt = clip_lib.normalize(
                clip_lib.prompted_text_features(
                    clip, task, ctx, remat=remat, shared_prefix=shared_prefix
                )
            )
            return txt, scale * txt @ img_b  # [C, E] normalised, [C]

        # vmap rather than a Python loop over images: one traced text pass serves any batch
        # size, and under a data-sharded batch each device runs its own images' B/n x C texts.
        n_img = shift.shape[0]
        if chunk is None or chunk >= n_img:
            text, logits = jax.vmap(one_image)(shift, img)  # [B, C, E], [B, C]
        else:
            # Groups of `chunk` images, one lax.map step each. Image b = i * steps + j goes to
            # step j: every step takes rows spread over the batch, so with the batch split
            # over devices in contiguous blocks each device keeps working on its own images.
            steps = -(-n_img // chunk)
            pad = steps * chunk - n_img

            def grouped(x):
                x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
                return jnp.swapaxes(x.reshape((chunk, steps) + x.shape[1:]), 0, 1)

            def ungrouped(y):
                return jnp.swapaxes(y, 0, 1).reshape((steps * chunk,) + y.shape[2:])[:n_img]

            out = jax.lax.map(lambda a: jax.vmap(one_image)(*a), (grouped(shift), grouped(img)))
            text, logits = jax.tree.map(ungrouped, out)
        return base.Forward(logits=logits, image=img, text=text)

    def logits(prompt, clip, task, images, *, key=None):
        return forward(prompt, clip, task, images, key=key).logits

    def tuned(prompt, feature):
        # [n, D]: one image's generated context (the shift is the same on every vector).
        return {"ctx": prompt["ctx"] + meta_net(prompt["meta_net"], feature)[None, :]}

    def class_features(tuned_prompt, clip, task):
        # TPT+CoCoOp encodes the classes through here: the same prefix sharing as training.
        return clip_lib.prompted_text_features(
            clip, task, tuned_prompt["ctx"], remat=remat, shared_prefix=shared_prefix
        )

    return base.PromptMethod(
        init=init,
        logits=logits,
        loss=base.supervised_loss(logits),
        name="cocoop",
        frozen_image=base.FrozenImageSide(
            tuned=tuned, class_features=class_features, per_image=True
        ),
        # Class features per image: [B, C, E].
        features=base.PromptedFeatures(forward=forward, prompted_image=False),
        config=dict(
            n_ctx=n_ctx,
            init_words=init_words,
            meta_ratio=meta_ratio,
            init_std=init_std,
            remat=remat,
            shared_prefix=shared_prefix,
            chunk=chunk,
        ),
    )
