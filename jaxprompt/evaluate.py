"""Evaluation: exact top-1 over sharded, padded batches; seed summaries and paper-style tables.

The step returns SUMS (correct, count, loss), never means, so accumulating over batches and
devices is exact whatever the batch size or padding: a padded example has ``mask == False``
and contributes nothing. Methods with ``encode_classes`` get their class embeddings computed
once per class set, then only the image side runs per batch.

Example::

    acc = evaluate(method, prompt, clip, task, eval_batches, mesh=make_mesh())
    acc["top1"], acc["n"]                                  # percent, examples counted
    hm = harmonic_mean(base["top1"], new["top1"])
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxprompt import sharding as shard_lib
from jaxprompt.methods.base import Batch, Prompt, PromptMethod

__all__ = [
    "evaluate",
    "harmonic_mean",
    "make_eval_step",
    "markdown_table",
    "summarize_seeds",
    "write_results",
]

Sums = dict[str, jax.Array]


def _sums(logits: jax.Array, batch: Batch) -> Sums:
    """Masked correct / count / cross-entropy sums of one batch of logits [B, C]."""
    labels = jnp.asarray(batch["label"], jnp.int32)
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask, bool)
    # Padding rows may carry label -1: clamp for the gather, the mask removes them anyway.
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels) & mask
    w = mask.astype(jnp.float32)
    return {
        "correct": jnp.sum(correct.astype(jnp.int32)),
        "count": jnp.sum(mask.astype(jnp.int32)),
        "loss_sum": jnp.sum(nll * w),
    }


def make_eval_step(method: PromptMethod) -> Callable[[Prompt, Any, Any, Batch, Any], Sums]:
    """Per-batch evaluation as a pure function returning sums.

    Args:
      method: the prompt method.

    Returns:
      ``eval_step(prompt, clip, task, batch, key) -> {"correct", "count", "loss_sum"}``:
      int32 correct predictions and counted examples, float32 summed cross-entropy, over the
      examples with ``batch["mask"]`` true (all when there is no mask). ``key`` is passed to
      ``method.logits`` (for Monte Carlo methods; may be ``None``).
    """

    def eval_step(prompt, clip, task, batch, key):
        return _sums(method.logits(prompt, clip, task, batch["image"], key=key), batch)

    return eval_step


# The jitted functions are cached per method function, so evaluating every few hundred steps
# (or base, then new, then again) reuses compilations instead of re-tracing fresh closures.
@functools.lru_cache(maxsize=64)
def _jitted_encode(encode_classes: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    return jax.jit(encode_classes)


@functools.lru_cache(maxsize=64)
def _jitted_classify(classify: Callable[..., jax.Array]) -> Callable[..., Sums]:
    def step(prompt, clip, classes, batch):
        return _sums(classify(prompt, clip, classes, batch["image"]), batch)

    return jax.jit(step)


@functools.lru_cache(maxsize=64)
def _jitted_logits(logits: Callable[..., jax.Array]) -> Callable[..., Sums]:
    def step(prompt, clip, task, batch, key):
        return _sums(logits(prompt, clip, task, batch["image"], key=key), batch)

    return jax.jit(step)


def _pad_to(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a short batch to ``size`` rows with ``mask=False`` (fixed shapes: no recompiles)."""
    n = len(batch["label"])
    mask = np.asarray(batch.get("mask", np.ones(n, bool)), bool)
    out = {k: np.asarray(v) for k, v in batch.items()}
    out["mask"] = mask
    if n == size:
        return out
    pad = size - n
    return {
        k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
        if k != "label"
        else np.concatenate([v, np.full((pad,), -1, v.dtype)])
        for k, v in out.items()
    }


def evaluate(
    method: PromptMethod,
    prompt: Prompt,
    clip: Any,
    task: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    mesh: jax.sharding.Mesh | None = None,
    key: jax.Array | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of ``prompt`` on ``batches`` over the classes of ``task``.

    With ``method.encode_classes``, the class embeddings are computed once and each batch
    runs only ``method.classify``; otherwise ``method.logits`` runs per batch (with
    ``fold_in(key, batch_index)`` for methods that sample). A batch shorter than the first is
    padded (masked) to its size, and every batch is padded to a multiple of the data-parallel
    device count, so shapes stay fixed and nothing recompiles.

    Args:
      method: the prompt method.
      prompt: its trained prompt.
      clip: the frozen CLIP.
      task: the evaluated class set (may differ from the training one).
      batches: host-local numpy batches ``{"image", "label"[, "mask"]}``.
      mesh: device mesh; batches are sharded over ``data`` (default: all devices).
      key: PRNG key for methods that sample at test time.

    Returns:
      ``{"top1": percent, "n": examples counted, "loss": mean cross-entropy}``.
    """
    mesh = shard_lib.make_mesh() if mesh is None else mesh
    ndata = mesh.shape["data"]
    clip = shard_lib.shard_clip(clip, mesh)
    task = shard_lib.replicate(task, mesh)
    prompt = shard_lib.replicate(prompt, mesh)
    key = jax.random.key(0) if key is None else key

    if method.encode_classes is not None and method.classify is not None:
        classes = _jitted_encode(method.encode_classes)(prompt, clip, task)
        step = _jitted_classify(method.classify)

        def run(batch, i):
            del i
            return step(prompt, clip, classes, batch)

    else:
        step = _jitted_logits(method.logits)

        def run(batch, i):
            return step(prompt, clip, task, batch, jax.random.fold_in(key, i))

    totals = None
    size = 0
    for i, local in enumerate(batches):
        # Pad to the largest batch so far, rounded up to the data devices: the (usually
        # shorter) last batch then reuses the compiled step.
        size = max(size, -(-len(local["label"]) // ndata) * ndata)
        sums = run(shard_lib.put_batch(_pad_to(local, size), mesh), i)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluate got no batches")
    host = jax.device_get(totals)
    count = int(host["count"])
    return {
        "top1": 100.0 * int(host["correct"]) / max(count, 1),
        "n": count,
        "loss": float(host["loss_sum"]) / max(count, 1),
    }


def harmonic_mean(base: float, new: float) -> float:
    """Harmonic mean of base and new accuracy, ``2 b n / (b + n)`` (0 when both are 0).

    Example:
      >>> round(harmonic_mean(80.0, 70.0), 4)
      74.6667
    """
    base, new = float(base), float(new)
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def summarize_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and population standard deviation (``np.std``) of each numeric key over seeds.

    When ``base`` and ``new`` are both present, ``hm``'s mean is recomputed as the harmonic
    mean of the MEAN base and new accuracies (as the papers report it), while its std is that
    of the per-seed HMs.

    Args:
      results: one dict per seed, e.g. ``{"base": 82.1, "new": 75.3, "hm": 78.5}``.

    Returns:
      ``{key: {"mean": float, "std": float, "n": seeds}}`` for keys numeric in every result.
    """
    if not results:
        raise ValueError("summarize_seeds needs at least one result")
    keys = [
        k
        for k in results[0]
        if all(
            isinstance(r.get(k), int | float | np.number) and not isinstance(r.get(k), bool)
            for r in results
        )
    ]
    out = {}
    for k in keys:
        values = np.asarray([float(r[k]) for r in results], np.float64)
        out[k] = {"mean": float(values.mean()), "std": float(values.std()), "n": len(values)}
    if "base" in out and "new" in out:
        hm_seeds = [harmonic_mean(r["base"], r["new"]) for r in results]
        out["hm"] = {
            "mean": harmonic_mean(out["base"]["mean"], out["new"]["mean"]),
            "std": float(np.std(hm_seeds)),
            "n": len(results),
        }
    return out


def write_results(workdir: str | epath.PathLike, results: Mapping[str, Any]) -> str:
    """Writes ``workdir/results.json`` (sorted keys; temporary file then rename).

    Args:
      workdir: the run directory (created if needed).
      results: JSON-able dict (accuracies in percent, model id, dataset, seed, steps, ...).

    Returns:
      The path written.
    """
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    tmp = directory / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    tmp.rename(path)
    return str(path)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _value(x: Any) -> float:
    return float(x["mean"]) if isinstance(x, Mapping) else float(x)


def markdown_table(
    rows: Mapping[str, Mapping[str, Any]],
    *,
    columns: Sequence[str] = ("base", "new", "hm"),
    average: bool = True,
    digits: int = 2,
) -> str:
    """A base / new / HM table in the papers' layout, as Markdown.

    Args:
      rows: ``{dataset: {"base": 82.1, "new": 75.3, ...}}``; a value may also be a
        :func:`summarize_seeds` entry ``{"mean", "std"}`` (its mean is shown).
      columns: which keys to show, in order.
      average: add an ``Average`` row: column means, with ``hm`` recomputed from the average
        base and new (as the papers do).
      digits: decimals shown.

    Returns:
      The table as a string (header, separator, one line per row).

    Example:
      >>> print(markdown_table({"dtd": {"base": 80.0, "new": 60.0, "hm": 68.57}}, average=False))
      | Dataset | Base | New | HM |
      |---|---:|---:|---:|
      | dtd | 80.00 | 60.00 | 68.57 |
    """
    titles = {"base": "Base", "new": "New", "hm": "HM", "top1": "Top-1"}
    header = "| Dataset | " + " | ".join(titles.get(c, c) for c in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]

    def cell(v: Any) -> str:
        return "-" if v is None else f"{_value(v):.{digits}f}"

    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    if average and rows:
        avg: dict[str, float | None] = {}
        for c in columns:
            values = [_value(r[c]) for r in rows.values() if r.get(c) is not None]
            avg[c] = float(np.mean(values)) if values else None
        if "hm" in avg and avg.get("base") is not None and avg.get("new") is not None:
            avg["hm"] = harmonic_mean(avg["base"], avg["new"])
        lines.append("| Average | " + " | ".join(cell(avg[c]) for c in columns) + " |")
    return "\n".join(lines)
