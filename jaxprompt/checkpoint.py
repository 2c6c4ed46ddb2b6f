"""Checkpoints: orbax for run directories, one portable file for sharing a learned prompt.

A run directory ``WORKDIR`` keeps its checkpoints in ``WORKDIR/checkpoints/<step>/`` (orbax
``CheckpointManager``, asynchronous saves, the ``keep`` newest retained). Each holds three items:

* ``state``: the training state (step, prompt, optimizer state, and optionally an ``extra`` tree
  such as an aggregator's state) as a FLAT dict ``{"prompt.ctx": array, ...}`` of host numpy
  arrays. Prompts are KB to MB, so gathering them to the host costs nothing, and a flat dict of
  numpy arrays restores on any machine without the device layout or the Python classes that
  built it.
* ``meta``: a free-form JSON dict (method name and kwargs, model id, class names, resolved
  config, few-shot ids), from which :func:`load_prompt` users rebuild the method.
* ``data``: the input iterator's position (``get_state()``), so a resumed run reads exactly the
  batches an uninterrupted run would have read.

Reading never deletes or rewrites anything. A latest checkpoint that cannot be read (a killed
save, a truncated file) is skipped with a :class:`CheckpointFallbackWarning` and the previous one
is used; a run resumed that way moves the unreadable ones aside (:func:`set_aside`) before it
saves again. A checkpoint whose arrays do not fit the expected structure raises
:class:`CheckpointMismatchError` with a one-line message naming the first differences and the fix.

Example::

    save(workdir, state, meta={"method": method.name, "method_config": dict(method.config)})
    state, meta, data_state = restore(workdir, like=state)
    prompt, meta = load_prompt(workdir)          # on another machine, with no config
    export(workdir, "coop_imagenet.npz")         # one file: weights + JSON meta
    prompt, meta = load_exported("coop_imagenet.npz")

The ``.npz`` export is the older portable format; :mod:`jaxprompt.share` writes the
``.safetensors`` one (with the backbone's fingerprint) and reads both.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

__all__ = [
    "DEFAULT_KEEP",
    "CheckpointFallbackWarning",
    "CheckpointMismatchError",
    "CheckpointUnreadableError",
    "Checkpointer",
    "checkpoint_dir",
    "export",
    "flatten",
    "latest_step",
    "load_exported",
    "load_prompt",
    "restore",
    "save",
    "save_exported",
    "set_aside",
    "unflatten_dict",
]

PyTree = Any
DEFAULT_KEEP = 3
FORMAT_VERSION = 1
_ITEMS = ("state", "meta", "data")
_EXTRA = "extra"  # prefix of the optional extra tree's keys in the flat state
_EVAL = "eval_prompt"  # prefix of the prompt to evaluate when it differs (an aggregate)
_SIDE = (_EXTRA, _EVAL)  # prefixes that are not part of the state itself
_META_KEY = "__meta__"  # entry holding the JSON meta in an exported .npz

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the structure the caller expects (one-line message)."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint could not be read and an older one was used instead."""


class CheckpointUnreadableError(RuntimeError):
    """No checkpoint of a run directory can be read (one-line message naming the fix)."""


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    """Where a run directory keeps its checkpoints: ``workdir/checkpoints`` (made absolute:
    orbax rejects relative paths, and ``--workdir runs/demo`` is how users write them)."""
    path = epath.Path(workdir)
    if "://" not in str(workdir):
        path = epath.Path(os.path.abspath(os.fspath(path)))
    return path / "checkpoints"


# ------------------------------------------------------------------------------------------------
# Flat dicts of host arrays
# ------------------------------------------------------------------------------------------------


def _key_name(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            # Every host holds the whole value: read the local copy, no communication.
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _flat_paths(tree: PyTree, prefix: str = "") -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = []
    for path, leaf in leaves:
        name = ".".join(_key_name(e) for e in path)
        out.append((f"{prefix}.{name}" if prefix else name, leaf))
    return out


def flatten(tree: PyTree, prefix: str = "") -> dict[str, np.ndarray]:
    """Flattens a pytree to ``{"a.b.c": host numpy array}`` (dict keys, indices, field names).

    Args:
      tree: any pytree of arrays (jax arrays are copied to the host).
      prefix: prepended to every key with a dot.

    Returns:
      A flat dict, empty for a tree without leaves.
    """
    return {k: _to_host(v) for k, v in _flat_paths(tree, prefix)}


def unflatten_dict(flat: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rebuilds nested dicts from dotted keys (inverse of :func:`flatten` for dict pytrees).

    Args:
      flat: ``{"a.b": x, ...}``.
      prefix: only keys starting with ``prefix + "."`` are used, with the prefix removed.

    Returns:
      ``{"a": {"b": x}}``; ``{}`` when no key matches.
    """
    out: dict[str, Any] = {}
    for key, value in sorted(flat.items()):
        if prefix:
            if not key.startswith(prefix + "."):
                continue
            key = key[len(prefix) + 1 :]
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, set | frozenset):
        return sorted(x)
    raise TypeError(f"meta value of type {type(x).__name__} is not JSON-serialisable: {x!r}")


def _methods_to_meta(obj: Any) -> Any:
    """Replaces nested methods (POUF's and TPT's ``base``) by their name and kwargs."""
    if (
        isinstance(obj, tuple)
        and hasattr(obj, "_fields")
        and {"name", "config"} <= set(obj._fields)
    ):
        return {"method": obj.name, "method_config": _methods_to_meta(dict(obj.config))}
    if isinstance(obj, Mapping):
        return {str(k): _methods_to_meta(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_methods_to_meta(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(_methods_to_meta(obj), default=_json_default))


def _encode_data_state(data_state: Any) -> dict[str, Any]:
    # grain's DatasetIterator gives a JSON-able dict; its older DataLoader iterator gives bytes.
    if data_state is None:
        return {"kind": "none"}
    if isinstance(data_state, bytes | bytearray):
        return {"kind": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
    return {"kind": "json", "value": _jsonable(data_state)}


def _decode_data_state(item: Mapping[str, Any] | None) -> Any:
    if not item or item.get("kind") == "none":
        return None
    if item["kind"] == "bytes":
        return base64.b64decode(item["value"])
    return item["value"]


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


class Checkpointer:
    """An open checkpoint directory for one run: asynchronous saves, ``keep`` newest retained.

    ``fit`` keeps one open for the whole run so that saves overlap with training; call
    :meth:`close` (or use it as a context manager) to wait for the last save.

    Args:
      workdir: the run directory (local path or ``gs://...``).
      keep: number of newest checkpoints retained; older ones are removed after a new save
        completes (never by reading).
      async_save: write in a background thread (orbax); :meth:`wait` blocks until done.
    """

    def __init__(
        self, workdir: str | epath.PathLike, *, keep: int = DEFAULT_KEEP, async_save: bool = True
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def steps(self) -> list[int]:
        """The finished checkpoints' steps, ascending."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        meta: Mapping[str, Any],
        data_state: Any = None,
        extra: PyTree = None,
        eval_prompt: PyTree = None,
    ) -> bool:
        """Starts saving ``state`` as checkpoint ``step`` (returns before the write finishes).

        The arrays are copied to the host first, so the caller may donate or overwrite
        ``state`` right away. An existing checkpoint ``step`` is never overwritten: the save
        is skipped with a warning and ``False`` is returned.

        Args:
          step: the checkpoint's step number.
          state: the pytree to save (e.g. a :class:`~jaxprompt.train.TrainState`).
          meta: free-form JSON-able dict stored next to it.
          data_state: the input iterator's ``get_state()`` (a JSON-able value or bytes).
          extra: an optional second pytree (e.g. an aggregator's state), restored with
            ``restore(..., extra_like=...)``.
          eval_prompt: the prompt to evaluate and share when it is not ``state.prompt``
            (e.g. an aggregate of snapshots); :func:`load_prompt` returns it instead, while
            :func:`restore` keeps returning the training state.

        Returns:
          Whether a save was started.
        """
        step = int(step)
        if step in self._manager.all_steps():
            log.warning("checkpoint %d already exists in %s; not overwritten", step, self.directory)
            return False
        flat = flatten(state)
        if extra is not None:
            flat.update(flatten(extra, _EXTRA))
        if eval_prompt is not None:
            flat.update(flatten(eval_prompt, _EVAL))
        meta = {**_jsonable(dict(meta)), "step": step, "format_version": FORMAT_VERSION}
        # Orbax cannot write zero-size arrays (e.g. the deep prompts of depth 1); they carry no
        # values, and restore rebuilds them from the shapes of `like`.
        flat = {k: v for k, v in flat.items() if np.size(v) > 0}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flat),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
        )
        return bool(self._manager.save(step, args=args))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves have finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save(
    workdir: str | epath.PathLike,
    state: PyTree,
    *,
    meta: Mapping[str, Any],
    data_state: Any = None,
    extra: PyTree = None,
    step: int | None = None,
    keep: int = DEFAULT_KEEP,
) -> int:
    """Saves ``state`` into ``workdir/checkpoints`` and waits until it is on disk.

    Args:
      workdir: the run directory.
      state: pytree to save; ``state.step`` gives the checkpoint number unless ``step`` is set.
      meta: free-form JSON-able dict (method name and config, model id, class names, ...).
      data_state: the input iterator's ``get_state()``, if it has one.
      extra: an optional second pytree (e.g. an aggregator's state).
      step: checkpoint number (default ``int(state.step)``).
      keep: number of newest checkpoints retained.

    Returns:
      The checkpoint's step.
    """
    if step is None:
        step = int(_to_host(state.step))
    with Checkpointer(workdir, keep=keep, async_save=False) as ckpt:
        ckpt.save(step, state, meta=meta, data_state=data_state, extra=extra)
    return step


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences orbax's per-call notices (read-only manager, registry set-up) while reading."""
    absl_logger = absl_logging.get_absl_logger()
    level = absl_logger.level
    # The standard library's ERROR (40): absl's own constant (absl_logging.ERROR == -2) as a
    # Python logger level enabled every message, the ~540 lines `jaxprompt eval` printed.
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _reader(directory: epath.Path) -> ocp.CheckpointManager:
    # Reading is one host's own business: without save_root_metadata a read-only manager
    # passes no barrier (orbax's default has one), so a host may read while the others do
    # something else, e.g. wait in a writer's barrier.
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, save_root_metadata=False
    )
    return ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)


def latest_step(workdir: str | epath.PathLike) -> int | None:
    """The newest finished checkpoint's step in ``workdir``, or ``None`` if there is none.

    A save still in progress or killed midway is not finished, so it is not counted; a
    finished one may still be unreadable (see :func:`restore`'s fallback).
    """
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        return None
    with _quiet():
        manager = _reader(directory)
        try:
            return manager.latest_step()
        finally:
            manager.close()


def set_aside(workdir: str | epath.PathLike, *, after: int) -> list[str]:
    """Moves the checkpoints newer than step ``after`` to ``workdir/checkpoints_unreadable/``.

    A run that resumed from an older checkpoint because the newer ones could not be read
    calls this before it saves again: left in place, an unreadable checkpoint would keep its
    step (the run could not save that step again, and readers would fall back past it every
    time). Nothing is deleted: the files stay there to inspect.

    Returns:
      The new locations, oldest step first (empty when there was nothing newer).
    """
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        return []
    aside = directory.parent / "checkpoints_unreadable"
    moved = []
    newer = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    for step in (s for s in newer if s > after):
        target, n = aside / str(step), 1
        while target.exists():  # set aside before: keep both
            target, n = aside / f"{step}-{n}", n + 1
        aside.mkdir(parents=True, exist_ok=True)
        (directory / str(step)).rename(target)
        moved.append(str(target))
    return moved


def _restore_raw(
    workdir: str | epath.PathLike, step: int | None, max_step: int | None = None
) -> tuple[int, dict[str, np.ndarray], dict[str, Any], Any]:
    """Reads the newest readable checkpoint (or exactly ``step``; none newer than ``max_step``)
    without a target structure."""
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoints in {directory}")
    failures: list[str] = []
    with _quiet():
        manager = _reader(directory)
        try:
            found = _first_readable(manager, directory, step, max_step, failures)
        finally:
            manager.close()
    for msg in failures:
        # Emitted outside _quiet(): this one the user should see. A warning, not also a log
        # line: the command line shows jaxprompt's warnings as one log line each
        # (jaxprompt.app.console.setup), and a library user sees it once either way.
        warnings.warn(
            f"{msg}; falling back to the previous one (nothing was deleted)",
            CheckpointFallbackWarning,
            stacklevel=3,
        )
    return found


def _first_readable(
    manager: ocp.CheckpointManager,
    directory: epath.Path,
    step: int | None,
    max_step: int | None,
    failures: list[str],
) -> tuple[int, dict[str, np.ndarray], dict[str, Any], Any]:
    steps = sorted(manager.all_steps(), reverse=True)
    if max_step is not None:
        steps = [s for s in steps if s <= max_step]
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint {step} in {directory} (have {steps})")
        steps = [step]
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    for s in steps:
        try:
            restored = manager.restore(
                s,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(),
                    meta=ocp.args.JsonRestore(),
                    data=ocp.args.JsonRestore(),
                ),
            )
            flat = {k: np.asarray(v) for k, v in dict(restored.state).items()}
            meta = dict(restored.meta or {})
            data_state = _decode_data_state(restored.data)
        except Exception as e:  # noqa: BLE001 - any read failure means "unreadable"
            first_line = str(e).splitlines()[0] if str(e) else ""
            failures.append(
                f"checkpoint {directory / str(s)} is unreadable ({type(e).__name__}: "
                f"{first_line[:200]})"
            )
            continue
        return s, flat, meta, data_state
    raise CheckpointUnreadableError(
        f"no readable checkpoint in {directory}: {'; '.join(failures)}; move that directory "
        "away to start the run again"
    )


def _mismatch_message(
    directory: epath.Path, step: int, meta: Mapping[str, Any], problems: list[str]
) -> str:
    shown = "; ".join(problems[:3])
    if len(problems) > 3:
        shown += f"; and {len(problems) - 3} more"
    written_by = ""
    if "method" in meta:
        kwargs = json.dumps(meta.get("method_config", meta.get("config", {})), sort_keys=True)
        if len(kwargs) > 300:  # keep the message one readable line
            kwargs = kwargs[:300] + "..."
        written_by = f" It was written by method {meta['method']!r} with {kwargs}."
    return (
        f"checkpoint {directory / str(step)} does not fit: {shown}.{written_by} Fix: build the "
        "method from the checkpoint's meta (jaxprompt.checkpoint.load_prompt returns it) or "
        "train into a new workdir; nothing was changed on disk."
    )


def _fit_to_like(
    flat: Mapping[str, np.ndarray],
    like: PyTree,
    prefix: str,
    *,
    directory: epath.Path,
    step: int,
    meta: Mapping[str, Any],
) -> PyTree:
    expected = _flat_paths(like, prefix)
    if prefix:
        have = {k for k in flat if k.startswith(prefix + ".")}
    else:
        have = {k for k in flat if not k.startswith(tuple(p + "." for p in _SIDE))}
    problems = []
    for key, leaf in expected:
        if key not in flat and 0 in np.shape(leaf):
            continue  # zero-size leaves are not stored (see Checkpointer.save)
        if key not in flat:
            problems.append(f"{key} is missing from the checkpoint")
            continue
        got, want = flat[key], np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if tuple(got.shape) != tuple(np.shape(leaf)):
            problems.append(
                f"{key} is {tuple(got.shape)} in the checkpoint but {tuple(np.shape(leaf))} "
                "expected"
            )
        elif got.dtype != want and got.dtype.kind != want.kind:
            problems.append(f"{key} is {got.dtype} in the checkpoint but {want} expected")
    problems += [
        f"{k} is in the checkpoint but not expected"
        for k in sorted(have - {k for k, _ in expected})
    ]
    if problems:
        raise CheckpointMismatchError(_mismatch_message(directory, step, meta, problems))

    def place(key_leaf):
        key, leaf = key_leaf
        if key in flat:
            value = flat[key].astype(np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else flat[key]
        else:  # a zero-size leaf
            value = np.zeros(np.shape(leaf), np.dtype(getattr(leaf, "dtype", np.float32)))
        sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct) and sharding is not None:
            return jax.device_put(value, sharding)
        return value

    leaves = [place(kl) for kl in expected]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def restore(
    workdir: str | epath.PathLike,
    like: PyTree,
    *,
    step: int | None = None,
    max_step: int | None = None,
    extra_like: PyTree = None,
) -> tuple[Any, ...]:
    """Restores the newest readable checkpoint into the structure of ``like``.

    Args:
      workdir: the run directory.
      like: a pytree with the expected structure, shapes and dtypes (e.g. a freshly
        initialised TrainState); ``jax.Array`` or ``jax.ShapeDtypeStruct`` leaves with a
        sharding are restored onto that sharding, other leaves as numpy arrays.
      step: a specific checkpoint (default: the newest readable one).
      max_step: read no checkpoint newer than this (a multi-host job passes the step one
        host found, so that every host reads the same one; orbax's reads are collective).
      extra_like: structure of the ``extra`` tree saved with the state, if any.

    Returns:
      ``(state, meta, data_state)``, or ``(state, meta, data_state, extra)`` when
      ``extra_like`` is given.

    Raises:
      FileNotFoundError: if there is no checkpoint.
      CheckpointMismatchError: if the arrays do not fit ``like`` (one-line message; nothing
        on disk is touched).
      CheckpointUnreadableError: if no checkpoint is readable.
    """
    s, flat, meta, data_state = _restore_raw(workdir, step, max_step)
    where = dict(directory=checkpoint_dir(workdir), step=s, meta=meta)
    state = _fit_to_like(flat, like, "", **where)
    if extra_like is None:
        return state, meta, data_state
    return state, meta, data_state, _fit_to_like(flat, extra_like, _EXTRA, **where)


def load_prompt(
    workdir: str | epath.PathLike, *, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The learned prompt and meta of a run, with no config and no method needed.

    Args:
      workdir: the run directory (local or ``gs://``).
      step: a specific checkpoint (default: the newest readable one).

    Returns:
      ``(prompt, meta)``: the prompt as nested dicts of float32 numpy arrays (``{}`` for a
      method with nothing to learn), and the JSON meta (method name and config, ...). When
      the checkpoint has an ``eval_prompt`` (e.g. the aggregate GPA forms at the end), that
      is the prompt returned.
    """
    _, flat, meta, _ = _restore_raw(workdir, step)
    if any(k.startswith(_EVAL + ".") for k in flat):
        return unflatten_dict(flat, _EVAL), meta
    return unflatten_dict(flat, "prompt"), meta


# ------------------------------------------------------------------------------------------------
# One portable file
# ------------------------------------------------------------------------------------------------


def save_exported(path: str | epath.PathLike, prompt: PyTree, meta: Mapping[str, Any]) -> str:
    """Writes a prompt and its meta into ONE ``.npz`` file (no pickle; JSON meta inside).

    Args:
      path: the file to write (local or ``gs://``); written to a temporary name and renamed.
      prompt: the prompt pytree (nested dicts of arrays).
      meta: JSON-able dict.

    Returns:
      The path written.
    """
    arrays = flatten(prompt)
    if _META_KEY in arrays:
        raise ValueError(f"a prompt leaf may not be called {_META_KEY!r}")
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_META_KEY: np.array(json.dumps(_jsonable(dict(meta))))})
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(path)
    return str(path)


def export(
    workdir: str | epath.PathLike, path: str | epath.PathLike, *, step: int | None = None
) -> str:
    """Exports a run's prompt and meta into one portable file (see :func:`save_exported`).

    Args:
      workdir: the run directory.
      path: the ``.npz`` file to write.
      step: a specific checkpoint (default: the newest readable one).

    Returns:
      The path written.
    """
    prompt, meta = load_prompt(workdir, step=step)
    return save_exported(path, prompt, meta)


def load_exported(path: str | epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a file written by :func:`export` -> ``(prompt, meta)`` (numpy arrays, JSON dict)."""
    data = epath.Path(path).read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        flat = {k: npz[k] for k in npz.files if k != _META_KEY}
        if _META_KEY not in npz.files:
            raise ValueError(f"{path} is not a jaxprompt export (no {_META_KEY} entry)")
        meta = json.loads(str(npz[_META_KEY]))
    return unflatten_dict(flat), meta
