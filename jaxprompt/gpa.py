"""Gaussian prompt aggregation (GPA), from PromptSRC.

Paper: "Self-regulating Prompts: Foundational Model Adaptation without Forgetting", Khattak et
al., ICCV 2023, https://arxiv.org/abs/2307.06948 (checked against github.com/muzairkhattak/PromptSRC
at bb95c77).

At the end of every epoch e (1-indexed, after that epoch's last optimizer step) the prompt is
multiplied by a Gaussian weight w_e and added to a running sum; after the last epoch the sum
replaces the prompt for evaluation and saving. The weights are a Gaussian pdf over epoch numbers,
normalised to sum to 1, so the result is a weighted average of the per-epoch prompts.

The aggregator has the shape of an optax transformation: a NamedTuple of pure functions
``(init, update, result)`` over an explicit state, so it can live inside a jitted training loop:

    agg = gaussian_aggregation(mean=15.0, std=1.0, num_epochs=20)
    state = agg.init(prompt)
    for epoch in range(1, 21):
        ...  # train one epoch
        state = agg.update(state, prompt, epoch)
    prompt = agg.result(state)

Only the trainable prompt pytree is aggregated, in float32. The reference aggregates the whole
state dict in each tensor's dtype (mostly fp16), which is a no-op on frozen weights up to fp16
rounding noise; that noise is deliberately not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "Aggregator",
    "GaussianAggregationState",
    "gaussian_aggregation",
    "gaussian_weights",
]

PyTree = Any


def gaussian_weights(*, mean: float, std: float, num_epochs: int) -> np.ndarray:
    r"""Normalised Gaussian epoch weights.

    .. math::
        w_e = \frac{\mathcal N(e;\, \mu, \sigma^2)}{\sum_{e'=1}^{N} \mathcal N(e';\, \mu,
        \sigma^2)}, \qquad e = 1, \dots, N

    Epochs are 1-indexed, and ``std`` is the standard deviation (PromptSRC's ``GPA_STD``).
    PromptSRC's configs: base-to-novel ``mean=15, std=1, num_epochs=20`` (weights
    .0540/.2420/.3989/.2420/.0540 on epochs 13-17); cross-dataset ``mean=6, std=10,
    num_epochs=20``; few-shot ``mean=30, std=30`` or ``mean=45, std=5`` with ``num_epochs=50``.

    The pdf's constant factor cancels in the normalisation, so the weights are computed from
    the exponent shifted by its maximum, in float64: they stay finite and sum to 1 even when
    every raw pdf value would underflow (a mean far outside the epoch range).

    Args:
      mean: Gaussian mean mu, in (1-indexed) epochs.
      std: Gaussian standard deviation sigma, in epochs; must be > 0.
      num_epochs: Number of epochs N; must be >= 1.

    Returns:
      ``[N]`` float64 NumPy array, entry ``e - 1`` is the weight of epoch ``e``.

    Example:
      >>> w = gaussian_weights(mean=15.0, std=1.0, num_epochs=20)
      >>> [round(float(x), 4) for x in w[12:17]]  # epochs 13..17
      [0.054, 0.242, 0.3989, 0.242, 0.054]
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}.")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}.")
    epochs = np.arange(1, num_epochs + 1, dtype=np.float64)
    log_pdf = -0.5 * np.square((epochs - float(mean)) / float(std))
    unnormalised = np.exp(log_pdf - log_pdf.max())
    return unnormalised / unnormalised.sum()


class GaussianAggregationState(NamedTuple):
    """State of :func:`gaussian_aggregation`.

    Attributes:
      total: Running weighted sum, a float32 pytree shaped like the prompt.
    """

    total: PyTree


class Aggregator(NamedTuple):
    """An optax-like triple of pure functions that averages snapshots over training.

    Attributes:
      init: ``init(prompt) -> state``: an empty aggregate shaped like ``prompt``.
      update: ``update(state, prompt, epoch) -> state``: fold in the snapshot taken at the end
        of (1-indexed) ``epoch``. Pure and jit-able; ``epoch`` may be traced.
      result: ``result(state) -> prompt``: the aggregated prompt (float32).
    """

    init: Callable[[PyTree], Any]
    update: Callable[[Any, PyTree, ArrayLike], Any]
    result: Callable[[Any], PyTree]


def gaussian_aggregation(*, mean: float, std: float, num_epochs: int) -> Aggregator:
    """PromptSRC's Gaussian prompt aggregation as an ``(init, update, result)`` triple.

    ``update(state, prompt, epoch)`` adds ``w_epoch * prompt`` (float32) into the running sum,
    with ``w`` from :func:`gaussian_weights`. Call it once per epoch, at the epoch end after the
    last optimizer step, for every epoch 1..N (tiny weights simply contribute ~0); then
    ``result`` is the Gaussian-weighted average of the per-epoch prompts. An ``epoch`` outside
    1..N contributes nothing (a Python int out of range raises ``ValueError``; a traced one
    cannot raise under jit, so it gets weight 0 instead of silently reusing a clamped index).

    Args:
      mean: Gaussian mean in 1-indexed epochs (PromptSRC ``GPA_MEAN``).
      std: Gaussian standard deviation in epochs (PromptSRC ``GPA_STD``).
      num_epochs: Total number of training epochs N.

    Returns:
      An :class:`Aggregator` whose state is a :class:`GaussianAggregationState`.
    """
    # Weights are cast to float32 once here; tiny weights underflowing to 0 is harmless.
    weights = np.asarray(gaussian_weights(mean=mean, std=std, num_epochs=num_epochs), np.float32)

    def init(prompt: PyTree) -> GaussianAggregationState:
        total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), prompt)
        return GaussianAggregationState(total=total)

    def update(
        state: GaussianAggregationState, prompt: PyTree, epoch: ArrayLike
    ) -> GaussianAggregationState:
        if isinstance(epoch, (int, np.integer)) and not 1 <= epoch <= num_epochs:
            raise ValueError(f"epoch must be in 1..{num_epochs} (1-indexed), got {epoch}.")
        # Epochs are 1-indexed. An out-of-range traced epoch gets weight 0: plain indexing
        # would clamp it onto the first or last epoch's weight (and -1 would wrap around).
        index = jnp.asarray(epoch, jnp.int32) - 1
        in_range = (index >= 0) & (index < num_epochs)
        w = jnp.where(in_range, jnp.asarray(weights)[jnp.clip(index, 0, num_epochs - 1)], 0.0)
        total = jax.tree.map(lambda s, p: s + w * jnp.asarray(p, jnp.float32), state.total, prompt)
        return GaussianAggregationState(total=total)

    def result(state: GaussianAggregationState) -> PyTree:
        return state.total

    return Aggregator(init=init, update=update, result=result)
