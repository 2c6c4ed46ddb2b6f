"""IVLP: independent vision-language deep prompting (the PromptSRC paper's baseline).

Khattak, Wasim, Naseer, Khan, Yang, Khan, "Self-regulating Prompts: Foundational Model
Adaptation without Forgetting", ICCV 2023, arXiv 2307.06948; reference
github.com/muzairkhattak/PromptSRC @bb95c77 (``trainers/independentVL.py``, the IVLP config
``vit_b16_c2_ep20_batch4_4+4ctx``). The baseline itself first appeared in MaPLe (arXiv 2210.03117).

Separate learnable tokens in both towers of a frozen CLIP, with no coupling between them:

* Text: ``[SOT] ctx_1..ctx_nt <fixed words> <name> . [EOT]``; the input context gets the
  positional embedding. The sentence is always the init phrase's ("a photo of a <name>."): the
  context replaces its first n_t tokens and any words past them stay as frozen tokens.
  Before each layer ``i = 1 .. depth-1`` the positions ``1..nt`` of the residual stream are
  *replaced* by ``deep_text[i-1]`` (no positional embedding).
* Vision: ``n_v`` tokens appended after ``[CLS] <patches>`` (no positional embedding, through
  the pre-LayerNorm); before layer ``i`` the last ``n_v`` tokens are replaced by
  ``deep_vision[i-1]``.
* Layers from ``depth`` on get no fresh tokens; the prompt positions carry on (not dropped).

Depth counts the input layer: ``depth=9`` is one input prompt plus 8 deep matrices per tower,
46,080 parameters at ViT-B/16 with 4 + 4 tokens. The loss is cross-entropy alone. The prompt
placement itself lives in :func:`jaxprompt.clip.encode_text` / :func:`~jaxprompt.clip.encode_image`
(and is tested against a NumPy reference there); this module builds and initialises the tensors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprompt import clip as clip_lib
from jaxprompt.methods import base

# Kept under this name for existing callers; the check lives in jaxprompt.clip.
check_depth = clip_lib.check_depth


def ivlp(
    *,
    depth: int = 9,
    n_ctx_text: int = 4,
    n_ctx_vision: int = 4,
    init_words: str | None = "a photo of a",
    init_std: float = 0.02,
    remat: bool = False,
    shared_prefix: bool = True,
) -> base.PromptMethod:
    """IVLP: deep, independent text and vision prompts, trained with cross-entropy.

    Prompt pytree (float32)::

        {"ctx": [n_t, D_text], "vision_ctx": [n_v, D_vision],
         "deep_text": [depth-1, n_t, D_text], "deep_vision": [depth-1, n_v, D_vision]}

    ``deep_*[i]`` replaces the prompt tokens on the residual stream entering layer ``i + 1``.

    Args:
      depth: number of layers carrying fresh prompts, counting the input layer (>= 1 and at
        most the number of layers of the CLIP it is initialised on).
      n_ctx_text: text context length n_t.
      n_ctx_vision: vision prompt length n_v.
      init_words: the text context starts at the token embeddings of the first
        ``n_ctx_text`` tokens of these words (the reference's "a photo of a" with 4 tokens);
        tokens past them stay in the prompt as fixed words before the class name
        (``n_ctx_text=2``: learnable "a photo", fixed "of a"). With fewer tokens than
        ``n_ctx_text`` (or ``None``) the context is N(0, init_std^2) and there are no fixed words.
      init_std: standard deviation of the random initialisations (0.02 in the reference).
      remat: rematerialise the transformer blocks in the backward pass.
      shared_prefix: encode ``[SOT] ctx <fixed words>`` once for all classes
        (:func:`~jaxprompt.clip.encode_text_shared`: deep text prompts replace positions
        inside that prefix, so it is the same for every class); ``False`` runs the plain
        encoder on every class's full sequence (same features, for comparison).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"ivlp"``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (1 = input-level prompts only), got {depth}")
    if n_ctx_text < 1 or n_ctx_vision < 1:
        raise ValueError(
            f"n_ctx_text and n_ctx_vision must be >= 1, got {n_ctx_text} and {n_ctx_vision}"
        )

    def init(key, clip, task):
        check_depth(clip, depth)
        learn_ids, fixed_ids = base.split_init_words(clip, init_words, n_ctx_text)
        clip_lib.check_context(clip, task, n_ctx_text + len(fixed_ids))
        dt, dv = clip.spec.text_width, clip.spec.vision_width
        k_ctx, k_vis, k_dt, k_dv = jax.random.split(key, 4)

        def normal(k, shape):
            return init_std * jax.random.normal(k, shape, jnp.float32)

        # Token count, not word count: a BPE tokenizer may split a word into several tokens.
        if learn_ids is not None:
            # The reference takes the first n_t rows of the tokenized phrase; the rest of the
            # phrase stays in the prompt text (see encode_classes).
            ctx = clip_lib.embed_tokens(clip, jnp.asarray(learn_ids))
        else:
            # The reference falls back to random context (behind an "X X X X" placeholder,
            # which is the same sequence as [SOT] ctx <name>) when the words do not fill it.
            ctx = normal(k_ctx, (n_ctx_text, dt))
        return {
            "ctx": jnp.asarray(ctx, jnp.float32),
            "vision_ctx": normal(k_vis, (n_ctx_vision, dv)),
            "deep_text": normal(k_dt, (depth - 1, n_ctx_text, dt)),
            "deep_vision": normal(k_dv, (depth - 1, n_ctx_vision, dv)),
        }

    def encode_classes(prompt, clip, task):
        # [C, 1 + n_t + k + L, D]: the shared context sits right after SOT, then the k fixed
        # init words, then the class name, so the EOT index is that of the tokenized
        # "a photo of a <name>." whatever n_t is. Deep prompts replace positions 1..n_t only.
        _, fixed_ids = base.split_init_words(clip, init_words, prompt["ctx"].shape[0])
        full = base.with_fixed_words(clip, prompt["ctx"], fixed_ids)
        # Depth 1 stores [0, n, D] deep prompts (a fixed pytree layout); the towers then get none.
        deep = prompt["deep_text"] if prompt["deep_text"].shape[0] else None
        # [SOT] ctx <fixed words> is the same for every class (deep prompts replace positions
        # 1..n_t inside it), so by default it is encoded once.
        return clip_lib.prompted_text_features(
            clip, task, full, deep=deep, remat=remat, shared_prefix=shared_prefix
        )

    def encode_images(prompt, clip, images):
        deep = prompt["deep_vision"] if prompt["deep_vision"].shape[0] else None
        return clip_lib.encode_image(
            clip, images, prompts=prompt["vision_ctx"], deep=deep, remat=remat
        )

    def classify(prompt, clip, classes, images):
        # The image side is the only one that sees the batch: evaluation encodes the class set
        # once with encode_classes and reuses it for every test batch.
        return base.cosine_logits(clip, encode_images(prompt, clip, images), classes)

    logits = base.split_logits(encode_classes, classify)

    return base.PromptMethod(
        init=init,
        logits=logits,
        loss=base.supervised_loss(logits),
        name="ivlp",
        config=dict(
            depth=depth,
            n_ctx_text=n_ctx_text,
            n_ctx_vision=n_ctx_vision,
            init_words=init_words,
            init_std=init_std,
            remat=remat,
            shared_prefix=shared_prefix,
        ),
        encode_classes=encode_classes,
        classify=classify,
        features=base.split_features(encode_classes, encode_images, prompted_image=True),
    )
