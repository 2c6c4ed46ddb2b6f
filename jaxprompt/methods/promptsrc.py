"""PromptSRC: IVLP prompts regularised towards the frozen CLIP.

Khattak, Wasim, Naseer, Khan, Yang, Khan, "Self-regulating Prompts: Foundational Model
Adaptation without Forgetting", ICCV 2023, arXiv 2307.06948; reference
github.com/muzairkhattak/PromptSRC @bb95c77 (``trainers/promptsrc.py``).

The prompts are IVLP's (:func:`jaxprompt.methods.ivlp.ivlp`: deep, independent text and vision
tokens; this module uses that constructor's public method, which is the paper's own framing:
PromptSRC = IVLP + self-regulation). Per training step, with B images and the C classes of the
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
* Gaussian prompt aggregation (GPA) is applied by the trainer (:mod:`jaxprompt.gpa`); this
  method only carries its settings (``gpa_mean``, ``gpa_std`` in ``config``; see
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

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import clip as clip_lib
from jaxprompt import gpa, losses
from jaxprompt import templates as templates_lib
from jaxprompt.methods import base
from jaxprompt.methods.ivlp import ivlp
from jaxprompt.methods.zeroshot import template_features

TEACHER_KEY = "teacher_text"


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
    mean. Class names have ``_`` replaced by spaces. Sequences are tokenized together and
    truncated to the longest one (exact: the text tower is causal), and encoded ``chunk`` at a
    time to bound memory (60 x 1000 sequences for ImageNet).

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
    """PromptSRC.

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
        30 or 45 few-shot). Stored in ``config`` for the trainer; not used by the loss.
      gpa_std: GPA standard deviation in epochs (1 base-to-novel, 10 cross-dataset, 30 or 5
        few-shot).
      chunk: sequences per call when encoding the teacher templates.
      init_std: standard deviation of the random prompt initialisations.
      remat: rematerialise the prompted blocks in the backward pass.
      shared_prefix: encode ``[SOT] ctx <fixed words>`` once for all classes on the prompted path
        (:func:`~jaxprompt.clip.encode_text_shared`: deep text prompts replace positions
        inside that prefix, so it is the same for every class); ``False`` runs the plain
        encoder on every class's full sequence (same features, for comparison).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"promptsrc"``.
    """
    if isinstance(templates, str):
        if templates not in templates_lib.TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set {templates!r}; choose one of "
                f"{sorted(templates_lib.TEMPLATE_SETS)} or pass template strings"
            )
        templates = templates_lib.TEMPLATE_SETS[templates]
    templates = tuple(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings with '{}'")
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

    def prompted_image_features(prompt, clip, images):
        deep = prompt["deep_vision"] if prompt["deep_vision"].shape[0] else None
        return clip_lib.encode_image(
            clip, images, prompts=prompt["vision_ctx"], deep=deep, remat=remat
        )

    def loss(prompt, clip, task, batch, key):
        del key  # deterministic
        images, labels = batch["image"], batch["label"]
        scale = clip_lib.logit_scale(clip)
        # Prompted path (what evaluation uses), over ALL classes of the split.
        g_p = clip_lib.normalize(prompted.encode_classes(prompt, clip, task))  # [C, E]
        f_p = clip_lib.normalize(prompted_image_features(prompt, clip, images))  # [B, E]
        z_p = scale * f_p @ g_p.T  # [B, C]
        # Frozen path: the same (augmented) images without prompts, and the template teacher.
        f = jax.lax.stop_gradient(clip_lib.normalize(clip_lib.encode_image(clip, images)))
        # Teacher text: precomputed if the batch carries it (with_teacher puts it there),
        # otherwise encoded here from the static class names (60 x C sequences per step).
        if TEACHER_KEY in batch:
            g = jax.lax.stop_gradient(jnp.asarray(batch[TEACHER_KEY], jnp.float32))
            if g.shape != g_p.shape:
                raise ValueError(
                    f"batch['{TEACHER_KEY}'] has shape {g.shape}, expected {g_p.shape} "
                    "(one normalised frozen text feature per class of the task)"
                )
        else:
            g = teacher_text_features(
                clip, task, templates, chunk=chunk, shared_prefix=shared_prefix
            )
        z = scale * f @ g.T  # [B, C]

        ce = losses.cross_entropy(z_p, labels)
        # Both logits carry the x100 scale (T = 1); the frozen CLIP is the target distribution
        # and the sum runs over B*C logits divided by B*C, as the reference does.
        kl = losses.kl_agreement(z, z_p)
        # L1 on normalised features, mean over every element: the text term covers all C
        # classes of the split (not only the labels in the batch), the image term the batch.
        l1_text = losses.l1_agreement(g_p, g)
        l1_image = losses.l1_agreement(f_p, f)
        total = ce + w_kl * kl + w_text * l1_text + w_image * l1_image
        acc = jnp.mean((jnp.argmax(z_p, axis=-1) == labels).astype(jnp.float32))
        return total, {
            "ce": ce,
            "kl": kl,
            "l1_text": l1_text,
            "l1_image": l1_image,
            "accuracy": acc,
        }

    method = prompted._replace(
        loss=loss,
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

    # The trainer's hooks: the frozen teacher computed once, GPA over the epochs' prompts.
    # `prepare` caches the teacher in the hooked method itself, so the prepared method keeps
    # its aggregator.
    def prepare(clip: clip_lib.Clip, task: clip_lib.Task) -> base.PromptMethod:
        return with_teacher(hooked, clip, task)

    hooked = method._replace(
        prepare=prepare,
        aggregator=lambda num_epochs: gpa_aggregator(method, num_epochs=num_epochs),
    )
    return hooked


def with_teacher(
    method: base.PromptMethod, clip: clip_lib.Clip, task: clip_lib.Task
) -> base.PromptMethod:
    """PromptSRC with its teacher text features computed once for ``(clip, task)``.

    The returned method equals ``method`` (same name, config, init, logits) except that its
    ``loss``, when called with a CLIP of the same spec and a task with the same class names,
    uses the cached [C, E] features instead of encoding 60 x C template sequences every step.
    Any other task (or a batch carrying ``"teacher_text"``) falls back to the method's own
    behaviour, so the wrapper is never wrong, only sometimes not faster. The cache is a small
    closure constant of the loss (C x E floats), not CLIP weights.

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
    teacher = jax.jit(
        lambda c, t: teacher_text_features(
            c,
            t,
            tuple(cfg["templates"]),
            chunk=cfg["chunk"],
            shared_prefix=cfg.get("shared_prefix", True),
        )
    )(clip, task)
    # A host (NumPy) constant: jit embeds it in the step whatever the mesh, where a committed
    # device array would pin the step to the device it lives on.
    teacher = np.asarray(teacher)
    spec, names = clip.spec, tuple(task.names)
    inner = method.loss

    def loss(prompt, clip_, task_, batch, key):
        # Static checks (spec and names are not traced): the cache is for this pair only.
        if clip_.spec == spec and tuple(task_.names) == names and TEACHER_KEY not in batch:
            batch = {**batch, TEACHER_KEY: teacher}
        return inner(prompt, clip_, task_, batch, key)

    # Already prepared: preparing again would only repeat the work.
    return method._replace(loss=loss, prepare=None)


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
