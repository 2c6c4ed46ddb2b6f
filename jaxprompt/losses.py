"""Shared pure losses for prompt learning on a frozen CLIP.

Every function here is a pure, jit-able JAX function of arrays: no parameters, no RNG, no
Python-side state. All maths runs in float32 whatever the input dtype (logits produced by a
bfloat16 tower are upcast first), because softmaxes at CLIP's logit scale of 100 lose too much
in 16-bit floats.

The reductions (sum vs mean, which axis, which direction) are the point of this module: each
one follows what the reference code of the method does, as recorded in the method specs, and
the docstrings say which method uses what.

* Supervised / PromptSRC (Khattak et al., ICCV 2023): :func:`cross_entropy`,
  :func:`kl_agreement`, :func:`l1_agreement`.
* TPT (Shu et al., NeurIPS 2022): :func:`confident_indices`, :func:`select_confident`,
  :func:`marginal_entropy`.
* POUF (Tanwisuth et al., ICML 2023): :func:`transport_loss`,
  :func:`transport_loss_from_cosine`, :func:`mutual_information_loss`.
* Bayesian prompt learning (Derakhshani et al., ICCV 2023): :func:`gaussian_kl`,
  :func:`log_mean_exp`, :func:`mc_log_likelihood`, :func:`mc_nll`, :func:`mc_log_predictive`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "confident_indices",
    "cross_entropy",
    "gaussian_kl",
    "kl_agreement",
    "l1_agreement",
    "log_mean_exp",
    "marginal_entropy",
    "mc_log_likelihood",
    "mc_log_predictive",
    "mc_nll",
    "mutual_information_loss",
    "select_confident",
    "transport_loss",
    "transport_loss_from_cosine",
]


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _row_entropy(logits: jax.Array) -> jax.Array:
    """Shannon entropy (nats) of softmax(logits) along the last axis."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    # p * log p is computed from log-probabilities, so an underflowed p (= 0) multiplies a
    # finite log p and contributes exactly 0 instead of 0 * -inf = NaN.
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


# --------------------------------------------------------------------------------------------
# Supervised and PromptSRC self-consistency losses.
# --------------------------------------------------------------------------------------------


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Mean softmax cross-entropy with integer labels.

    .. math::
        L = -\frac{1}{B} \sum_b \log \mathrm{softmax}(z_b)_{y_b}

    No label smoothing (none of the supported methods uses it). The logits should already
    include CLIP's logit scale (x100).

    Args:
      logits: ``[B, C]`` unnormalised class scores.
      labels: ``[B]`` integer class indices in ``[0, C)``.

    Returns:
      Scalar float32 mean cross-entropy (nats).

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
      1.3863
    """
    log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
    labels = jnp.asarray(labels, dtype=jnp.int32)
    picked = jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]  # [B]
    return -jnp.mean(picked)


def kl_agreement(
    teacher_logits: ArrayLike,
    student_logits: ArrayLike,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    r"""PromptSRC logit consistency: KL(p_teacher || p_student) normalised by B*C.

    With :math:`\log p_T = \mathrm{log\_softmax}(z_T / T)` (frozen CLIP, the *target*) and
    :math:`\log p_S = \mathrm{log\_softmax}(z_S / T)` (prompted model, the *input*):

    .. math::
        L = \frac{T^2}{B\,C} \sum_{b,c} p_T[b,c]\,(\log p_T[b,c] - \log p_S[b,c])

    The sum runs over the batch AND the classes and is divided by the number of logits B*C.
    This is what the PromptSRC reference does (a ``reduction='sum'`` KL divided by
    ``logits.numel()``); it is NOT PyTorch's ``'batchmean'`` (which divides by B only) and is
    C times smaller than it. The direction matters too: the frozen CLIP is the target
    distribution, so the student is penalised where the teacher puts mass.

    The teacher is wrapped in ``stop_gradient``: gradients flow only into the student logits,
    as in the reference where the frozen logits are computed under ``no_grad``.

    Args:
      teacher_logits: ``[B, C]`` frozen (zero-shot CLIP) logits, x100 scale included.
      student_logits: ``[B, C]`` prompted-model logits, x100 scale included.
      temperature: Distillation temperature T. PromptSRC uses 1; the T^2 factor keeps the
        gradient scale independent of T (standard distillation convention, as in the reference).

    Returns:
      Scalar float32 loss, >= 0, zero iff the two softmaxes agree.
    """
    teacher = jax.lax.stop_gradient(_f32(teacher_logits))
    student = _f32(student_logits)
    log_p_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student / temperature, axis=-1)
    # exp(log p_T) rather than softmax: an underflowed teacher probability then multiplies a
    # finite log-ratio and gives 0, matching torch's xlogy convention (0 log 0 = 0).
    pointwise = jnp.exp(log_p_t) * (log_p_t - log_p_s)  # [B, C]
    return temperature**2 * jnp.sum(pointwise) / pointwise.size


def l1_agreement(a: ArrayLike, b: ArrayLike) -> jax.Array:
    r"""Mean absolute difference over ALL elements (PyTorch ``l1_loss(reduction='mean')``).

    .. math::
        L = \frac{1}{N} \sum_{i} |a_i - b_i|, \quad N = \text{number of elements}

    PromptSRC applies this to L2-normalised features: image features ``[B, 512]`` (weight 10)
    and text features of all classes ``[C, 512]`` (weight 25). Because the mean is over all
    elements, it equals the per-row L1 norm divided by the feature width, averaged over rows.
    Gradients flow into both arguments; pass the frozen side as a constant (it is one already
    when it comes from frozen encoders).

    Args:
      a: Array of any shape, e.g. ``[B, E]`` prompted features.
      b: Array of the same shape, e.g. ``[B, E]`` frozen features.

    Returns:
      Scalar float32 mean absolute difference.
    """
    return jnp.mean(jnp.abs(_f32(a) - _f32(b)))


# --------------------------------------------------------------------------------------------
# TPT: confidence selection and marginal entropy.
# --------------------------------------------------------------------------------------------


def _num_confident(num_views: int, keep: float) -> int:
    # The reference computes int(batch_size * top) on Python floats: a FLOOR, not a round
    # (int(64 * 0.1) = int(6.4) = 6). We reproduce the exact float expression, so float
    # artefacts are inherited as well (int(100 * 0.29) = int(28.999999999999996) = 28).
    k = int(num_views * keep)
    if not 1 <= k <= num_views:
        raise ValueError(
            f"keep={keep} with {num_views} views selects k=int({num_views} * {keep}) = {k} "
            f"views; need 1 <= k <= {num_views}."
        )
    return k


def confident_indices(logits: ArrayLike, keep: float) -> jax.Array:
    r"""Indices of the ``k = int(V * keep)`` lowest-entropy views, most confident first.

    .. math::
        H_v = -\sum_c \mathrm{softmax}(z_v)_c \log \mathrm{softmax}(z_v)_c, \qquad
        \text{idx} = \mathrm{argsort}(H)[:k]

    TPT selects the views once, at step 0, and reuses the same indices at later steps;
    keeping the indices separate from :func:`select_confident` makes that possible. The view 0
    (un-augmented image) gets no special treatment: it is kept only if it ranks in the top k.

    Ties are broken by the lower view index (stable sort). The reference uses torch's
    unstable ``argsort``, so its tie-breaking is unspecified; the selected *set* only differs
    when ties straddle position k.

    Args:
      logits: ``[V, C]`` logits of all V views (x100 scale included: the scale changes the
        entropies and hence the ranking).
      keep: Fraction of views to keep (TPT: 0.1). Must be a Python float (static under jit).

    Returns:
      ``[k]`` int32 view indices sorted by ascending entropy.

    Raises:
      ValueError: if ``int(V * keep)`` is 0 or larger than V.
    """
    logits = _f32(logits)
    k = _num_confident(logits.shape[0], keep)
    entropy = _row_entropy(logits)  # [V]
    return jnp.argsort(entropy, stable=True)[:k].astype(jnp.int32)


def select_confident(logits: ArrayLike, keep: float) -> jax.Array:
    """Rows of ``logits`` for the ``k = int(V * keep)`` lowest-entropy views.

    Equivalent to ``logits[confident_indices(logits, keep)]``; see :func:`confident_indices`
    for the entropy, the floor rounding of k and tie-breaking. Gradients flow through the
    gathered rows (the selection itself is discrete).

    Args:
      logits: ``[V, C]`` logits of all views.
      keep: Fraction of views to keep (TPT: 0.1 so 6 of 64). Static under jit.

    Returns:
      ``[k, C]`` float32 logits, most confident view first.

    Example:
      >>> import jax.numpy as jnp
      >>> select_confident(jnp.zeros((64, 3)), keep=0.1).shape  # int(6.4) = 6
      (6, 3)
    """
    logits = _f32(logits)
    return logits[confident_indices(logits, keep)]


def marginal_entropy(logits: ArrayLike) -> jax.Array:
    r"""Entropy of the average class probability over views (TPT's test-time loss).

    .. math::
        \ell_k &= z_k - \mathrm{logsumexp}_c(z_k) \\
        a &= \mathrm{logsumexp}_k(\ell_k) - \log K
              = \log \tfrac{1}{K} \textstyle\sum_k \mathrm{softmax}(z_k) \\
        L &= -\sum_c e^{a_c}\, a_c

    The average is over PROBABILITIES (computed stably as a log-mean-exp of log-softmaxes),
    not over logits nor over log-probabilities. As in the reference, ``a`` is clamped from
    below at the most negative finite float32, so a class whose mean probability is exactly 0
    contributes 0 instead of ``0 * -inf = NaN``. Unlike the reference, the gradient is then
    also finite (0 for that class) rather than NaN.

    Args:
      logits: ``[K, C]`` logits of the selected views (see :func:`select_confident`).

    Returns:
      Scalar float32 entropy in nats, in ``[0, log C]``.

    Example:
      >>> import jax.numpy as jnp
      >>> # Two confident views that disagree: the MEAN probability is uniform over 2 classes.
      >>> round(float(marginal_entropy(jnp.array([[50.0, 0.0], [0.0, 50.0]]))), 4)  # log 2
      0.6931
    """
    log_p = jax.nn.log_softmax(_f32(logits), axis=-1)  # [K, C]
    floor = jnp.finfo(jnp.float32).min
    # Only a class with probability exactly 0 in every view (e.g. masked with -inf logits) has
    # a mean log-probability of -inf, the one value the reference's clamp changes. Clamping
    # after the logsumexp fixes the value but not the gradient: the backward pass of
    # logsumexp over an all -inf column is 0/0 = NaN (in torch as well), and NaN survives a
    # zero cotangent. So such columns bypass the logsumexp and are set to the floor directly.
    dead = jnp.all(jnp.isneginf(log_p), axis=0)  # [C]
    avg_log_p = log_mean_exp(jnp.where(dead, 0.0, log_p), axis=0)  # [C]
    avg_log_p = jnp.where(dead, floor, avg_log_p)
    return -jnp.sum(jnp.exp(avg_log_p) * avg_log_p)


# --------------------------------------------------------------------------------------------
# POUF: conditional transport and information maximisation.
# --------------------------------------------------------------------------------------------


def transport_loss_from_cosine(cosine: ArrayLike, *, scale: ArrayLike) -> jax.Array:
    r"""POUF's bidirectional conditional-transport loss from a cosine-similarity matrix.

    With ``s = cosine`` (``[M, K]``: M target features in the batch x K class prototypes),
    ``a = scale * s``, cost ``c = 1 - s``:

    .. math::
        \pi_\to(k|j) &= \mathrm{softmax}_k(a_{jk}) \quad\text{(feature -> prototype, rows)}\\
        \pi_\gets(j|k) &= \mathrm{softmax}_j(a_{jk}) \quad\text{(prototype -> feature,
            over the mini-batch)}\\
        L &= \frac{1}{M}\sum_j\sum_k c_{jk}\pi_\to(k|j)
            + \frac{1}{K}\sum_k\sum_j c_{jk}\pi_\gets(j|k)

    Where the temperature enters: ``scale`` (= 1/tau) multiplies the cosine ONLY inside the two
    softmax plans; the cost uses the unscaled cosine. For CLIP pass ``exp(logit_scale)``
    (about 100 and trainable in POUF: pass the traced value so its gradient flows); for the
    masked-LM variant POUF uses a fixed 10.

    Both directions have weight 1 and both marginals are uniform (1/M over samples, 1/K over
    prototypes): no class-proportion prior, no 0.5/0.5 split (those belong to POUF's
    predecessor PCT). Nothing is detached: gradients flow through the cost and both plans.
    The backward plan normalises over the batch axis, so compute this on the GLOBAL batch
    under data parallelism. The loss is symmetric, ``f(s) == f(s.T)``, and lies in
    ``[0, 4]``; a constant ``s`` gives ``2 (1 - s)``.

    Args:
      cosine: ``[M, K]`` cosine similarities between L2-normalised target features (rows)
        and L2-normalised prototypes (columns), in ``[-1, 1]``.
      scale: Scalar inverse temperature 1/tau applied inside both softmaxes.

    Returns:
      Scalar float32 transport loss.
    """
    cosine = _f32(cosine)
    logits = _f32(scale) * cosine
    cost = 1.0 - cosine
    forward = jax.nn.softmax(logits, axis=1)  # [M, K], each sample over prototypes
    backward = jax.nn.softmax(logits, axis=0)  # [M, K], each prototype over batch samples
    forward_cost = jnp.mean(jnp.sum(cost * forward, axis=1))  # mean over the M samples
    backward_cost = jnp.mean(jnp.sum(cost * backward, axis=0))  # mean over the K prototypes
    return forward_cost + backward_cost


def transport_loss(features: ArrayLike, prototypes: ArrayLike, *, scale: ArrayLike) -> jax.Array:
    """POUF's conditional-transport loss between target features and class prototypes.

    L2-normalises both sides, forms the cosine matrix ``[M, K]`` and applies
    :func:`transport_loss_from_cosine` (see there for the maths and where ``scale`` enters).

    * CLIP: ``features`` are the image embeddings of the unlabeled target batch; the
      ``prototypes`` are the text embeddings of the class prompts; ``scale = exp(logit_scale)``.
    * Masked LM: ``features`` are the lm_head's pre-decoder representations at ``<mask>``;
      the ``prototypes`` are the decoder (tied embedding) rows of the label words, without the
      bias; ``scale = 10``.

    Because the loss is symmetric in its two axes, swapping features and prototypes gives the
    same value, but keep the roles as documented for readability. A zero vector on either side
    has no direction and gives NaN, as in the reference's plain division by the norm.

    Args:
      features: ``[M, E]`` target features (raw; normalised here).
      prototypes: ``[K, E]`` class prototypes (raw; normalised here).
      scale: Scalar inverse temperature used inside both softmax plans.

    Returns:
      Scalar float32 transport loss.
    """
    features = _f32(features)
    prototypes = _f32(prototypes)
    features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    prototypes = prototypes / jnp.linalg.norm(prototypes, axis=-1, keepdims=True)
    return transport_loss_from_cosine(features @ prototypes.T, scale=scale)


def mutual_information_loss(
    logits: ArrayLike,
    *,
    cond_eps: float = 1e-5,
    marginal_eps: float = 1e-6,
) -> jax.Array:
    r"""POUF's information-maximisation term: mean per-sample entropy minus marginal entropy.

    With :math:`p_j = \mathrm{softmax}(z_j)` over the K classes:

    .. math::
        H_\text{cond} &= \frac{1}{M}\sum_j -\sum_k p_{jk}\log(p_{jk} + \epsilon_c) \\
        \bar p_k &= \frac{1}{M}\sum_j p_{jk}, \qquad
        H_\text{marg} = -\sum_k \bar p_k \log(\bar p_k + \epsilon_m) \\
        L &= H_\text{cond} - H_\text{marg}

    Minimising L maximises the mutual-information estimate H(Y) - H(Y|X): confident
    predictions spread over all classes (minimum about ``-log K``). The two different
    epsilons (1e-5 per sample, 1e-6 in the marginal) are the reference's. The marginal is over
    the mini-batch, so compute this on the GLOBAL batch under data parallelism.

    Where the temperature enters: ``logits`` are already scaled. For CLIP pass
    ``exp(logit_scale) * cosine`` (the same scaled similarities as the transport plans); for
    the masked LM pass the raw label-word MLM logits (temperature 1), NOT ``10 * cosine``.

    Args:
      logits: ``[M, K]`` scaled class logits of the target batch.
      cond_eps: Epsilon inside the per-sample log (reference: 1e-5).
      marginal_eps: Epsilon inside the marginal log (reference: 1e-6).

    Returns:
      Scalar float32 loss, roughly in ``[-log K, log K]``.
    """
    p = jax.nn.softmax(_f32(logits), axis=-1)  # [M, K]
    h_cond = jnp.mean(-jnp.sum(p * jnp.log(p + cond_eps), axis=-1))
    p_bar = jnp.mean(p, axis=0)  # [K]
    h_marg = -jnp.sum(p_bar * jnp.log(p_bar + marginal_eps))
    return h_cond - h_marg


# --------------------------------------------------------------------------------------------
# Bayesian prompt learning: Gaussian KL and Monte Carlo likelihood aggregation.
# --------------------------------------------------------------------------------------------


def gaussian_kl(mean: ArrayLike, logvar: ArrayLike) -> jax.Array:
    r"""Closed-form KL(N(mean, diag(exp(logvar))) || N(0, I)), AVERAGED over elements.

    .. math::
        L = \frac{1}{N}\sum_i \tfrac12\left(e^{\lambda_i} + \mu_i^2 - 1 - \lambda_i\right)

    The reference computes the per-dimension KL and takes the MEAN over the D = 512 dimensions,
    not the sum, so its weight 1e-3 is 1e-3 / 512 on the usual summed KL. For the conditional
    (image-dependent) posterior with ``[B, D]`` inputs this averages over the batch as well
    (the generalisation of the reference's B = 1 case recommended by the spec).

    Args:
      mean: ``[D]``, ``[1, D]`` or ``[B, D]`` posterior mean.
      logvar: Same shape as ``mean``: posterior LOG-VARIANCE (the reference's
        ``std_posterior`` parameter is a log-variance despite its name).

    Returns:
      Scalar float32 KL in nats per dimension.
    """
    mean = _f32(mean)
    logvar = _f32(logvar)
    return jnp.mean(0.5 * (jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar))


def log_mean_exp(x: ArrayLike, axis: int | Sequence[int] = 0) -> jax.Array:
    r"""Stable ``log(mean(exp(x), axis))``.

    .. math::
        \mathrm{LME}(x) = \mathrm{logsumexp}_{axis}(x) - \log N_{axis}

    Args:
      x: Array of any shape.
      axis: Axis or axes to reduce; N is the product of their sizes.

    Returns:
      float32 array with ``axis`` removed.

    Example:
      >>> import jax.numpy as jnp
      >>> float(log_mean_exp(jnp.array([1000.0, 1000.0])))  # no overflow
      1000.0
    """
    x = _f32(x)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    n = math.prod(x.shape[a] for a in axes)
    return jax.nn.logsumexp(x, axis=axes) - jnp.log(jnp.float32(n))


def mc_log_likelihood(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Per-example log of the Monte Carlo AVERAGE likelihood of the true class.

    .. math::
        \ell_{l,b} &= \mathrm{log\_softmax}(s_{l,b})_{y_b} \\
        \text{out}_b &= \mathrm{logsumexp}_l(\ell_{l,b}) - \log L
                      = \log \tfrac1L \textstyle\sum_l p(y_b \mid x_b, r_l)

    Bayesian prompt learning averages LIKELIHOODS over the L samples (log-mean-exp), not
    log-likelihoods (the textbook MC-ELBO) and not logits. With L = 1 it is minus the
    per-example cross-entropy.

    Args:
      logits: ``[L, B, C]`` logits for L Monte Carlo prompt samples (x100 scale included).
      labels: ``[B]`` integer class indices.

    Returns:
      ``[B]`` float32 log-likelihoods (<= 0).
    """
    log_p = jax.nn.log_softmax(_f32(logits), axis=-1)  # [L, B, C]
    labels = jnp.asarray(labels, dtype=jnp.int32)
    idx = jnp.broadcast_to(labels[None, :, None], log_p.shape[:2] + (1,))
    picked = jnp.take_along_axis(log_p, idx, axis=-1)[..., 0]  # [L, B]
    return log_mean_exp(picked, axis=0)


def mc_nll(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Bayesian prompt learning's task loss: minus the batch mean of :func:`mc_log_likelihood`.

    .. math::
        L_\text{task} = -\frac1B \sum_b \left[\mathrm{logsumexp}_l
            \log p(y_b \mid x_b, r_l) - \log L\right]

    The full objective is ``mc_nll(logits, labels) + 1e-3 * gaussian_kl(mean, logvar)``.

    Args:
      logits: ``[L, B, C]`` logits for L Monte Carlo samples.
      labels: ``[B]`` integer class indices.

    Returns:
      Scalar float32 loss.
    """
    return -jnp.mean(mc_log_likelihood(logits, labels))


def mc_log_predictive(logits: ArrayLike) -> jax.Array:
    r"""Log of the Monte Carlo average class probabilities (Bayesian prompts at test time).

    .. math::
        \text{score}_{b,c} = \mathrm{logsumexp}_l\, \mathrm{log\_softmax}(s_{l,b})_c - \log L

    The prediction is its argmax over classes. Probabilities are averaged, never logits.

    Args:
      logits: ``[L, B, C]`` logits for L Monte Carlo samples.

    Returns:
      ``[B, C]`` float32 log-probabilities (each row log-sums-exp to 0).
    """
    return log_mean_exp(jax.nn.log_softmax(_f32(logits), axis=-1), axis=0)
