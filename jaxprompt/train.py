"""The generic trainer: one jitted step for any method, and ``fit`` around it.

Pieces, each usable on its own::

    tx = make_optimizer(0.002, epochs=50, iters_per_epoch=len(train) // 32)   # CoOp / Dassl
    state = init_train_state(method, tx, key, clip, task)
    step = jax.jit(make_train_step(method, tx), donate_argnums=0)
    state, metrics = step(state, clip, task, batch, key)

or all of it, with sharding, logging, checkpoints and automatic resume::

    state = fit(method, tx, clip, task, batches, steps=n, key=key, mesh=make_mesh(),
                workdir="runs/coop", iters_per_epoch=ipe, lr_schedule=make_schedule(...))

Gradients are taken with respect to the prompt only (argument 0 of ``method.loss``): CLIP is an
argument of the step, never given to the optimizer and never a closure constant.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import schedules
from jaxprompt import sharding as shard_lib
from jaxprompt.methods.base import Batch, Metrics, Prompt, PromptMethod

__all__ = [
    "TrainState",
    "fit",
    "init_train_state",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
]

PyTree = Any
Augment = Callable[[Batch, jax.Array], Batch]

log = logging.getLogger(__name__)


class TrainState(NamedTuple):
    """What training updates: the step count, the prompt and the optimizer state.

    Attributes:
      step: int32 scalar, number of optimizer steps done.
      prompt: the method's trainable pytree (float32 leaves).
      opt_state: the optax state of ``tx``.
    """

    step: jax.Array
    prompt: Prompt
    opt_state: optax.OptState


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------


def make_schedule(
    lr: float,
    *,
    epochs: int | None = None,
    iters_per_epoch: int | None = None,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
) -> optax.Schedule:
    """The Dassl per-epoch schedule when ``epochs`` and ``iters_per_epoch`` are given, else ``lr``.

    See :func:`jaxprompt.schedules.dassl_cosine` for the formula.

    Args:
      lr: base learning rate.
      epochs: total epochs (enables the warm-up + cosine recipe together with
        ``iters_per_epoch``).
      iters_per_epoch: optimizer steps per epoch.
      warmup_epochs: constant warm-up epochs.
      warmup_lr: the warm-up rate.

    Returns:
      An optax schedule ``count -> lr``.
    """
    if epochs is None and iters_per_epoch is None:
        return optax.constant_schedule(lr)
    if epochs is None or iters_per_epoch is None:
        raise ValueError("give both epochs and iters_per_epoch for the per-epoch schedule")
    return schedules.dassl_cosine(
        lr,
        epochs=epochs,
        iters_per_epoch=iters_per_epoch,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
    )


def make_optimizer(
    lr: float | optax.Schedule = 0.002,
    *,
    epochs: int | None = None,
    iters_per_epoch: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
    group_lrs: Mapping[str, float | optax.Schedule] | None = None,
) -> optax.GradientTransformation:
    """SGD with momentum and COUPLED weight decay on a per-epoch schedule (Dassl's recipe).

    PyTorch's ``SGD(weight_decay=wd)`` adds ``wd * param`` to the gradient before the momentum
    buffer, so the decay is ``optax.add_decayed_weights`` chained BEFORE ``optax.sgd`` (not
    AdamW-style decoupled decay). CoOp: ``lr=0.002`` with ``epochs`` by shots; PromptSRC and
    IVLP: ``lr=0.0025``; both with ``momentum=0.9, weight_decay=5e-4`` and one warm-up epoch at
    1e-5.

    Args:
      lr: base learning rate, or a ready optax schedule (then ``epochs`` and the warm-up
        arguments are ignored).
      epochs: total epochs; with ``iters_per_epoch`` enables the per-epoch warm-up + cosine.
      iters_per_epoch: optimizer steps per epoch.
      momentum: SGD momentum (dampening 0).
      weight_decay: coupled L2 coefficient, applied to every trainable leaf.
      nesterov: Nesterov momentum (POUF uses it).
      warmup_epochs: epochs at the constant ``warmup_lr``.
      warmup_lr: the warm-up rate.
      group_lrs: per top-level prompt group learning rates, e.g. POUF's
        ``{"logit_scale": 5e-7}``; groups not listed use ``lr``. A float runs the same recipe
        with that base rate (the warm-up rate scaled in proportion); a callable is used as that
        group's schedule. Implemented with ``optax.partition``.

    Returns:
      An optax transformation over the prompt pytree (a dict of named groups).
    """

    def sgd(schedule):
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov),
        )

    def recipe(base: float | optax.Schedule, warm: float) -> optax.Schedule:
        if callable(base):
            return base
        return make_schedule(
            base,
            epochs=epochs,
            iters_per_epoch=iters_per_epoch,
            warmup_epochs=warmup_epochs,
            warmup_lr=warm,
        )

    main = recipe(lr, warmup_lr)
    if not group_lrs:
        return sgd(main)
    if callable(lr) and any(not callable(v) for v in group_lrs.values()):
        raise ValueError("with a custom schedule as lr, give every group_lrs entry a schedule too")
    transforms = {"__default__": sgd(main)}
    for group, value in group_lrs.items():
        warm = warmup_lr if callable(value) else warmup_lr * float(value) / float(lr)
        transforms[group] = sgd(recipe(value, warm))

    def labels(params):
        if not isinstance(params, Mapping):
            raise TypeError("group_lrs needs a prompt that is a dict of named groups")
        return {
            k: jax.tree.map(lambda _, k=k: k if k in group_lrs else "__default__", v)
            for k, v in params.items()
        }

    return optax.partition(transforms, labels)


# ------------------------------------------------------------------------------------------------
# State and step
# ------------------------------------------------------------------------------------------------


def init_train_state(
    method: PromptMethod,
    tx: optax.GradientTransformation,
    key: jax.Array,
    clip: Any,
    task: Any,
) -> TrainState:
    """A fresh :class:`TrainState`: ``method.init`` and ``tx.init`` at step 0.

    Args:
      method: the prompt method.
      tx: the optimizer.
      key: PRNG key of the prompt initialisation.
      clip: the frozen :class:`~jaxprompt.clip.Clip`.
      task: the training :class:`~jaxprompt.clip.Task`.

    Returns:
      ``TrainState(step=0, prompt, opt_state)``.
    """
    prompt = method.init(key, clip, task)
    return TrainState(jnp.zeros((), jnp.int32), prompt, tx.init(prompt))


def make_train_step(
    method: PromptMethod,
    tx: optax.GradientTransformation,
    *,
    augment: Augment | None = None,
) -> Callable[[TrainState, Any, Any, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """One optimizer step as a pure function (jit it; donate the state).

    The key is folded with ``state.step``, so the randomness of step ``t`` is the same however
    the run is split into processes, resumed or batched.

    Args:
      method: the prompt method.
      tx: the optimizer.
      augment: optional on-device augmentation ``augment(batch, key) -> batch`` applied
        before the loss (e.g. ``jaxprompt.data.augment.train_augment``).

    Returns:
      ``step(state, clip, task, batch, key) -> (state, metrics)``; metrics are the method's
      terms plus ``loss`` and ``grad_norm``, float32 scalars averaged over the global batch.
    """

    def step(state: TrainState, clip, task, batch: Batch, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        if augment is not None:
            aug_key, key = jax.random.split(key)
            batch = augment(batch, aug_key)
        # Argument 0 only: CLIP gets no gradient, so nothing has to be frozen or masked.
        (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
            state.prompt, clip, task, batch, key
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.prompt)
        prompt = optax.apply_updates(state.prompt, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        return TrainState(state.step + 1, prompt, opt_state), metrics

    return step


# ------------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------------


def _scalar(v: Any) -> Any:
    """JSON-able form of a metric: numbers (numpy, jax) as float, anything else unchanged."""
    if isinstance(v, int | float | np.number | np.ndarray | jax.Array) and np.size(v) == 1:
        return float(np.asarray(v))
    return v


def _format_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _MetricsWriter:
    """Writes each logged step to ``workdir/metrics.jsonl`` and TensorBoard (process 0 only).

    ``metrics.jsonl`` gets one JSON line per logged step. Object stores (``gs://``) cannot
    append to a file: there the text is kept in memory (read back first when resuming) and the
    whole file is rewritten at each logged step. TensorBoard event files go to
    ``workdir/tensorboard`` (``tensorboard --logdir WORKDIR``), written by tensorboardX, which
    needs no TensorFlow; on an object store they are written to a local temporary directory
    and copied up whole, at most every ``TB_UPLOAD_S`` seconds and at the end (a resumed run
    adds an event file; TensorBoard joins them).
    """

    TB_UPLOAD_S = 30.0

    def __init__(self, workdir: str | epath.PathLike | None):
        self._path = None
        self._text: str | None = None
        self._tb = None
        self._tb_local: str | None = None
        self._tb_remote: epath.Path | None = None
        self._uploaded = 0.0
        if workdir is not None and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._path = epath.Path(workdir) / "metrics.jsonl"
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if "://" in str(workdir):
                self._text = self._path.read_text() if self._path.exists() else ""
                self._tb_local = tempfile.mkdtemp(prefix="jaxprompt-tb-")
                self._tb_remote = epath.Path(workdir) / "tensorboard"
                self._tb = SummaryWriter(self._tb_local)
            else:
                self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"))

    def start_at(self, step: int) -> None:
        """Drops the records past ``step``: a run resumed there (or restarted at 0) logs those
        steps again, and ``metrics.jsonl`` must not hold any step twice."""
        if self._path is None or not self._path.exists():
            return
        text = self._text if self._text is not None else self._path.read_text()
        lines = text.splitlines(keepends=True)
        steps = [_record_step(ln) for ln in lines]
        kept = [ln for ln, s in zip(lines, steps, strict=True) if s is not None and s <= step]
        if len(kept) == len(lines):
            return
        text = "".join(kept)
        if self._text is not None:
            self._text = text
        tmp = self._path.parent / (self._path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(self._path)

    def write(self, record: Mapping[str, Any]) -> None:
        if self._path is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, global_step=int(record["step"]))
        if self._text is not None:
            self._text += line
            self._path.write_text(self._text)
            if time.time() - self._uploaded >= self.TB_UPLOAD_S:
                self._upload_tb()
            return
        with self._path.open("a") as f:
            f.write(line)

    def _upload_tb(self) -> None:
        if self._tb_local is None or self._tb_remote is None or self._tb is None:
            return
        self._tb.flush()
        self._tb_remote.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(self._tb_local)):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                (self._tb_remote / name).write_bytes(f.read())
        self._uploaded = time.time()

    def close(self) -> None:
        if self._tb is not None:
            self._upload_tb()
            self._tb.close()
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)


def _record_step(line: str) -> int | None:
    """A metrics line's step; None for a line cut short by a kill (it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _default_meta(method: PromptMethod, clip: Any, task: Any) -> dict[str, Any]:
    spec = getattr(clip, "spec", None)
    return {
        "method": method.name,
        # Not "config": that key is left for the caller's resolved run config.
        "method_config": dict(method.config),
        "model": getattr(spec, "name", None),
        "classnames": list(getattr(task, "names", ())),
    }


def _due(done: int, every: int | None, steps: int) -> bool:
    """Whether a periodic action (evaluation, checkpoint) falls on step ``done``; the last step
    has its own (the final evaluation and checkpoint)."""
    return bool(every) and done % every == 0 and done < steps


def _resume(
    workdir: str | epath.PathLike,
    state: TrainState,
    agg_state: Any,
    iterator: Iterator,
    *,
    is_main: bool,
) -> tuple[TrainState, Any, int]:
    """The checkpoint policy's read side: ``(state, agg_state, start)`` from the newest
    readable checkpoint in ``workdir`` (an unreadable newest one falls back to the previous,
    with a warning: :func:`jaxprompt.checkpoint.restore`), the iterator repositioned; the
    arguments unchanged and ``start = 0`` when there is none."""
    # Whether to resume, and from which step at most, is decided once, by process 0: hosts
    # looking at the shared directory at different moments could otherwise disagree (one sees
    # the checkpoint directory another has just created) and then pass different barriers.
    # Every host then reads (orbax's reads are collective) the newest readable checkpoint up
    # to that step.
    found = shard_lib.decide_once(lambda: ckpt_lib.latest_step(workdir))
    if found is None:
        return state, agg_state, 0
    restored = ckpt_lib.restore(
        workdir, state, max_step=found, extra_like=agg_state if agg_state is not None else None
    )
    state, _, data_state = restored[:3]
    if agg_state is not None:
        agg_state = restored[3]
    start = int(state.step)
    if hasattr(iterator, "set_state") and data_state is not None:
        iterator.set_state(data_state)
    elif start:
        log.warning(
            "resuming at step %d with an iterator that has no set_state(): batches restart "
            "from the iterator's current position, not where the run stopped",
            start,
        )
    kept = ""
    if start < found:
        # The newer checkpoints were unreadable (restore warned): out of the way before this
        # run saves those steps again, else they would keep the steps and readers would fall
        # back past the fresh ones.
        if is_main:
            moved = ckpt_lib.set_aside(workdir, after=start)
            if moved:
                kept = f" (the unreadable newer ones are kept in {os.path.dirname(moved[0])})"
        shard_lib.barrier("jaxprompt_set_aside")
    if is_main:
        log.info("resumed from %s at step %d%s", ckpt_lib.checkpoint_dir(workdir), start, kept)
    return state, agg_state, start


class _Progress:
    """The training log: every ``log_every`` steps (and the last), the mean of the step metrics
    since the previous line, the rates and ``lr``, written to ``metrics.jsonl`` and as a
    progress line with an ETA.

    Rates count the steps after a run's first: the first one compiles (seconds to minutes) and
    would make the first line's rate and ETA wrong by that much; it gets its own line.
    """

    def __init__(
        self,
        steps: int,
        log_every: int,
        writer: _MetricsWriter,
        *,
        lr_schedule: optax.Schedule | None = None,
        is_main: bool = True,
    ):
        self.steps, self.log_every, self.writer = steps, log_every, writer
        self.lr_schedule, self.is_main = lr_schedule, is_main
        self.window: list[Metrics] = []
        self.examples, self.timed, self.first = 0, 0, True
        self.t0 = time.perf_counter()

    def add(self, done: int, metrics: Metrics, n_batch: int) -> None:
        """Counts step ``done`` (its metrics and global batch size)."""
        self.window.append(metrics)
        if self.first:
            jax.block_until_ready(metrics)
            if self.is_main:
                log.info(
                    "compiled and ran step %d in %s",
                    done,
                    _format_eta(time.perf_counter() - self.t0),
                )
            self.first, self.t0 = False, time.perf_counter()
        else:
            self.examples, self.timed = self.examples + n_batch, self.timed + 1

    def maybe_log(self, done: int) -> dict[str, float] | None:
        """Writes the line of step ``done`` if one is due; returns its record."""
        if done % self.log_every and done != self.steps:
            return None
        host = jax.device_get(self.window)
        record = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        record["steps_per_sec"] = self.timed / elapsed
        record["examples_per_sec"] = self.examples / elapsed
        if self.lr_schedule is not None:
            record["lr"] = float(self.lr_schedule(done - 1))  # rate used by this step
        self.writer.write({"step": done, **record})
        if not np.isfinite(record.get("loss", 0.0)):
            log.warning("non-finite loss %s at step %d", record["loss"], done)
        if self.is_main:
            rate = record["steps_per_sec"]
            eta = (self.steps - done) / rate if rate > 0 else float("nan")
            terms = " ".join(
                f"{k} {v:.4g}"
                for k, v in sorted(record.items())
                if k not in ("steps_per_sec", "examples_per_sec")
            )
            log.info(
                "step %d/%d %s | %.1f ex/s %.2f it/s eta %s",
                done,
                self.steps,
                terms,
                record["examples_per_sec"],
                record["steps_per_sec"],
                _format_eta(eta),
            )
        self.window, self.examples, self.timed = [], 0, 0
        self.t0 = time.perf_counter()
        return record


def fit(
    method: PromptMethod,
    tx: optax.GradientTransformation,
    clip: Any,
    task: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    steps: int,
    key: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    workdir: str | epath.PathLike | None = None,
    log_every: int = 50,
    eval_fn: Callable[[Prompt, int], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    aggregator: Any = None,
    iters_per_epoch: int | None = None,
    checkpoint_every: int | None = None,
    keep: int = ckpt_lib.DEFAULT_KEEP,
    meta: Mapping[str, Any] | None = None,
    lr_schedule: optax.Schedule | None = None,
    augment: Augment | None = None,
    async_checkpoints: bool = True,
) -> TrainState:
    """Trains ``method`` for ``steps`` optimizer steps, resuming from ``workdir`` if possible.

    Per step: the host-local batch from ``batches`` becomes a global array sharded over
    ``data``; the prompt, optimizer state, class tokens and (unless ``mesh`` has ``model > 1``)
    CLIP are replicated; the jitted step donates the state.

    Resume: if ``workdir`` holds a checkpoint, training continues from the newest readable
    one. If the iterator has ``get_state()`` / ``set_state()`` (grain iterators, the
    ``jaxprompt.data`` iterators), its position is saved with every checkpoint and restored, so
    a resumed run is bit-identical (on CPU) to an uninterrupted one: the step keys are
    ``fold_in(key, step)``. A plain iterator cannot be repositioned: after a resume it is read
    from wherever the new iterator starts (for a fresh epoch iterator, the start of an epoch),
    so the batches differ from those of an uninterrupted run.

    Aggregation: with ``aggregator`` (an ``(init, update, result)`` triple such as
    :func:`jaxprompt.gpa.gaussian_aggregation`) and ``iters_per_epoch``,
    ``agg.update(agg_state, prompt, epoch)`` runs after the last step of every epoch (1-indexed)
    and the returned (and finally saved) prompt is ``agg.result(agg_state)``; the aggregator's
    state is checkpointed with the run. The aggregate is saved in the final checkpoint beside
    the training state (``checkpoint.load_prompt`` returns it); training never continues from
    it.

    Outputs in ``workdir``: ``metrics.jsonl`` (one line per logged step: ``step``, ``lr`` if
    ``lr_schedule`` is given, the averaged loss terms, ``examples_per_sec``,
    ``steps_per_sec``; and eval results under ``eval/<name>``), checkpoints every
    ``checkpoint_every`` steps and at the end. After a resume, the lines logged past the
    restored checkpoint are dropped (the steps are run and logged again): each step once.

    Args:
      method: the prompt method.
      tx: the optimizer (e.g. :func:`make_optimizer`).
      clip: the frozen CLIP.
      task: the training class set.
      batches: iterator of host-local numpy batches (``{"image", "label"}``, leading size
        divisible by this host's data devices).
      steps: total optimizer steps of the run (not the steps left).
      key: PRNG key; split into the prompt-initialisation key and the step key.
      mesh: device mesh (default :func:`jaxprompt.sharding.make_mesh`, all devices on data).
      workdir: run directory for metrics and checkpoints (``None``: neither).
      log_every: steps between metric lines and progress messages.
      eval_fn: ``eval_fn(prompt, step) -> {name: value}``, called every ``eval_every`` steps
        and at the end (with the aggregated prompt if there is an aggregator).
      eval_every: steps between evaluations (``None``: only at the end).
      aggregator: optional ``(init, update, result)`` aggregator; needs ``iters_per_epoch``.
      iters_per_epoch: steps per epoch (epoch ends for the aggregator, default checkpoint
        interval).
      checkpoint_every: steps between checkpoints (default: ``iters_per_epoch``, else 1000).
      keep: number of newest checkpoints retained.
      meta: extra JSON meta merged into the default (``method``, ``method_config`` (the
        constructor kwargs), ``model``, ``classnames``); e.g. the resolved ``config`` and
        few-shot ids.
      lr_schedule: the optimizer's schedule, only to log ``lr``.
      augment: on-device augmentation ``augment(batch, key) -> batch``.
      async_checkpoints: write checkpoints in the background.

    Returns:
      The final :class:`TrainState` (its prompt is the aggregate when ``aggregator`` is set).
    """
    if aggregator is not None and not iters_per_epoch:
        raise ValueError("an aggregator needs iters_per_epoch to know where epochs end")
    mesh = shard_lib.make_mesh() if mesh is None else mesh
    rep = shard_lib.replicated(mesh)
    is_main = jax.process_index() == 0
    checkpoint_every = checkpoint_every or iters_per_epoch or 1000
    init_key, step_key = jax.random.split(key)

    # ---------------------------------------------------------------- placement
    clip = shard_lib.shard_clip(clip, mesh)
    task = shard_lib.replicate(task, mesh)
    step_key = shard_lib.replicate(step_key, mesh)
    state = shard_lib.replicate(init_train_state(method, tx, init_key, clip, task), mesh)
    agg_state = None
    if aggregator is not None:
        agg_state = shard_lib.replicate(aggregator.init(state.prompt), mesh)

    # ---------------------------------------------------------------- resume
    run_meta = {**_default_meta(method, clip, task), **dict(meta or {})}
    iterator: Iterator = iter(batches)
    start = 0
    if workdir is not None:
        state, agg_state, start = _resume(workdir, state, agg_state, iterator, is_main=is_main)

    # ---------------------------------------------------------------- compile
    state_sh = jax.tree.map(lambda _: rep, state)
    train_step = jax.jit(
        make_train_step(method, tx, augment=augment),
        in_shardings=(
            state_sh,
            shard_lib.clip_shardings(clip, mesh),
            jax.tree.map(lambda _: rep, task),
            shard_lib.batch_sharding(mesh),
            rep,
        ),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    agg_update = jax.jit(aggregator.update) if aggregator is not None else None

    checkpointer = None
    if workdir is not None:
        checkpointer = ckpt_lib.Checkpointer(workdir, keep=keep, async_save=async_checkpoints)
    writer = _MetricsWriter(workdir)
    writer.start_at(start)

    def data_position():
        return iterator.get_state() if hasattr(iterator, "get_state") else None

    def run_eval(prompt, step):
        results = dict(eval_fn(prompt, step))
        if is_main:
            log.info("step %d eval %s", step, json.dumps(results, sort_keys=True))
        writer.write({"step": step, **{f"eval/{k}": _scalar(v) for k, v in results.items()}})

    # ---------------------------------------------------------------- loop
    progress = _Progress(steps, log_every, writer, lr_schedule=lr_schedule, is_main=is_main)
    try:
        for s in range(start, steps):
            try:
                local = next(iterator)
            except StopIteration:
                raise ValueError(
                    f"the batch iterator ran out at step {s} of {steps}; give an endless "
                    "(repeating) iterator or fewer steps"
                ) from None
            batch = shard_lib.put_batch(local, mesh)
            state, metrics = train_step(state, clip, task, batch, step_key)
            done = s + 1
            progress.add(done, metrics, int(jax.tree.leaves(batch)[0].shape[0]))
            if aggregator is not None and done % iters_per_epoch == 0:
                epoch = jnp.asarray(done // iters_per_epoch, jnp.int32)
                agg_state = agg_update(agg_state, state.prompt, epoch)
            progress.maybe_log(done)
            if eval_fn is not None and _due(done, eval_every, steps):
                run_eval(state.prompt, done)
            if checkpointer is not None and _due(done, checkpoint_every, steps):
                checkpointer.save(
                    done,
                    state,
                    meta=run_meta,
                    data_state=data_position(),
                    extra=agg_state,
                )

        # ------------------------------------------------------------ final
        final_meta = dict(run_meta)
        eval_prompt = state.prompt
        if aggregator is not None:
            # Formed only at the end and saved beside (not instead of) the training state, so
            # a run extended later continues from its last step, not from the aggregate.
            eval_prompt = jax.jit(aggregator.result)(agg_state)
            final_meta["aggregated"] = True
        if eval_fn is not None:
            run_eval(eval_prompt, steps)
        if checkpointer is not None and start < steps:
            checkpointer.save(
                steps,
                state,
                meta=final_meta,
                data_state=data_position(),
                extra=agg_state,
                eval_prompt=eval_prompt if aggregator is not None else None,
            )
        state = state._replace(prompt=eval_prompt)
    finally:
        writer.close()
        if checkpointer is not None:
            checkpointer.close()
    return state
