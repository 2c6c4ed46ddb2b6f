"""Learning-rate schedules as optax schedules (``count -> lr``).

``dassl_cosine`` is the recipe of CoOp, CoCoOp, IVLP, MaPLe and PromptSRC (Dassl's
``ConstantWarmupScheduler`` around ``CosineAnnealingLR`` with ``WARMUP_RECOUNT=True``): the rate
changes once per EPOCH, not per step, epoch 1 runs at a constant warm-up rate, and the cosine
count restarts at epoch 2, so the last epoch's rate is still above zero.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

__all__ = ["dassl_cosine", "epoch_of"]


def epoch_of(count: ArrayLike, iters_per_epoch: int) -> ArrayLike:
    """The 1-indexed epoch of the update after ``count`` finished steps.

    optax passes a schedule the number of updates done so far, so step ``count`` (0-indexed)
    belongs to epoch ``floor(count / iters_per_epoch) + 1``.
    """
    return count // iters_per_epoch + 1


def dassl_cosine(
    lr: float,
    *,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
) -> optax.Schedule:
    r"""Per-epoch cosine with a constant warm-up, as in Dassl (CoOp and its successors).

    With epoch :math:`e = \lfloor \text{count} / \text{iters\_per\_epoch} \rfloor + 1` and
    :math:`W` warm-up epochs:

    .. math::
        \eta(e) = \begin{cases} \eta_w & e \le W \\
        \eta_0 \cdot \tfrac12 \left(1 + \cos\!\left(\pi \, \min(e - W - 1, N) / N\right)\right)
        & e > W \end{cases}

    where :math:`N` = ``epochs`` (Dassl's ``T_max = MAX_EPOCH``). Past the last epoch the rate
    stays at its floor value 0 instead of rising again as PyTorch's periodic cosine would.

    Args:
      lr: base learning rate :math:`\eta_0` (CoOp 0.002, PromptSRC 0.0025).
      epochs: total number of epochs :math:`N`.
      iters_per_epoch: optimizer steps per epoch (``floor(n_train / batch)`` with drop_last).
      warmup_epochs: epochs at the constant warm-up rate (Dassl: 1; 0 disables warm-up).
      warmup_lr: the warm-up rate :math:`\eta_w` (Dassl: 1e-5).

    Returns:
      An optax schedule ``count -> lr`` (float32, jit-able).

    Example:
      >>> s = dassl_cosine(0.0025, epochs=20, iters_per_epoch=10)
      >>> [round(float(s(c)), 7) for c in (0, 9, 10, 90, 190)]   # epochs 1, 1, 2, 10, 20
      [1e-05, 1e-05, 0.0025, 0.0016363, 6.11e-05]
    """
    if epochs < 1 or iters_per_epoch < 1:
        raise ValueError(f"epochs ({epochs}) and iters_per_epoch ({iters_per_epoch}) must be >= 1")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")

    def schedule(count):
        epoch = epoch_of(jnp.asarray(count), iters_per_epoch)
        # The cosine count restarts after warm-up (WARMUP_RECOUNT): epoch W+1 is its step 0.
        t = jnp.clip(epoch - warmup_epochs - 1, 0, epochs).astype(jnp.float32)
        cosine = lr * 0.5 * (1.0 + jnp.cos(math.pi * t / epochs))
        return jnp.where(epoch <= warmup_epochs, jnp.float32(warmup_lr), cosine).astype(jnp.float32)

    return schedule
