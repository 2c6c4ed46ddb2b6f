"""Zero-shot CLIP with hand-crafted templates and template ensembles.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020. The per-dataset templates are CoOp's (arXiv 2109.01134); the ensemble is CLIP's
80 ImageNet templates. There is nothing to learn: the prompt is an empty pytree.

Ensembling follows CLIP: each template's text feature is L2-normalised, the normalised features
are averaged over templates, and the mean is normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import clip as clip_lib
from jaxprompt import templates as templates_lib
from jaxprompt.methods import base

# ``templates=DATASET``: each task's own template (``Task.template``).
DATASET = "dataset"


def _common_prefix(ids: np.ndarray) -> int:
    """Length of the token prefix every row of ``ids`` [N, L] shares (at least the SOT)."""
    same = np.all(ids == ids[:1], axis=0)
    return int(np.argmin(same)) if not same.all() else ids.shape[1] - 1


def template_features(clip: clip_lib.Clip, ids: np.ndarray, eot: np.ndarray) -> jax.Array:
    """Frozen text features of K templates over C classes, each template's prefix run once.

    The tokens a template puts before the class name (``[SOT] a photo of a``) are the same for
    every class, so :func:`~jaxprompt.clip.encode_text_shared` encodes them once per template.
    The shared prefix is read off the token ids (the longest prefix all rows of a template
    agree on), so it is exact whatever the tokenizer does around ``{}``. Templates with the same
    prefix length are encoded one after another in a ``lax.map`` (memory of one template's C
    sequences at a time); each distinct prefix length is one more traced tower, so a template
    shares the largest power of two not above its prefix (any shorter prefix is shared too).
    PromptSRC's 60 templates have 13 to 17 distinct prefix lengths but only 4 such buckets: 4
    towers to compile instead of up to 17, for at most half of each prefix encoded per class.

    Args:
      clip: the frozen model.
      ids: [K, C, L] NumPy token ids of every (template, class) text, EOT-padded.
      eot: [K, C] EOT positions.

    Returns:
      [K, C, E] float32 features, not normalised.
    """
    n_t, n_c, length = ids.shape
    prefix_len = [1 << (max(1, _common_prefix(ids[k])).bit_length() - 1) for k in range(n_t)]
    table = clip_lib.embed_tokens(clip, jnp.asarray(ids))  # [K, C, L, D]
    out: list[jax.Array | None] = [None] * n_t
    for p_len in sorted(set(prefix_len)):
        group = [k for k in range(n_t) if prefix_len[k] == p_len]
        sel = jnp.asarray(group)
        prefix = table[sel, 0, :p_len]  # [G, P, D]: row 0 stands for every class
        suffix = table[sel, :, p_len:]  # [G, C, L - P, D]
        e = jnp.asarray(eot[group])

        def one(args):
            return clip_lib.encode_text_shared(clip, *args)

        feats = jax.lax.map(one, (prefix, suffix, e))  # [G, C, E]
        for i, k in enumerate(group):
            out[k] = feats[i]
    return jnp.stack(out)


def zeroshot(
    *,
    templates: str | Sequence[str] = ("a photo of a {}.",),
    chunk: int = 1024,
    shared_prefix: bool = True,
) -> base.PromptMethod:
    """Zero-shot CLIP.

    Args:
      templates: template strings with ``{}`` for the class name, the name of a set in
        :data:`jaxprompt.templates.TEMPLATE_SETS` (``"imagenet_80"`` for CLIP's ensemble), or
        ``"dataset"``: the task's own hand-crafted template (``Task.template``, CoOp's per
        dataset: the CLIP rows of the prompt-learning papers), so one method serves every
        dataset it is evaluated on.
      chunk: text sequences encoded at a time when building the ensemble classifier, bounding
        memory for many classes times many templates (plain path).
      shared_prefix: encode each template's words before the class name once for all classes
        (:func:`template_features`; same features); ``False``: every text in full, ``chunk``
        at a time.

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` whose prompt is ``{}``.
    """
    per_task = templates == DATASET
    if per_task:
        templates = ()
    elif isinstance(templates, str):
        if templates not in templates_lib.TEMPLATE_SETS:
            if "{}" not in templates:
                raise ValueError(
                    f"unknown template set {templates!r}: pass templates containing '{{}}' or "
                    f"one of {sorted(templates_lib.TEMPLATE_SETS)}"
                )
            templates = (templates,)
        else:
            templates = templates_lib.TEMPLATE_SETS[templates]
    templates = tuple(templates)
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' for the class name")

    def init(key, clip, task):
        del key, clip, task
        return {}

    def task_templates(task) -> tuple[str, ...]:
        if not per_task:
            return templates
        if task.template is None:
            raise ValueError(
                "zeroshot(templates='dataset') needs the dataset's template on the task: "
                "make_task(clip, names, template=...)"
            )
        return (task.template,)

    def encode_classes(prompt, clip, task):
        del prompt
        names = [n.replace("_", " ") for n in task.names]
        used = task_templates(task)
        texts = [t.format(n) for t in used for n in names]
        # Tokenized once per trace; the class set is static in the Task.
        ids, eot = clip_lib.tokenize(clip, texts)
        if shared_prefix:
            feats = template_features(
                clip,
                ids.reshape(len(used), len(names), -1),
                eot.reshape(len(used), len(names)),
            )
        else:
            feats = clip_lib.encode_token_ids(
                clip, jnp.asarray(ids), jnp.asarray(eot), chunk=chunk
            ).reshape(len(used), len(names), -1)
        return clip_lib.normalize(jnp.mean(clip_lib.normalize(feats), axis=0))

    def classify(prompt, clip, classes, images):
        del prompt
        return base.cosine_logits(clip, clip_lib.encode_image(clip, images), classes)

    logits = base.split_logits(encode_classes, classify)
    return base.PromptMethod(
        init=init,
        logits=logits,
        loss=base.supervised_loss(logits),
        name="zeroshot",
        config={
            "templates": DATASET if per_task else list(templates),
            "chunk": chunk,
            "shared_prefix": shared_prefix,
        },
        encode_classes=encode_classes,
        # No image prompt: the image side is CLIP's frozen encoder.
        frozen_image=base.FrozenImageSide(tuned=lambda p, f: p, class_features=encode_classes),
        classify=classify,
        features=base.split_features(
            encode_classes, lambda p, c, x: clip_lib.encode_image(c, x), prompted_image=False
        ),
    )
