"""KgCoOp: CoOp held near the hand-crafted prompt's frozen text features.

Yao, Zhang, Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization",
CVPR 2023, arXiv 2303.13283; reference github.com/htyao89/KgCoOp (``KgCoOp/trainers/kgcoop.py``).

The prompt is CoOp's (a context shared by all classes, class name at the end), 4 vectors
initialised from the words "a photo of a". With ``w_c`` the frozen CLIP's text feature of the
dataset's hand-crafted prompt for class c (KgCoOp's table, ``CUSTOM_TEMPLATES`` in
``trainers/kgcoop.py:37-53``: CoOp's per-dataset template except DescribableTextures, where it
is "a photo of a {}, a type of texture."; :data:`jaxprompt.templates.KGCOOP_TEMPLATES`) and
``g_c`` the prompted one, both L2-normalised::

    L = CE(100 cos(x, g), y) + lambda * (1 - (1/C) sum_c cos(g_c, w_c)),   lambda = 8.0

The paper writes the knowledge-guided term as the mean squared Euclidean distance
``(1/C) sum_c ||g_c - w_c||^2``; the official code computes ``1 - mean_c cos(g_c, w_c)``
(``trainers/kgcoop.py:238-241``, weighted by ``cfg.TRAINER.COOP.W`` at line 310). For unit
vectors ``||g - w||^2 = 2 (1 - cos)``, so ``8 (1 - cos) = 4 ||g - w||^2``: lambda = 8 in the
code is 4 in the paper's form. This module implements the code's form with the code's weight
8.0 (its base-to-novel scripts). There is no logit or image term, no template ensemble and no
prompt aggregation: KgCoOp is :func:`jaxprompt.methods.selfreg.self_regulated` on CoOp with
``w_kl=0, w_image=0, w_text=8, text_distance="cosine", templates="dataset:kgcoop", gpa=False``.
Evaluation is CoOp's.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxprompt.methods import base as base_lib
from jaxprompt.methods.coop import coop
from jaxprompt.methods.selfreg import DATASET_KGCOOP, resolve_templates, self_regulated


def kgcoop(
    base: base_lib.PromptMethod | None = None,
    *,
    weight: float = 8.0,
    templates: str | Sequence[str] = DATASET_KGCOOP,
    chunk: int | None = 1024,
    shared_prefix: bool = True,
) -> base_lib.PromptMethod:
    """KgCoOp.

    Prompt pytree: CoOp's ``{"ctx": [4, D_text]}`` (the default base). ``loss`` metrics:
    ``ce``, ``cos_text`` (the unweighted ``1 - mean cos``) and ``accuracy``.

    Args:
      base: the prompt method to regularise; ``None``:
        ``coop(init_words="a photo of a")`` (KgCoOp's 4-token context). Config and meta pass it
        as ``base="coop", base_kwargs={...}``.
      weight: lambda, the weight of ``1 - mean cos`` (8.0, the reference's base-to-novel value).
      templates: the hand-crafted prompt of the teacher: ``"dataset:kgcoop"`` (KgCoOp's table
        for the task's dataset, found from the CoOp template the protocol configs put on the
        task), ``"dataset"`` (the task's CoOp template itself), template strings (their
        UNNORMALISED features are averaged, PromptSRC style) or a set name.
      chunk: sequences per call when encoding the teacher (plain path).
      shared_prefix: encode the template's words before the class name once.

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"kgcoop"``.
    """
    base_m = coop(init_words="a photo of a") if base is None else base
    resolved = resolve_templates(templates)
    return self_regulated(
        base_m,
        w_kl=0.0,
        w_text=weight,
        w_image=0.0,
        templates=resolved,
        text_distance="cosine",
        gpa=False,
        chunk=chunk,
        shared_prefix=shared_prefix,
        name="kgcoop",
        config=dict(
            base=base_m,
            weight=weight,
            templates=resolved if isinstance(resolved, str) else list(resolved),
            chunk=chunk,
            shared_prefix=shared_prefix,
        ),
    )
