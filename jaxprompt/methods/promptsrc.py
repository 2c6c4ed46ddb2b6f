"""PromptSRC: IVLP prompts regularised towards the frozen CLIP.

Khattak, Wasim, Naseer, Khan, Yang, Khan, "Self-regulating Prompts: Foundational Model
Adaptation without Forgetting", ICCV 2023, arXiv 2307.06948; reference
github.com/muzairkhattak/PromptSRC @bb95c77 (``trainers/promptsrc.py``).

The prompts are IVLP's (:func:`jaxprompt.methods.ivlp.ivlp`: deep, independent text and vision
tokens), and the regularisers are the self-regulation wrapper's
(:func:`jaxprompt.methods.selfreg.self_regulated`, which puts them on any base): this module is
that wrapper on IVLP, the paper's own framing (PromptSRC = IVLP + self-regulation). Per
training step, with B images and the C classes of the
split (all normalised features, logits at CLIP's frozen scale 100)::

    g_p = norm(text(prompted, all C classes))      f_p = norm(image(prompted, x))
    g   = norm(mean_k text_frozen(T_k(class)))     f   = norm(image(no prompts, same x))
    z_p = 100 f_p g_p^T                             z   = 100 f g^T

    L = CE(z_p, y) + w_kl * KL(softmax z || softmax z_p) / (B*C)
        + w_text * mean|g_p - g| + w_image * mean|f_p - f|

* The teacher text ``g`` averages the UNNORMALISED frozen features of 60 templates (CLIP's
  ImageNet list, for every dataset), normalised after the mean (:func:`teacher_text_features`).
* The frozen image features use the SAME augmented batch through the prompt-free encoder.
* The KL is summed over batch and classes and divided by B*C (not "batchmean"), with the frozen
  CLIP as the target distribution; the L1 means run over all elements; the text L1 covers all
  C classes, not just the batch labels.
* Evaluation uses only the prompted path (``logits`` is IVLP's): no templates, no teacher.
* Gaussian prompt aggregation (GPA) is applied by the trainer (:mod:`jaxprompt.gpa`) through
  the method's ``aggregator`` hook (settings ``gpa_mean``, ``gpa_std`` in ``config``; see
  :func:`gpa_aggregator`).

Teacher text features. ``loss`` receives only the Task, so by default it encodes the 60 x C
template sequences inside the loss at every step (correct, but wasteful for many classes). Two
ways avoid that: :func:`with_teacher` precomputes them once for a (CLIP, class set) pair and
returns a method whose loss uses the cached array (the trainer needs nothing else), and a
batch may carry ``batch["teacher_text"]`` ([C, E], normalised) for research code that passes
the teacher as a jit argument of its own step.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxprompt import clip as clip_lib
from jaxprompt import gpa
from jaxprompt import templates as templates_lib
from jaxprompt.methods import base
from jaxprompt.methods.ivlp import ivlp
from jaxprompt.methods.selfreg import (
    TEACHER_KEY,
    cache_teacher,
    resolve_templates,
    self_regulated,
    teacher_text_features,
)

__all__ = ["TEACHER_KEY", "gpa_aggregator", "promptsrc", "teacher_text_features", "with_teacher"]


def promptsrc(
    *,
    depth: int = 9,
    n_ctx_text: int = 4,
    n_ctx_vision: int = 4,
    init_words: str | None = "a photo of a",
    w_text: float = 25.0,
    w_image: float = 10.0,
    w_kl: float = 1.0,
    templates: Sequence[str] = templates_lib.PROMPTSRC_60,
    gpa_mean: float = 15.0,
    gpa_std: float = 1.0,
    chunk: int | None = 1024,
    init_std: float = 0.02,
    remat: bool = False,
    shared_prefix: bool = True,
) -> base.PromptMethod:
    """PromptSRC: ``self_regulated(ivlp(...))`` with the paper's weights and GPA.

    Prompt pytree: IVLP's, ``{"ctx": [n_t, D_text], "vision_ctx": [n_v, D_vision],
    "deep_text": [depth-1, n_t, D_text], "deep_vision": [depth-1, n_v, D_vision]}``.

    ``loss`` returns the total and ``metrics`` with the UNWEIGHTED terms ``ce``, ``kl``,
    ``l1_text``, ``l1_image`` and the batch ``accuracy``.

    Args:
      depth: prompt depth of both towers, counting the input layer (9 base-to-novel and
        few-shot, 3 cross-dataset).
      n_ctx_text: text context length.
      n_ctx_vision: vision prompt length.
      init_words: text context initialisation: its first ``n_ctx_text`` tokens start the
        context, any further ones stay as fixed words (as in IVLP).
      w_text: weight of the text L1 self-consistency (25).
      w_image: weight of the image L1 self-consistency (10).
      w_kl: weight of the logit KL self-consistency (1).
      templates: teacher templates, or the name of a set in
        :data:`jaxprompt.templates.TEMPLATE_SETS`.
      gpa_mean: GPA Gaussian mean in 1-indexed epochs (15 base-to-novel, 6 cross-dataset,
        30 or 45 few-shot). Used by the ``aggregator`` hook; not by the loss.
      gpa_std: GPA standard deviation in epochs (1 base-to-novel, 10 cross-dataset, 30 or 5
        few-shot).
      chunk: sequences per call when encoding the teacher templates.
      init_std: standard deviation of the random prompt initialisations.
      remat: rematerialise the prompted blocks in the backward pass.
      shared_prefix: encode ``[SOT] ctx <fixed words>`` once for all classes on the prompted path
        (:func:`~jaxprompt.clip.encode_text_shared`: deep text prompts replace positions
        inside that prefix, so it is the same for every class), and each teacher template's
        words once; ``False`` runs the plain encoder on every full sequence (same features).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"promptsrc"``.
    """
    if isinstance(templates, str) and templates == "dataset":
        raise ValueError("promptsrc's teacher is a template list or set name, not 'dataset'")
    templates = resolve_templates(templates)
    if not gpa_std > 0:
        raise ValueError(f"gpa_std must be > 0, got {gpa_std}")
    prompted = ivlp(
        depth=depth,
        n_ctx_text=n_ctx_text,
        n_ctx_vision=n_ctx_vision,
        init_words=init_words,
        init_std=init_std,
        remat=remat,
        shared_prefix=shared_prefix,
    )
    return self_regulated(
        prompted,
        w_kl=w_kl,
        w_text=w_text,
        w_image=w_image,
        templates=templates,
        text_distance="l1",
        gpa=True,
        gpa_mean=gpa_mean,
        gpa_std=gpa_std,
        chunk=chunk,
        shared_prefix=shared_prefix,
        name="promptsrc",
        config=dict(
            depth=depth,
            n_ctx_text=n_ctx_text,
            n_ctx_vision=n_ctx_vision,
            init_words=init_words,
            w_text=w_text,
            w_image=w_image,
            w_kl=w_kl,
            templates=list(templates),
            gpa_mean=gpa_mean,
            gpa_std=gpa_std,
            chunk=chunk,
            init_std=init_std,
            remat=remat,
            shared_prefix=shared_prefix,
        ),
    )


def with_teacher(
    method: base.PromptMethod, clip: clip_lib.Clip, task: clip_lib.Task
) -> base.PromptMethod:
    """PromptSRC with its teacher text features computed once for ``(clip, task)``.

    The returned method equals ``method`` (same name, config, init, logits, aggregator) except
    that its ``loss``, when called with the same CLIP weights and spec and a task with the same
    class names and template, uses the cached [C, E] features instead of encoding 60 x C
    template sequences every step (:func:`jaxprompt.methods.selfreg.cache_teacher`, keyed by
    :func:`jaxprompt.methods.selfreg.teacher_key`). Any other CLIP or task (or a batch
    carrying ``"teacher_text"``) falls back to the method's own behaviour, so the wrapper is
    never wrong, only sometimes not faster. Trainers call ``method.prepare`` instead, the same
    cache.

    Args:
      method: a method built by :func:`promptsrc`.
      clip: the frozen model the teacher is computed with (concrete, outside ``jit``).
      task: the training class set.

    Returns:
      The method with a caching ``loss``.

    Example::

        method = with_teacher(promptsrc(), clip, task)
        state = jp.train.fit(method, tx, clip, task, batches, ...)
    """
    if method.name != "promptsrc":
        raise ValueError(f"with_teacher needs a promptsrc method, got {method.name!r}")
    cfg = method.config

    def teacher(c: clip_lib.Clip, t: clip_lib.Task):
        return teacher_text_features(
            c,
            t,
            tuple(cfg["templates"]),
            chunk=cfg["chunk"],
            shared_prefix=cfg.get("shared_prefix", True),
        )

    return cache_teacher(method, teacher, clip, task)


def gpa_aggregator(method: base.PromptMethod, *, num_epochs: int) -> gpa.Aggregator:
    """The Gaussian prompt aggregator for a PromptSRC method's ``gpa_mean`` / ``gpa_std``.

    Args:
      method: a method built by :func:`promptsrc` (or one whose config has the two keys).
      num_epochs: epochs of the run (20 base-to-novel and cross-dataset, 50 few-shot).

    Returns:
      :func:`jaxprompt.gpa.gaussian_aggregation` with the method's settings.
    """
    return gpa.gaussian_aggregation(
        mean=float(method.config["gpa_mean"]),
        std=float(method.config["gpa_std"]),
        num_epochs=num_epochs,
    )
