"""Zero-shot CLIP with hand-crafted templates and template ensembles.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020. The per-dataset templates are CoOp's (arXiv 2109.01134); the ensemble is CLIP's
80 ImageNet templates. There is nothing to learn: the prompt is an empty pytree.

Ensembling follows CLIP: each template's text feature is L2-normalised, the normalised features
are averaged over templates, and the mean is normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from jaxprompt import clip as clip_lib
from jaxprompt import templates as templates_lib
from jaxprompt.methods import base

# ``templates=DATASET``: each task's own template (``Task.template``).
DATASET = "dataset"


def zeroshot(
    *, templates: str | Sequence[str] = ("a photo of a {}.",), chunk: int = 1024
) -> base.PromptMethod:
    """Zero-shot CLIP.

    Args:
      templates: template strings with ``{}`` for the class name, the name of a set in
        :data:`jaxprompt.templates.TEMPLATE_SETS` (``"imagenet_80"`` for CLIP's ensemble), or
        ``"dataset"``: the task's own hand-crafted template (``Task.template``, CoOp's per
        dataset: the CLIP rows of the prompt-learning papers), so one method serves every
        dataset it is evaluated on.
      chunk: text sequences encoded at a time when building the ensemble classifier, bounding
        memory for many classes times many templates.

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
        config={"templates": DATASET if per_task else list(templates), "chunk": chunk},
        encode_classes=encode_classes,
        # No image prompt: the image side is CLIP's frozen encoder.
        frozen_image=base.FrozenImageSide(tuned=lambda p, f: p, class_features=encode_classes),
        classify=classify,
    )
