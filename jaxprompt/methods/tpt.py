"""TPT: test-time prompt tuning, one episode of entropy minimisation per test image.

Shu, Nie, Huang, Yu, Goldstein, Anandkumar, Xiao, "Test-Time Prompt Tuning for Zero-Shot
Generalization in Vision-Language Models", NeurIPS 2022, arXiv 2209.07511; reference
github.com/azshue/TPT @63ecbace79694205d7884e63fdc3137a200f0b0e (``tpt_classification.py``,
``clip/custom_clip.py``, ``clip/cocoop.py``). Spec: ``specs/tpt.md``.

One episode, for one test image with views ``x_0 .. x_{V-1}`` (``x_0`` the plain resize and
center crop, the others random augmentations)::

    f_v   = normalize(ImageEncoder(x_v))                         frozen, computed once
    z_v   = 100 * f_v . normalize(TextEncoder(prompt_0))_c        logits of every view, step 0
    S     = the k = int(V * keep) views of lowest softmax entropy  selected ONCE, at step 0
    L(p)  = H( mean_{v in S} softmax(z_v(p)) )                    entropy of the mean probability
    p_T   = T steps of AdamW on L from prompt_0, fresh optimiser state
    out   = 100 * f_0 . normalize(TextEncoder(p_T))_c             prediction on view 0 only

With TPT's defaults (V = 64, keep = 0.1 so 6 views, one AdamW step with lr 5e-3 and PyTorch's
weight decay 0.01) the single step is ``p_1 = p_0 (1 - lr wd) - lr g / (|g| + eps)``: a sign step.

Because the episode is a pure function of (initial prompt, views), the reference's per-sample
reset of the prompt and of the optimiser state holds by construction, and B episodes run side by
side under ``vmap`` with exactly the sequential result (:func:`episodes`). The batched form does
once what the reference repeats per image:

* the image features of all B x V views come from one image-tower call, and view 0's feature is
  reused for the prediction (the reference encodes view 0 again);
* the initial prompt is the same for every image, so its text features and the text tower's
  forward pass (with the residuals of its backward pass) are computed once per batch; per image
  only the backward pass for its own loss (a ``vjp`` whose cotangent is batched) and the forward
  pass with its tuned prompt remain;
* the text tower runs truncated to the longest class prompt of the task (exact under the causal
  mask, see :mod:`jaxprompt.clip`), and its blocks are rematerialised (the default base sets
  ``remat=True``) so 1000 classes fit.

Bases. ``tpt`` wraps a method as optax wrappers wrap a transformation, and picks its path from
what the base offers (``base.frozen_image``, a :class:`~jaxprompt.methods.base.FrozenImageSide`),
never from its name:

* bases whose image side has no prompt and whose tuned pytree is the prompt itself (``coop``,
  ``zeroshot``): the whole prompt is tuned, with the shared-forward batching above. This is
  TPT ("a photo of a") and TPT + CoOp
  (the initial ``ctx`` loaded from a trained CoOp run).
* bases whose tuned pytree depends on the image (``cocoop``): TPT + CoCoOp tunes only the
  generated context ``ctx + meta_net(f_0)`` of each image (its CoCoOp ``ctx`` and meta-net stay
  fixed). As in the reference's ``gen_ctx``, the meta-net
  sees view 0's *un-normalised* feature (``cocoop_unnormalized=True``), unlike CoCoOp itself.
* any other method (no ``frozen_image``: vision prompts): the whole prompt is tuned through
  ``base.logits`` on the views, per image. Correct, but none of the sharing above applies.
  That covers IVLP, MaPLe and PromptSRC prompts (every leaf, vision prompts included) and
  Bayesian prompts, whose logits are the Monte Carlo predictive at the method's fixed
  evaluation key: the episode is deterministic and the entropy's gradient reaches the mean
  and log-variance through the reparameterised samples. (A conditional Bayesian prompt draws
  its noise per row of each call, so the selected views see other draws than at selection.)

Online TPT (``tpt(reset="online")``, :func:`online_episodes`; TPT's issue #16) drops the reset:
test sample ``t`` starts from the prompt sample ``t - 1`` was tuned to (and, with
``carry_optimizer``, from its AdamW state), in the order given. Batched, it stays the
sequential definition: the samples of a batch are a ``lax.scan``, each seeing the previous
one's prompt, and the carry passes from one batch to the next (``jaxprompt adapt`` keeps it
across the whole test split, in test-split order), so the result does not depend on the batch
size. Only the image tower's forward for all views of a batch is shared. Bases whose tuned
context depends on the image (CoCoOp) have no prompt to carry and are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprompt import clip as clip_lib
from jaxprompt import losses
from jaxprompt.methods import base as base_lib

Array = jax.Array
Prompt = base_lib.Prompt

__all__ = [
    "RESETS",
    "adamw_torch",
    "episode",
    "episodes",
    "make_optimizer",
    "num_selected",
    "online_episodes",
    "tpt",
    "views_from_images",
]

# How the prompt starts each test sample: TPT's own reset to the initial prompt ("episodic"),
# or the prompt tuned on the previous sample ("online", see online_episodes).
RESETS = ("episodic", "online")

# Bases whose image features do not depend on the prompt: the views are encoded once, without
# gradient, and only the text side is tuned.

# TPT's optimiser: torch.optim.AdamW(lr=5e-3) with PyTorch's defaults (spec section 2.5).
DEFAULT_OPTIMIZER: dict[str, Any] = {
    "name": "adamw",
    "learning_rate": 5e-3,
    "weight_decay": 0.01,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
}


# --------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------


def adamw_torch(
    learning_rate: float = 5e-3,
    *,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    r"""AdamW with ``torch.optim.AdamW``'s semantics and defaults (TPT's optimiser).

    PyTorch decays first, ``p <- p - lr * wd * p``, then takes the bias-corrected Adam step
    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``; both use the parameters from before the step,
    so the sum is optax's ``p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`` with eps outside
    the square root (``eps_root = 0``) and the decay applied to every leaf (no mask). What
    differs from optax's ``adamw`` is only the default weight decay (torch 0.01, optax 1e-4).
    The first step from a fresh state is, elementwise,

    .. math::
        p_1 = p_0 (1 - \eta \lambda) - \eta\, g / (|g| + \epsilon)

    Args:
      learning_rate: step size (TPT: 5e-3).
      weight_decay: decoupled weight decay (PyTorch's default 0.01).
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the square root of the second moment.

    Returns:
      An optax transformation.
    """
    return optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, eps_root=0.0, weight_decay=weight_decay
    )


def make_optimizer(spec: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """Builds a test-time optimiser from a JSON-able description (configs, checkpoint meta).

    Args:
      spec: ``{"name": "adamw", "learning_rate", "weight_decay", "b1", "b2", "eps"}`` or
        ``{"name": "sgd", "learning_rate", "momentum"}``; missing keys take TPT's defaults;
        ``None`` is TPT's AdamW.

    Returns:
      An optax transformation.

    Raises:
      ValueError: for an unknown optimiser name or key.
    """
    spec = dict(DEFAULT_OPTIMIZER if spec is None else spec)
    name = spec.pop("name", "adamw")
    if name == "adamw":
        kw = {k: v for k, v in DEFAULT_OPTIMIZER.items() if k != "name"} | spec
        unknown = set(kw) - set(DEFAULT_OPTIMIZER)
        if unknown:
            raise ValueError(f"unknown adamw options {sorted(unknown)}")
        lr = float(kw.pop("learning_rate"))
        return adamw_torch(lr, **{k: float(v) for k, v in kw.items()})
    if name == "sgd":
        unknown = set(spec) - {"learning_rate", "momentum"}
        if unknown:
            raise ValueError(f"unknown sgd options {sorted(unknown)}")
        momentum = spec.get("momentum")
        return optax.sgd(float(spec.get("learning_rate", 5e-3)), momentum=momentum)
    raise ValueError(f"unknown test-time optimiser {name!r}; choose 'adamw' or 'sgd'")


# --------------------------------------------------------------------------------------------
# The episode
# --------------------------------------------------------------------------------------------


def num_selected(num_views: int, keep: float) -> int:
    """How many views TPT keeps: ``int(num_views * keep)``, a floor (6 of 64 at 0.1).

    Raises:
      ValueError: if that is 0 or more than ``num_views``.
    """
    k = int(num_views * keep)
    if not 1 <= k <= num_views:
        raise ValueError(
            f"keep={keep} of {num_views} views selects int({num_views} * {keep}) = {k}; "
            f"need 1 <= k <= {num_views}"
        )
    return k


def _kind(base: base_lib.PromptMethod) -> str:
    """The episode's path, from what the base offers (``base.frozen_image``), not its name:
    ``"shared"`` (views encoded once, the initial text pass shared by a batch: CoOp,
    zero-shot), ``"per_image"`` (views encoded once, text per image: CoCoOp) or
    ``"generic"`` (the base's own logits on every view: IVLP, MaPLe, ...)."""
    side = base.frozen_image
    if side is None:
        return "generic"
    return "per_image" if side.per_image else "shared"


def _optimise(
    tx: optax.GradientTransformation,
    prompt: Prompt,
    loss: Callable[[Prompt], Array],
    steps: int,
    state: Any = None,
) -> tuple[Prompt, Any]:
    """``steps`` optimiser steps on ``loss`` from ``prompt`` (fresh state unless given)."""
    state = tx.init(prompt) if state is None else state

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    # A scan, not a Python loop: the step is traced once whatever the number of steps.
    (prompt, state), _ = jax.lax.scan(step, (prompt, state), None, length=steps)
    return prompt, state


def _text_fn(base, clip, task):
    """``text(p) -> [C, E]`` normalised class features of the tuned pytree."""
    return lambda p: clip_lib.normalize(base.frozen_image.class_features(p, clip, task))


def _initial_tuned(base, prompt, feats0, cocoop_unnormalized):
    """The pytree the episode tunes, from the method's prompt and view 0's raw feature."""
    # The reference's TPT + CoCoOp feeds the un-normalised feature to the meta-net.
    x = feats0 if cocoop_unnormalized else clip_lib.normalize(feats0)
    return base.frozen_image.tuned(prompt, x)


def _episode_core(
    base, tx, prompt, clip, task, views, feats, *, steps, keep, cocoop_unnormalized, state=None
) -> dict[str, Any]:
    """One episode the plain way (the reference's order of work); ``feats`` may be None.

    ``state`` is the optimiser state to start from (``None``: a fresh one, TPT's reset); the
    returned dict carries the final one under ``"opt_state"`` (online TPT carries it on)."""
    kind = _kind(base)
    scale = clip_lib.logit_scale(clip)
    n_views = views.shape[0] if views is not None else feats.shape[0]
    all_views = jnp.arange(n_views)
    if kind == "generic":
        tuned0 = prompt

        def logits_at(p, idx):
            return base.logits(p, clip, task, views[idx])

    else:
        if feats is None:
            feats = jax.lax.stop_gradient(clip_lib.encode_image(clip, views))  # [V, E]
        img = clip_lib.normalize(feats)
        tuned0 = _initial_tuned(base, prompt, feats[0], cocoop_unnormalized)
        text = _text_fn(base, clip, task)

        def logits_at(p, idx):
            return scale * img[idx] @ text(p).T

    z0 = logits_at(tuned0, all_views)  # [V, C] with the initial prompt
    selected = losses.confident_indices(z0, keep)  # [k], fixed for all steps (spec 2.3)

    def loss(p):
        return losses.marginal_entropy(logits_at(p, selected))

    tuned, state = _optimise(tx, tuned0, loss, steps, state)
    return {
        "logits": logits_at(tuned, all_views[:1])[0],
        "initial": z0[0],
        "selected": selected,
        "loss": losses.marginal_entropy(z0[selected]),
        "prompt": tuned,
        "opt_state": state,
    }


def episode(
    base: base_lib.PromptMethod,
    tx: optax.GradientTransformation,
    prompt: Prompt,
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    views: Array,
    *,
    steps: int = 1,
    keep: float = 0.1,
    cocoop_unnormalized: bool = True,
) -> Array:
    """One TPT episode: tune the prompt on one image's views, then classify view 0.

    Written the straightforward way, one image at a time (text forward and backward for this
    image alone); :func:`episodes` computes the same thing for a batch with the shared work
    done once.

    Args:
      base: the method whose prompt is tuned, e.g. ``coop(n_ctx=4, init_words="a photo of a")``.
      tx: the test-time optimiser (TPT: :func:`adamw_torch`); its state starts fresh.
      prompt: the initial prompt of ``base`` (the same for every image).
      clip: the frozen CLIP.
      task: the class set.
      views: ``[V, H, W, 3]`` normalised views; view 0 is the un-augmented image.
      steps: optimiser steps (TPT: 1); 0 gives the untuned (zero-shot) prediction.
      keep: fraction of the views kept for the loss (TPT: 0.1, so 6 of 64).
      cocoop_unnormalized: TPT + CoCoOp only: feed view 0's un-normalised feature to the
        meta-net, as the reference does.

    Returns:
      ``[C]`` float32 logits of view 0 with the tuned prompt.
    """
    views = jnp.asarray(views, jnp.float32)
    if views.ndim != 4:
        raise ValueError(f"episode takes the views of ONE image [V, H, W, 3], got {views.shape}")
    num_selected(views.shape[0], keep)
    out = _episode_core(
        base, tx, prompt, clip, task, views, None,
        steps=steps, keep=keep, cocoop_unnormalized=cocoop_unnormalized,
    )  # fmt: skip
    return out["logits"]


def episodes(
    base: base_lib.PromptMethod,
    tx: optax.GradientTransformation,
    prompt: Prompt,
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    views: Array,
    *,
    steps: int = 1,
    keep: float = 0.1,
    cocoop_unnormalized: bool = True,
    details: bool = False,
) -> Array | dict[str, Any]:
    """B independent TPT episodes side by side (each equals :func:`episode` on its image).

    Each image gets its own copy of the prompt and of the optimiser state, its own confident
    views and its own prediction; nothing passes between images. Under ``jit`` with ``views``
    sharded over a ``data`` mesh axis, each device runs its own images' episodes.

    What is shared (exact, see the module docstring): one image-tower call for all B x V views,
    view 0's feature reused for the prediction, and for CoOp-style bases one text forward of the
    initial prompt whose ``vjp`` is applied to the B per-image cotangents.

    Args:
      base: the method whose prompt is tuned.
      tx: the test-time optimiser.
      prompt: the initial prompt (the same for every image).
      clip: the frozen CLIP.
      task: the class set.
      views: ``[B, V, H, W, 3]`` normalised views; ``views[:, 0]`` the un-augmented images.
      steps: optimiser steps per image (TPT: 1).
      keep: fraction of views kept (TPT: 0.1).
      cocoop_unnormalized: see :func:`episode`.
      details: also return the step-0 quantities.

    Returns:
      ``[B, C]`` float32 logits of view 0 after tuning; with ``details``, a dict with
      ``"logits"``, ``"initial"`` ([B, C] view-0 logits with the initial prompt: the zero-shot
      prediction, for free), ``"selected"`` ([B, k] view indices, most confident first),
      ``"loss"`` ([B] step-0 marginal entropy) and ``"prompt"`` (the tuned pytrees, leading
      axis B).
    """
    views = jnp.asarray(views, jnp.float32)
    if views.ndim != 5:
        raise ValueError(f"episodes takes [B, V, H, W, 3] views, got shape {views.shape}")
    n_img, n_views = views.shape[:2]
    num_selected(n_views, keep)
    kind = _kind(base)
    opts = dict(steps=steps, keep=keep, cocoop_unnormalized=cocoop_unnormalized)
    if kind == "generic":
        out = jax.vmap(lambda v: _episode_core(base, tx, prompt, clip, task, v, None, **opts))(
            views
        )
        out.pop("opt_state")
        return out if details else out["logits"]

    feats = _view_features(clip, views)  # [B, V, E]
    if kind == "per_image":
        # The tuned context starts from a different point per image: nothing to share on the
        # text side.
        out = jax.vmap(lambda f: _episode_core(base, tx, prompt, clip, task, None, f, **opts))(
            feats
        )
        out.pop("opt_state")
        return out if details else out["logits"]

    out = _shared_text_episodes(base, tx, prompt, clip, task, feats, steps=steps, keep=keep)
    return out if details else out["logits"]


def _view_features(clip: clip_lib.Clip, views: Array) -> Array:
    """Frozen image features of [B, V, H, W, 3] views in one image-tower call -> [B, V, E]
    (the tower is frozen: no gradient)."""
    n_img, n_views = views.shape[:2]
    flat = views.reshape((n_img * n_views,) + views.shape[2:])
    feats = jax.lax.stop_gradient(clip_lib.encode_image(clip, flat))
    return feats.reshape(n_img, n_views, -1)


def online_episodes(
    base: base_lib.PromptMethod,
    tx: optax.GradientTransformation,
    prompt: Prompt,
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    views: Array,
    *,
    steps: int = 1,
    keep: float = 0.1,
    carry_optimizer: bool = False,
    opt_state: Any = None,
    mask: Array | None = None,
) -> dict[str, Any]:
    """Online TPT: B episodes in order, each starting from the prompt the previous one tuned.

    Sample ``b`` runs exactly :func:`episode`'s steps (views, step-0 selection with the prompt
    it starts from, ``steps`` optimiser steps, prediction on view 0) but from the prompt that
    sample ``b - 1`` ended with instead of the initial one; with ``carry_optimizer`` the
    optimiser state is carried too (otherwise it starts fresh per sample, as in TPT). This is
    the sequential definition itself, a ``lax.scan`` over the samples in the order given (the
    batch is only a unit of work: B = 1 called B times with the carry passed on gives the same
    numbers). Image features of all B x V views still come from one image-tower call when the
    base's image side is frozen. Episodic TPT (:func:`episodes`) is the special case where
    nothing is carried.

    Args:
      base: the method whose prompt is tuned; its tuned pytree must be its prompt (CoOp,
        zero-shot, vision-prompt bases), not an image-dependent context (CoCoOp).
      tx: the test-time optimiser.
      prompt: the prompt the first sample starts from (the carry from the previous batch).
      clip: the frozen CLIP.
      task: the class set.
      views: ``[B, V, H, W, 3]`` normalised views, in the order the samples are seen.
      steps: optimiser steps per sample.
      keep: fraction of views kept.
      carry_optimizer: carry the optimiser state from sample to sample.
      opt_state: the carried optimiser state to start from (``None``: ``tx.init(prompt)``);
        used only with ``carry_optimizer``.
      mask: ``[B]`` bool; a ``False`` row (padding) is computed but leaves the carry as it was.

    Returns:
      A dict: ``"logits"`` [B, C] view 0 after tuning, ``"initial"`` [B, C] view 0 with the
      prompt each sample started from, ``"selected"`` [B, k], ``"loss"`` [B] step-0 marginal
      entropies, ``"prompt"`` the carried prompt after the last (unmasked) sample and
      ``"opt_state"`` the carried optimiser state (``None`` without ``carry_optimizer``).

    Raises:
      ValueError: a base whose tuned context depends on the image, or bad shapes.
    """
    views = jnp.asarray(views, jnp.float32)
    if views.ndim != 5:
        raise ValueError(f"online_episodes takes [B, V, H, W, 3] views, got shape {views.shape}")
    kind = _kind(base)
    if kind == "per_image":
        raise ValueError(
            f"online TPT carries the tuned prompt, but {base.name}'s tuned context depends on "
            "the image: use episodic TPT with this base"
        )
    n_img, n_views = views.shape[:2]
    num_selected(n_views, keep)
    mask = jnp.ones((n_img,), bool) if mask is None else jnp.asarray(mask, bool)
    data = _view_features(clip, views) if kind == "shared" else views
    fresh = tx.init(prompt)
    state0 = fresh if (opt_state is None or not carry_optimizer) else opt_state

    def keep_if(m, new, old):
        return jax.tree.map(lambda a, b: jnp.where(m, a, b), new, old)

    def step(carry, x):
        p, s = carry
        d, m = x
        v, f = (None, d) if kind == "shared" else (d, None)
        out = _episode_core(
            base, tx, p, clip, task, v, f, steps=steps, keep=keep, cocoop_unnormalized=True,
            state=s if carry_optimizer else None,
        )  # fmt: skip
        p = keep_if(m, out["prompt"], p)
        if carry_optimizer:
            s = keep_if(m, out["opt_state"], s)
        ys = {k: out[k] for k in ("logits", "initial", "selected", "loss")}
        return (p, s), ys

    (p, s), ys = jax.lax.scan(step, (prompt, state0), (data, mask))
    return {**ys, "prompt": p, "opt_state": s if carry_optimizer else None}


def _shared_text_episodes(base, tx, prompt, clip, task, feats, *, steps, keep):
    """Episodes for a CoOp-style base: the initial prompt's text pass is done once per batch."""
    scale = clip_lib.logit_scale(clip)
    img = clip_lib.normalize(feats)  # [B, V, E]
    text = _text_fn(base, clip, task)
    # Forward of the text tower at the shared initial prompt, once; vjp_text maps a cotangent
    # on the [C, E] features to one on the prompt (the backward pass), per image below.
    txt0, vjp_text = jax.vjp(text, prompt)  # [C, E]
    z0 = scale * jnp.einsum("bve,ce->bvc", img, txt0)  # [B, V, C]
    selected = jax.vmap(lambda z: losses.confident_indices(z, keep))(z0)  # [B, k]
    sel = jnp.take_along_axis(img, selected[:, :, None], axis=1)  # [B, k, E]

    def loss_from_text(t, s):
        return losses.marginal_entropy(scale * s @ t.T)

    loss0, g_txt = jax.vmap(jax.value_and_grad(loss_from_text), in_axes=(None, 0))(txt0, sel)
    (grads,) = jax.vmap(vjp_text)(g_txt)  # per-image gradients, leading axis B
    state0 = tx.init(prompt)
    if steps == 0 or not jax.tree.leaves(prompt):
        # Nothing to tune (zero-shot, or an empty prompt): view 0's initial logits are final.
        tuned = jax.tree.map(lambda x: jnp.broadcast_to(x, (feats.shape[0],) + x.shape), prompt)
        return {
            "logits": z0[:, 0],
            "initial": z0[:, 0],
            "selected": selected,
            "loss": loss0,
            "prompt": tuned,
        }
    else:
        updates, states = jax.vmap(tx.update, in_axes=(0, None, None))(grads, state0, prompt)
        tuned = jax.vmap(optax.apply_updates, in_axes=(None, 0))(prompt, updates)
        if steps > 1:
            # From step 1 on, every image has its own prompt: forward and backward per image.
            def more(p, s, sel_b):
                return _optimise(tx, p, lambda q: loss_from_text(text(q), sel_b), steps - 1, s)

            tuned, _ = jax.vmap(more)(tuned, states, sel)
    txt1 = jax.vmap(text)(tuned)  # [B, C, E], the forward pass with each tuned prompt
    logits = scale * jnp.einsum("be,bce->bc", img[:, 0], txt1)
    return {
        "logits": logits,
        "initial": z0[:, 0],
        "selected": selected,
        "loss": loss0,
        "prompt": tuned,
    }


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


def default_base() -> base_lib.PromptMethod:
    """TPT's base: CoOp, 4 context vectors from "a photo of a", rematerialised text blocks."""
    from jaxprompt.methods.coop import coop  # a wrapper may build its default base

    return coop(n_ctx=4, init_words="a photo of a", remat=True)


def views_from_images(key: Array, images: Array, n_views: int, augmix: bool) -> Array:
    """TPT views made on device from already-normalised images [B, S, S, 3] -> [B, V, S, S, 3].

    Image ``b``'s views come from ``fold_in(key, b)``; view 0 is the image itself.

    The runner (``jaxprompt adapt``) crops from the full decoded image; here only the eval crop
    is at hand, so the random resized crops come from it (view 0 is the image itself).
    """
    # The augmentation module lives in the data stack (grain): imported on use so importing
    # the methods stays free of it.
    from jaxprompt.data import augment

    mean = jnp.asarray(augment.CLIP_MEAN, jnp.float32)
    std = jnp.asarray(augment.CLIP_STD, jnp.float32)
    size = images.shape[1]

    def one(k, x):
        pixels = jnp.clip((x * std + mean) * 255.0, 0.0, 255.0)
        hw = jnp.asarray([x.shape[0], x.shape[1]], jnp.int32)
        return augment.tpt_views(
            k, x, pixels, hw, n_views=n_views - 1, use_augmix=augmix, out_size=size
        )

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    return jax.vmap(one)(keys, images)


def tpt(
    base: base_lib.PromptMethod | None = None,
    optimizer: optax.GradientTransformation | None = None,
    *,
    steps: int = 1,
    views: int = 64,
    keep: float = 0.1,
    augmix: bool = False,
    cocoop_unnormalized: bool = True,
    reset: str = "episodic",
    carry_optimizer: bool = False,
) -> base_lib.PromptMethod:
    """TPT as a method transformer: ``logits`` runs one whole episode per sample.

    Names and JSON descriptions (``jp.methods.get("tpt", base="coop", base_kwargs={...},
    optimizer={"name": "adamw", ...})``) are resolved by the registry, not here.

    Args:
      base: the method whose prompt is tuned (``None``: :func:`default_base`, TPT's CoOp
        prompt).
      optimizer: an optax transformation (``None``: TPT's AdamW, lr 5e-3, weight decay 0.01,
        PyTorch semantics; :func:`make_optimizer` builds others from a JSON description).
      steps: optimiser steps per image (TPT: 1).
      views: views per image, view 0 included (TPT: 64), when ``logits`` makes the views.
      keep: fraction of views kept for the loss (TPT: 0.1, so 6 of 64).
      augmix: AugMix views (TPT's fine-grained datasets) when ``logits`` makes the views.
      cocoop_unnormalized: see :func:`episode`.
      reset: ``"episodic"`` (TPT: every sample starts from the initial prompt and a fresh
        optimiser state) or ``"online"`` (each sample starts from the prompt tuned on the one
        before, :func:`online_episodes`). Online ``logits`` carries the prompt through the
        rows of one call, in row order, starting from ``prompt``; carrying it from one call to
        the next is the caller's (``jaxprompt adapt`` does, over the whole test split).
      carry_optimizer: online only: carry the optimiser state from sample to sample too.

    Returns:
      A :class:`PromptMethod` named ``"tpt"`` whose prompt is the base's initial prompt.
      ``logits(prompt, clip, task, x, key=None)`` takes either views ``[B, V, H, W, 3]``
      (view 0 the un-augmented image; :func:`episodes`) or images ``[B, H, W, 3]``, from which
      ``views - 1`` random crops + flips (+ AugMix) are made on device with
      ``fold_in(key, b)`` (``key`` defaults to ``key(0)``). ``loss`` is TPT's step-0 objective
      (mean over samples of the marginal entropy of the confident views), label-free.
    """
    base_m = default_base() if base is None else base_lib.check_base(base, wrapper="tpt")
    if optimizer is None:
        tx, opt_config = make_optimizer(DEFAULT_OPTIMIZER), dict(DEFAULT_OPTIMIZER)
    else:
        tx, opt_config = optimizer, "custom"
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    num_selected(views, keep)
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    if carry_optimizer and reset != "online":
        raise ValueError("carry_optimizer=True needs reset='online'")
    if reset == "online" and _kind(base_m) == "per_image":
        raise ValueError(
            f"online TPT carries the tuned prompt, but {base_m.name}'s tuned context depends "
            "on the image: use reset='episodic' with this base"
        )
    opts = dict(steps=steps, keep=keep, cocoop_unnormalized=cocoop_unnormalized)

    def as_views(x, key):
        x = jnp.asarray(x, jnp.float32)
        if x.ndim == 5:
            return x
        if x.ndim != 4:
            raise ValueError(
                f"tpt takes images [B, H, W, 3] or views [B, V, H, W, 3], got {x.shape}"
            )
        key = jax.random.key(0) if key is None else key
        return views_from_images(key, x, views, augmix)

    def init(key, clip, task):
        return base_m.init(key, clip, task)

    def logits(prompt, clip, task, images, *, key=None):
        if reset == "online":
            return online_episodes(
                base_m, tx, prompt, clip, task, as_views(images, key), steps=steps, keep=keep,
                carry_optimizer=carry_optimizer,
            )["logits"]  # fmt: skip
        return episodes(base_m, tx, prompt, clip, task, as_views(images, key), **opts)

    def loss(prompt, clip, task, batch, key):
        # The step-0 objective with THIS prompt (training on it is online TPT, not episodic).
        v = as_views(batch["image"], key)
        kind = _kind(base_m)

        def one(p, vb):
            out = _episode_core(base_m, tx, p, clip, task, vb, None, **{**opts, "steps": 0})
            return out["loss"]

        if kind != "shared":
            ent = jax.vmap(one, in_axes=(None, 0))(prompt, v)
        else:
            ent = _frozen_image_loss(base_m, prompt, clip, task, v, keep)
        value = jnp.mean(ent)
        return value, {"marginal_entropy": value}

    return base_lib.PromptMethod(
        init=init,
        logits=logits,
        loss=loss,
        name="tpt",
        config=dict(
            base=base_m,
            optimizer=opt_config,
            steps=steps,
            views=views,
            keep=keep,
            augmix=augmix,
            cocoop_unnormalized=cocoop_unnormalized,
            reset=reset,
            carry_optimizer=carry_optimizer,
        ),
    )


def _frozen_image_loss(base, prompt, clip, task, views, keep) -> Array:
    """[B] step-0 marginal entropies with gradient to ``prompt`` (text tower run once)."""
    img = clip_lib.normalize(_view_features(clip, views))  # [B, V, E]
    txt = _text_fn(base, clip, task)(prompt)
    z = clip_lib.logit_scale(clip) * jnp.einsum("bve,ce->bvc", img, txt)
    selected = jax.vmap(lambda zb: losses.confident_indices(jax.lax.stop_gradient(zb), keep))(z)
    zs = jnp.take_along_axis(z, selected[:, :, None], axis=1)
    return jax.vmap(losses.marginal_entropy)(zs)
