"""Self-regulation: PromptSRC's agreement with the frozen CLIP as a wrapper on any prompt method.

Khattak, Wasim, Naseer, Khan, Yang, Khan, "Self-regulating Prompts: Foundational Model
Adaptation without Forgetting", ICCV 2023, arXiv 2307.06948; reference
github.com/muzairkhattak/PromptSRC @bb95c77 (``trainers/promptsrc.py``), where the regularisers
sit on IVLP prompts only. Here they take the base method as an argument
(:func:`self_regulated`); :func:`jaxprompt.methods.promptsrc.promptsrc` is this wrapper on IVLP,
and KgCoOp (:mod:`jaxprompt.methods.kgcoop`) is it on CoOp with one cosine text term.

Per training step, with B images and the C classes of the split (normalised features, logits
at CLIP's frozen scale)::

    z_p, f_p, g_p = base.features.forward(prompt, x)   (the base's logits, image, class features)
    g   = norm(mean_k text_frozen(T_k(class)))         (template teacher, constant)
    f   = norm(image(no prompts, same x))              (f_p itself when the image side is frozen)
    z   = scale f g^T

    L = CE(z_p, y) + penalty                                    (the base's own loss)
        + w_kl * KL(softmax z || softmax z_p) / (B*C)
        + w_text * D(g_p, g) + w_image * mean|f_p - f|

* What the wrapper needs the base declares (never its name): ``base.features``, a
  :class:`~jaxprompt.methods.base.PromptedFeatures` with the forward pass and whether the image
  side is prompted. The image term exists only for bases that prompt the vision tower (IVLP,
  MaPLe); text-only bases (CoOp, CoCoOp, Bayesian prompts) get the logit and text terms, and
  their own (frozen) image features serve as the teacher's, so the image tower runs once.
* Text distance ``D``: ``"l1"`` (PromptSRC) is the mean over all elements of
  ``|norm(g_p) - g|``; ``"cosine"`` (KgCoOp) is ``1 - mean_c cos(g_p[c], g[c])``, which for unit
  vectors is half the squared Euclidean distance averaged over classes.
* Class features with leading axes (``[..., C, E]``) are compared to the teacher broadcast over
  them, so the term is the MEAN over those axes of each class set's distance: for CoCoOp, whose
  class features are per image ([B, C, E]), the mean over the batch of each image's
  ``D(g_p(x_b), g)``; for Bayesian prompts ([L, C, E], or [B, L, C, E] conditional), the mean
  over Monte Carlo samples (drawn with the loss's key) of each sample's distance. Averaging
  per image / per sample, rather than comparing the mean feature, holds every image's (every
  sample's) prompt near the frozen model, which is what "self-regulation" asks of a prompt that
  is actually used; a mean feature could agree while each sample drifts.
* The KL is summed over batch and classes and divided by B*C (not "batchmean"), with the frozen
  CLIP as the target; for Bayesian prompts ``z_p`` is the log Monte Carlo predictive, so the
  KL is to the predictive distribution.
* Evaluation uses only the base's logits: no templates, no teacher.
* Gaussian prompt aggregation (GPA, :mod:`jaxprompt.gpa`) over the epochs' prompts is the
  method's ``aggregator`` hook (the trainer applies it); ``prepare`` computes the teacher once.

Teacher text features. ``loss`` receives only the Task, so by default it encodes the K x C
template sequences inside the loss at every step. ``prepare(clip, task)`` (called by the trainer)
caches them for a (CLIP, class set) pair, keyed on everything they are computed from
(:func:`teacher_key`: the spec, the weights' fingerprint, the class names, the template), and a
batch may carry ``batch["teacher_text"]`` ([C, E], normalised) for research code that passes
the teacher as an argument of its own step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import clip as clip_lib
from jaxprompt import gpa as gpa_lib
from jaxprompt import losses
from jaxprompt import templates as templates_lib
from jaxprompt.methods import base as base_lib
from jaxprompt.methods.cocoop import cocoop
from jaxprompt.methods.coop import coop
from jaxprompt.methods.maple import maple
from jaxprompt.methods.zeroshot import template_features

log = logging.getLogger(__name__)

TEACHER_KEY = "teacher_text"
# ``templates=DATASET``: the task's own hand-crafted template (``Task.template``).
DATASET = "dataset"
# ``templates=DATASET_KGCOOP``: KgCoOp's table for the task's dataset
# (:data:`jaxprompt.templates.KGCOOP_TEMPLATES`, found from the task's CoOp template).
DATASET_KGCOOP = "dataset:kgcoop"
_PER_TASK = (DATASET, DATASET_KGCOOP)
TEXT_DISTANCES = ("l1", "cosine")
# PromptSRC's base-to-novel GPA (mean 15, std 1 over 20 epochs) as fractions of the run, used
# when gpa_mean / gpa_std are None, with the std at least one epoch (GPA_MIN_STD, see
# relative_gpa).
GPA_MEAN_FRACTION = 15.0 / 20.0
GPA_STD_FRACTION = 1.0 / 20.0
GPA_MIN_STD = 1.0


def relative_gpa(num_epochs: int) -> tuple[float, float]:
    """GPA's ``(mean, std)`` for a run of ``num_epochs``: PromptSRC's shape, still an average.

    PromptSRC's base-to-novel GPA (mean 15, std 1 over 20 epochs) puts .054/.242/.399/.242/.054
    on epochs 13-17: an average of about five epoch snapshots. Scaled with the run (3/4 and
    1/20 of it) the std shrinks below an epoch on short runs: on 5 epochs (MaPLe's) std 0.25
    puts .982 on epoch 4, and on 10 (CoCoOp's) std 0.5 splits between epochs 7 and 8, which is
    no longer an aggregation. So the std is at least one epoch, PromptSRC's own spread in
    epochs: 5 epochs get .009/.089/.312/.400/.189 and 10 get .13/.35/.35/.13 on epochs 6-9,
    while runs of 20 epochs or more keep the scaled shape (200 epochs: mean 150, std 10).
    """
    return (
        GPA_MEAN_FRACTION * num_epochs,
        max(GPA_STD_FRACTION * num_epochs, GPA_MIN_STD),
    )


def teacher_text_features(
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    templates: Sequence[str] = templates_lib.PROMPTSRC_60,
    *,
    chunk: int | None = 1024,
    shared_prefix: bool = True,
) -> jax.Array:
    r"""PromptSRC's frozen text features: the template mean of unnormalised features.

    .. math::
        g_c = \mathrm{normalize}\Big(\frac{1}{K} \sum_{k=1}^{K}
              \mathrm{text}(\mathrm{tokenize}(T_k(c)))\Big)

    Unlike CLIP's prompt ensembling, the per-template features are NOT normalised before the
    mean (with one template, as KgCoOp's, this is that template's normalised feature). Class
    names have ``_`` replaced by spaces. Sequences are tokenized together and truncated to the
    longest one (exact: the text tower is causal), and encoded ``chunk`` at a time to bound
    memory (60 x 1000 sequences for ImageNet).

    Args:
      clip: the frozen model.
      task: the class set (its static ``names`` are read).
      templates: template strings with ``{}`` (PromptSRC: the 60 of
        :data:`jaxprompt.templates.PROMPTSRC_60`).
      chunk: sequences per encoder call (``None``: all at once) on the plain path.
      shared_prefix: encode each template's words before the class name once for all classes
        (:func:`jaxprompt.methods.zeroshot.template_features`, one template at a time; same
        features); ``False``: every sequence in full, ``chunk`` at a time.

    Returns:
      [C, E] float32 L2-normalised features, a constant (``stop_gradient``).
    """
    names = [n.replace("_", " ") for n in task.names]
    texts = [t.format(n) for t in templates for n in names]  # template-major: [K * C]
    ids, eot = clip_lib.tokenize(clip, texts)
    if shared_prefix:
        k, c = len(templates), len(names)
        feats = template_features(clip, ids.reshape(k, c, -1), eot.reshape(k, c))
    else:
        feats = clip_lib.encode_token_ids(clip, jnp.asarray(ids), jnp.asarray(eot), chunk=chunk)
    feats = feats.reshape(len(templates), len(names), -1)  # [K, C, E]
    return jax.lax.stop_gradient(clip_lib.normalize(jnp.mean(feats, axis=0)))


def resolve_templates(templates: str | Sequence[str]) -> str | tuple[str, ...]:
    """``templates`` as a tuple of strings with ``{}``, or :data:`DATASET`.

    Args:
      templates: template strings, the name of a set in
        :data:`jaxprompt.templates.TEMPLATE_SETS`, ``"dataset"`` (each task's own
        ``Task.template``, read when the teacher is computed) or ``"dataset:kgcoop"``
        (KgCoOp's table for the task's dataset).

    Raises:
      ValueError: an unknown set name, or an empty list / a template without ``{}``.
    """
    if isinstance(templates, str):
        if templates in _PER_TASK:
            return templates
        if templates not in templates_lib.TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set {templates!r}; choose one of "
                f"{sorted(templates_lib.TEMPLATE_SETS)}, 'dataset', 'dataset:kgcoop', or pass "
                "template strings"
            )
        templates = templates_lib.TEMPLATE_SETS[templates]
    templates = tuple(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings with '{}'")
    return templates


def task_templates(templates: str | tuple[str, ...], task: clip_lib.Task) -> tuple[str, ...]:
    """The teacher templates for ``task``: ``templates``, ``(task.template,)`` for DATASET, or
    KgCoOp's entry for the task's dataset for DATASET_KGCOOP."""
    if templates not in _PER_TASK:
        return tuple(templates)
    if task.template is None:
        raise ValueError(
            f"templates={templates!r} needs the dataset's template on the task: "
            "make_task(clip, names, template=...)"
        )
    if templates == DATASET_KGCOOP:
        return (templates_lib.KGCOOP_FROM_COOP.get(task.template, task.template),)
    return (task.template,)


def text_agreement(text: jax.Array, teacher: jax.Array, *, distance: str = "l1") -> jax.Array:
    """Distance between prompted class features and the frozen teacher's.

    Args:
      text: [..., C, E] L2-normalised prompted class features; leading axes (images, Monte
        Carlo samples) are averaged over.
      teacher: [C, E] normalised frozen class features (a constant).
      distance: ``"l1"``: mean over all elements of ``|norm(text) - teacher|`` (PromptSRC,
        PyTorch ``l1_loss`` mean); ``"cosine"``: ``1 - mean cos(text, teacher)`` over classes
        (and leading axes) (KgCoOp's code; ``= mean ||a - b||^2 / 2`` for unit vectors).

    Returns:
      A float32 scalar.
    """
    t = jnp.asarray(text, jnp.float32)
    g = jnp.broadcast_to(jax.lax.stop_gradient(teacher), t.shape)
    if distance == "l1":
        return losses.l1_agreement(t, g)
    if distance == "cosine":
        return 1.0 - jnp.mean(jnp.sum(t * g, axis=-1))
    raise ValueError(f"distance must be one of {TEXT_DISTANCES}, got {distance!r}")


def self_regulated(
    base: base_lib.PromptMethod,
    *,
    w_kl: float = 1.0,
    w_text: float = 25.0,
    w_image: float = 10.0,
    templates: str | Sequence[str] = templates_lib.PROMPTSRC_60,
    text_distance: str = "l1",
    gpa: bool = True,
    gpa_mean: float | None = None,
    gpa_std: float | None = None,
    chunk: int | None = 1024,
    shared_prefix: bool = True,
    name: str = "selfreg",
    config: Mapping[str, Any] | None = None,
) -> base_lib.PromptMethod:
    """PromptSRC's self-regulation around ``base`` (see the module docstring).

    The prompt, ``init`` and ``logits`` (and ``encode_classes`` / ``classify`` /
    ``frozen_image`` / ``features``) are the base's; only ``loss`` changes, and the trainer hooks
    ``prepare`` (teacher cache) and ``aggregator`` (GPA) are added.

    ``loss`` returns the total and ``metrics`` with the UNWEIGHTED terms: ``ce`` (on the base's
    logits), ``kl`` (when ``w_kl`` != 0), ``l1_text`` or ``cos_text`` (by ``text_distance``, when
    ``w_text`` != 0), ``l1_image`` (when the base prompts the image side and ``w_image`` != 0),
    the batch ``accuracy``, and the base's own metrics (Bayesian prompts: ``posterior_kl``,
    ``sigma``). A term whose weight is 0 is not computed (KgCoOp needs no image pass for KL).

    Args:
      base: the method to regularise; it must declare ``features``
        (:class:`~jaxprompt.methods.base.PromptedFeatures`: CoOp, CoCoOp, IVLP, MaPLe, Bayesian
        prompts, zero-shot). A registry name goes through
        ``jp.methods.get("selfreg", base=NAME, base_kwargs={...})``.
      w_kl: weight of KL(frozen || prompted) on the logits (PromptSRC: 1).
      w_text: weight of the text agreement (PromptSRC: 25 with L1; KgCoOp: 8 with cosine).
      w_image: weight of the image L1 agreement (PromptSRC: 10); ignored (no term) when the
        base's image side is CLIP's frozen encoder.
      templates: teacher templates (PromptSRC: its 60), a set name of
        :data:`jaxprompt.templates.TEMPLATE_SETS`, or ``"dataset"``: the task's hand-crafted
        template (KgCoOp's "a photo of a {}." style prompt, CoOp's per dataset).
      text_distance: ``"l1"`` (PromptSRC) or ``"cosine"`` (KgCoOp); see :func:`text_agreement`.
      gpa: add Gaussian prompt aggregation as the method's ``aggregator``.
      gpa_mean: GPA Gaussian mean in 1-indexed epochs; ``None``: 3/4 of the run's epochs
        (PromptSRC's 15 of 20).
      gpa_std: GPA standard deviation in epochs; ``None``: 1/20 of the run's epochs
        (PromptSRC's 1 of 20), at least one epoch (:func:`relative_gpa`).
      chunk: sequences per call when encoding the teacher templates (plain path).
      shared_prefix: encode each teacher template's words before the class name once.
      name: the name the method reports. Presets registered under their own name
        (``"promptsrc"``, ``"coop+src"``, ``"kgcoop"``) pass it with ``config``.
      config: the config the method reports, the keywords its registry constructor rebuilds it
        from (``None``: these keywords, with ``base`` recorded as the base method).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``name``; the trainer hooks
      ``prepare`` and ``aggregator`` keep that name and config.
    """
    base_m = base_lib.check_base(base, wrapper="selfreg")
    if base_m.features is None:
        raise ValueError(
            f"selfreg: base {base_m.name!r} declares no features (PromptMethod.features), "
            "so its image and class features cannot be regularised"
        )
    templates = resolve_templates(templates)
    if text_distance not in TEXT_DISTANCES:
        raise ValueError(f"text_distance must be one of {TEXT_DISTANCES}, got {text_distance!r}")
    for key_name, v in (("gpa_mean", gpa_mean), ("gpa_std", gpa_std)):
        if v is not None and not np.isfinite(v):
            raise ValueError(f"{key_name} must be a finite number or None, got {v}")
    if gpa_std is not None and not gpa_std > 0:
        raise ValueError(f"gpa_std must be > 0, got {gpa_std}")
    forward = base_m.features.forward
    image_term = base_m.features.prompted_image and w_image != 0
    text_metric = "l1_text" if text_distance == "l1" else "cos_text"

    def teacher_for(clip, task):
        return teacher_text_features(
            clip, task, task_templates(templates, task), chunk=chunk, shared_prefix=shared_prefix
        )

    def loss(prompt, clip, task, batch, key):
        images, labels = batch["image"], batch["label"]
        out = forward(prompt, clip, task, images, key=key)
        z_p = out.logits
        metrics = {"ce": losses.cross_entropy(z_p, labels)}
        total = metrics["ce"] + out.penalty
        need_teacher = w_kl != 0 or w_text != 0
        if need_teacher:
            # Teacher text: precomputed if the batch carries it (prepare puts it there),
            # otherwise encoded here from the static class names (K x C sequences per step).
            n_cls, width = z_p.shape[-1], out.text.shape[-1]
            if TEACHER_KEY in batch:
                g = jax.lax.stop_gradient(jnp.asarray(batch[TEACHER_KEY], jnp.float32))
                if g.shape != (n_cls, width):
                    raise ValueError(
                        f"batch['{TEACHER_KEY}'] has shape {g.shape}, expected {(n_cls, width)} "
                        "(one normalised frozen text feature per class of the task)"
                    )
            else:
                g = teacher_for(clip, task)
        if w_kl != 0 or image_term:
            if base_m.features.prompted_image:
                # The same (augmented) images through the prompt-free encoder.
                f = clip_lib.normalize(clip_lib.encode_image(clip, images))
            else:
                f = out.image  # the base's image side is the frozen one (normalised)
            f = jax.lax.stop_gradient(f)
        if w_kl != 0:
            z = clip_lib.logit_scale(clip) * f @ g.T  # [B, C]
            # Both logits at CLIP's scale (T = 1); the frozen CLIP is the target distribution
            # and the sum runs over B*C logits divided by B*C, as the reference does.
            metrics["kl"] = losses.kl_agreement(z, z_p)
            total = total + w_kl * metrics["kl"]
        if w_text != 0:
            # Over ALL C classes of the split (not only the batch labels).
            metrics[text_metric] = text_agreement(out.text, g, distance=text_distance)
            total = total + w_text * metrics[text_metric]
        if image_term:
            metrics["l1_image"] = losses.l1_agreement(out.image, f)
            total = total + w_image * metrics["l1_image"]
        metrics["accuracy"] = jnp.mean((jnp.argmax(z_p, axis=-1) == labels).astype(jnp.float32))
        metrics.update(out.metrics)
        return total, metrics

    if config is None:
        config = dict(
            base=base_m,
            w_kl=w_kl,
            w_text=w_text,
            w_image=w_image,
            templates=templates if isinstance(templates, str) else list(templates),
            text_distance=text_distance,
            gpa=gpa,
            gpa_mean=gpa_mean,
            gpa_std=gpa_std,
            chunk=chunk,
            shared_prefix=shared_prefix,
        )

    aggregator = None
    if gpa:

        def aggregator(num_epochs: int) -> gpa_lib.Aggregator:
            mean, std = relative_gpa(num_epochs)
            return gpa_lib.gaussian_aggregation(
                mean=mean if gpa_mean is None else float(gpa_mean),
                std=std if gpa_std is None else float(gpa_std),
                num_epochs=num_epochs,
            )

    method = base_m._replace(
        loss=loss, name=name, config=dict(config), prepare=None, aggregator=aggregator
    )
    if w_kl == 0 and w_text == 0:
        return method

    # The trainer's hook: the frozen teacher computed once. It caches into the hooked method
    # itself, so the prepared method keeps its name, config and aggregator.
    def prepare(clip: clip_lib.Clip, task: clip_lib.Task) -> base_lib.PromptMethod:
        # What the trainer's "preparing ..." wait is spent on (tens of seconds on a CPU, most
        # of it compiling the text encoder for K * C sequences), said before it starts.
        k, c = len(task_templates(templates, task)), len(task.names)
        log.info(
            "%s's teacher: the frozen text features of %d templates x %d classes (%d prompts, "
            "one compiled pass of the text encoder)",
            name, k, c, k * c,
        )  # fmt: skip
        return cache_teacher(hooked, teacher_for, clip, task)

    hooked = method._replace(prepare=prepare)
    return hooked


def teacher_key(clip: clip_lib.Clip, task: clip_lib.Task) -> tuple | None:
    """What the frozen teacher of ``(clip, task)`` depends on, as a static key: the backbone's
    spec, ``clip.weights_id`` (the weights' and vocabulary's fingerprint), the class names and
    the task's template (read by ``templates="dataset"`` and ``"dataset:kgcoop"``). None when
    the Clip has no ``weights_id`` (built by hand, or its params replaced): its weights cannot
    be told apart, so nothing computed from them may be cached."""
    if clip.weights_id is None:
        return None
    return (clip.spec, clip.weights_id, tuple(task.names), task.template)


def cache_teacher(
    method: base_lib.PromptMethod,
    teacher: Callable[[clip_lib.Clip, clip_lib.Task], jax.Array],
    clip: clip_lib.Clip,
    task: clip_lib.Task,
) -> base_lib.PromptMethod:
    """``method`` whose loss reads ``teacher(clip, task)`` computed once, for this pair.

    The cache is keyed on everything a teacher reads (:func:`teacher_key`): the backbone's
    spec, its weights and vocabulary (``Clip.weights_id``, the content fingerprint the loaders
    set), the class names and the task's template. When the loss is called with a CLIP and
    task of the same key (and a batch without ``"teacher_text"``), the cached [C, E] features
    go into the batch; any other call (other weights of the same shape, another template or
    class set, or a Clip without ``weights_id``, whose weights cannot be told apart) falls
    back to the method's own behaviour, so the cache is never wrong, only sometimes not
    faster. The key is static, so the check costs nothing under ``jit``. The cache is a host
    (NumPy) constant: jit embeds it in the step whatever the mesh, where a committed device
    array would pin the step to its device.

    Returns:
      The method with a caching ``loss`` and ``prepare=None`` (already prepared).
    """
    key_ = teacher_key(clip, task)
    if key_ is None:  # nothing to key a cache on: the loss encodes the teacher itself
        return method._replace(prepare=None)
    cached = np.asarray(jax.jit(teacher)(clip, task))
    inner = method.loss

    def loss(prompt, clip_, task_, batch, key):
        # Static checks (nothing in the key is traced): the cache is for this pair only.
        if teacher_key(clip_, task_) == key_ and TEACHER_KEY not in batch:
            batch = {**batch, TEACHER_KEY: cached}
        return inner(prompt, clip_, task_, batch, key)

    return method._replace(loss=loss, prepare=None)


# --------------------------------------------------------------------------- presets


def _src_preset(name: str, base: base_lib.PromptMethod, **settings: Any) -> base_lib.PromptMethod:
    """``self_regulated(base, **settings)`` reported as ``name``, with the preset
    constructor's keywords as config, so ``get(name, **config)`` rebuilds it from meta."""
    config = {"base": base, **settings}
    if settings["templates"] not in _PER_TASK:
        config["templates"] = list(resolve_templates(settings["templates"]))
    return self_regulated(base, **settings, name=name, config=config)


def coop_src(
    base: base_lib.PromptMethod | None = None,
    *,
    w_kl: float = 1.0,
    w_text: float = 25.0,
    w_image: float = 10.0,
    templates: str | Sequence[str] = templates_lib.PROMPTSRC_60,
    gpa: bool = True,
    gpa_mean: float | None = None,
    gpa_std: float | None = None,
    chunk: int | None = 1024,
    shared_prefix: bool = True,
) -> base_lib.PromptMethod:
    """``coop+src``: CoOp with PromptSRC's logit and text agreement and GPA (no image term:
    CoOp's image side is frozen).

    Args:
      base: the CoOp to wrap; ``None``: ``coop(n_ctx=16)`` (CoOp's base-to-novel
        setting in the CoCoOp and PromptSRC papers). Config and meta pass it as
        ``base="coop", base_kwargs={...}``.
      w_kl, w_text, w_image, templates, gpa, gpa_mean, gpa_std, chunk, shared_prefix: as in
        :func:`self_regulated` (PromptSRC's weights; GPA at 3/4 of the run by default).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"coop+src"``.
    """
    return _src_preset(
        "coop+src",
        coop(n_ctx=16) if base is None else base,
        w_kl=w_kl,
        w_text=w_text,
        w_image=w_image,
        templates=templates,
        gpa=gpa,
        gpa_mean=gpa_mean,
        gpa_std=gpa_std,
        chunk=chunk,
        shared_prefix=shared_prefix,
    )


def cocoop_src(
    base: base_lib.PromptMethod | None = None,
    *,
    w_kl: float = 1.0,
    w_text: float = 25.0,
    w_image: float = 10.0,
    templates: str | Sequence[str] = templates_lib.PROMPTSRC_60,
    gpa: bool = True,
    gpa_mean: float | None = None,
    gpa_std: float | None = None,
    chunk: int | None = 1024,
    shared_prefix: bool = True,
) -> base_lib.PromptMethod:
    """``cocoop+src``: CoCoOp with PromptSRC's logit and text agreement and GPA (no image
    term). The text term is the batch mean of each image's class-feature L1 to the teacher.

    Args:
      base: the CoCoOp to wrap; ``None``: ``cocoop(n_ctx=4, init_words="a photo of a")``.
      w_kl, w_text, w_image, templates, gpa, gpa_mean, gpa_std, chunk, shared_prefix: as in
        :func:`self_regulated`.

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"cocoop+src"``.
    """
    return _src_preset(
        "cocoop+src",
        cocoop(n_ctx=4, init_words="a photo of a") if base is None else base,
        w_kl=w_kl,
        w_text=w_text,
        w_image=w_image,
        templates=templates,
        gpa=gpa,
        gpa_mean=gpa_mean,
        gpa_std=gpa_std,
        chunk=chunk,
        shared_prefix=shared_prefix,
    )


def maple_src(
    base: base_lib.PromptMethod | None = None,
    *,
    w_kl: float = 1.0,
    w_text: float = 25.0,
    w_image: float = 10.0,
    templates: str | Sequence[str] = templates_lib.PROMPTSRC_60,
    gpa: bool = True,
    gpa_mean: float | None = None,
    gpa_std: float | None = None,
    chunk: int | None = 1024,
    shared_prefix: bool = True,
) -> base_lib.PromptMethod:
    """``maple+src``: MaPLe with all three of PromptSRC's agreement terms and GPA (what
    multimodal-prompt-learning#76 and PromptSRC#8 ask for).

    Args:
      base: the MaPLe to wrap; ``None``: ``maple(depth=9, n_ctx=2)``.
      w_kl, w_text, w_image, templates, gpa, gpa_mean, gpa_std, chunk, shared_prefix: as in
        :func:`self_regulated`.

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"maple+src"``.
    """
    return _src_preset(
        "maple+src",
        maple(depth=9, n_ctx=2) if base is None else base,
        w_kl=w_kl,
        w_text=w_text,
        w_image=w_image,
        templates=templates,
        gpa=gpa,
        gpa_mean=gpa_mean,
        gpa_std=gpa_std,
        chunk=chunk,
        shared_prefix=shared_prefix,
    )
