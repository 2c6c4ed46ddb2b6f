"""The run directory every runner shares: check, open, results, evaluations.

A runner uses it in this order, so that bad input never writes anything::

    run = RunDir(workdir, cfg)
    finished = run.check()     # read-only: a different config in the directory is refused,
                               # then a finished run's record (skip it), or None
    ...                        # validate everything else: method, datasets, weights, batch size
    run.open()                 # now the directory and config.json are written
    ...                        # train / adapt
    run.write_results(record)  # results.json, results.md, results.png

Files: ``config.json`` (the resolved config), ``results.json`` (the run's record: accuracy per
evaluated split in percent, method, model, dataset, seed, steps, wall time), ``results.md`` (a
table of exactly the splits that were evaluated), ``results.png`` (training curve and
accuracies), and ``evals/<key>.json`` for each later ``jaxprompt eval`` (kept side by side, keyed
by what was evaluated; ``results.md`` lists them under the run's own table).

On several hosts process 0 alone looks at the directory and writes; its verdicts reach every
host through :func:`jaxprompt.sharding.decide_once`, so all hosts skip, refuse or start together.
The directory may be a bucket (``gs://``): every file goes through ``etils.epath``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxprompt import evaluate as eval_lib
from jaxprompt import sharding as shard_lib

log = logging.getLogger(__name__)

RESULTS = "results.json"
CONFIG = "config.json"
EVALS = "evals"
LOCK = ".jaxprompt.lock"  # the process running in the directory (local directories)


class ConfigError(ValueError):
    """A config value or run directory that cannot work; the message names the fix."""


def is_main() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-host job)."""
    return jax.process_index() == 0


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on this machine's file system (not ``gs://`` and the like)."""
    return "://" not in os.fspath(path)


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class RunDir:
    """One run's directory (see the module docstring for the order of calls).

    Args:
      workdir: the run directory (local path or ``gs://...``).
      cfg: the run's resolved config as plain dicts (``None`` for reading an existing run).
    """

    def __init__(self, workdir: str | os.PathLike, cfg: Mapping[str, Any] | None = None):
        self.workdir = os.fspath(workdir)
        self.path = epath.Path(self.workdir)
        self.cfg = None if cfg is None else dict(cfg)

    def __truediv__(self, name: str) -> epath.Path:
        return self.path / name

    # ------------------------------------------------------------------------ opening
    def check(self) -> dict[str, Any] | None:
        """A finished run's ``results.json`` record (skip the run), else ``None``.

        Reads only. Raises :class:`ConfigError` if the directory holds a run with a different
        config, finished or not (nothing is written, so the corrected command then works), or
        if the path is a file.
        """
        verdict = shard_lib.decide_once(self._look)
        if verdict.get("error"):
            raise ConfigError(verdict["error"])
        if verdict.get("finished") is not None:
            log.info("%s exists: skipping this run (delete it to run again)", self / RESULTS)
        return verdict.get("finished")

    def _look(self) -> dict[str, Any]:
        if self.path.exists() and not self.path.is_dir():
            return {"error": f"--workdir {self.workdir} is a file: name a directory"}
        path = self / CONFIG
        if path.exists() and self.cfg is not None:
            # Before the finished check: a finished run of another config is not this run, and
            # skipping it would report success for a run that never happened.
            diff = diff_keys(json.loads(path.read_text()), self.cfg)
            if diff:
                return {
                    "error": f"{self.workdir} holds a run with a different config "
                    f"({', '.join(diff[:4])}): use a new --workdir, or the original config "
                    "to resume it"
                }
        done = self / RESULTS
        if done.exists():
            return {"finished": json.loads(done.read_text())}
        return {}

    def open(self) -> None:
        """Creates the directory and writes ``config.json`` (after every input was checked).

        Raises:
          ConfigError: the directory cannot be created (the first write of the run).
        """
        if is_main():
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                reason = e.strerror or type(e).__name__
                raise ConfigError(
                    f"cannot create --workdir {self.workdir} ({reason}): choose a directory "
                    "you can write to"
                ) from e
            self._lock()
            if not (self / CONFIG).exists():
                write_json(self / CONFIG, self.cfg)
        shard_lib.barrier("jaxprompt:run-opened")

    def _lock(self) -> None:
        """Claims a local run directory for this process: a second process started on it
        stops here (one line, nothing written) instead of interleaving checkpoints and metrics
        with the first. A lock whose process is gone (killed) is taken over."""
        if not is_local(self.workdir):
            return  # an object store has no exclusive create; one writer per run is the user's
        path = os.path.join(self.workdir, LOCK)
        me = _this_process()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is None:  # just created, not yet written: look once more
                    time.sleep(0.5)
                    holder = _read_lock(path)
                if holder == me:
                    return  # this process again (a sweep, or research code calling twice)
                if holder is not None and _alive(holder):
                    raise ConfigError(
                        f"{self.workdir} is in use by jaxprompt process {holder['pid']} on "
                        f"{holder['host']}: wait for it, stop it, or use another --workdir "
                        f"(remove {path} if that process is gone)"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)  # left by a process that was killed
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            atexit.register(self.unlock)
            return
        raise ConfigError(f"could not lock {path}: another process keeps taking it")

    def unlock(self) -> None:
        """Releases this process's claim on the directory (at the end of the run, or exit)."""
        if not is_main() or not is_local(self.workdir):
            return
        path = os.path.join(self.workdir, LOCK)
        if _read_lock(path) == _this_process():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    # ------------------------------------------------------------------------ results
    def write_results(self, record: Mapping[str, Any], *, plot: bool = True) -> dict[str, Any]:
        """Writes ``results.json``, ``results.md`` and (``plot``) ``results.png`` on process 0.

        The record gains the platform and matmul precision it was computed with
        (:func:`numerics`); that full record is returned.
        """
        record = {**record, **numerics()}
        if is_main():
            if plot:
                try:
                    plot_run(self, record)
                except Exception as e:  # noqa: BLE001 - a plot must never cost the results
                    log.warning("no plot: %s", e)
            # results.json is the run's "finished" mark (a re-run skips it): written last, so
            # a run stopped in between is re-run rather than left without results.md.
            self._write_markdown(record)
            write_json(self / RESULTS, record)
        log.info("results: %s", json.dumps(record["accuracy"]))
        self.unlock()
        shard_lib.barrier("jaxprompt:results")  # a sweep moves on only once the files exist
        return record

    def add_evaluation(self, record: Mapping[str, Any]) -> str:
        """Keeps a later evaluation beside the run's own: ``evals/<key>.json``.

        The key names what was evaluated (``<dataset>-<eval names>``), so evaluating on
        another dataset adds a file and evaluating the same again replaces only its own.
        Returns the key.
        """
        key = evaluation_key(record)
        if is_main():
            (self / EVALS).mkdir(parents=True, exist_ok=True)
            write_json(self / EVALS / f"{key}.json", record)
            self._write_markdown()
        return key

    def evaluations(self) -> dict[str, dict[str, Any]]:
        """The later evaluations of this run, by key."""
        where = self / EVALS
        if not where.exists():
            return {}
        return {
            p.name[: -len(".json")]: json.loads(p.read_text())
            for p in sorted(where.iterdir())
            if p.name.endswith(".json")
        }

    def _write_markdown(self, record: Mapping[str, Any] | None = None) -> None:
        parts = []
        done = self / RESULTS
        if record is None and done.exists():
            record = json.loads(done.read_text())
        if record is not None:
            parts.append(results_table(record))
        for key, rec in self.evaluations().items():
            parts.append(f"Evaluation `{key}`:\n\n" + results_table(rec))
        if parts:
            (self / "results.md").write_text("\n\n".join(parts) + "\n")


def _this_process() -> dict[str, Any]:
    """What a lock file holds: who runs in the directory."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _read_lock(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        return {"pid": int(holder["pid"]), "host": str(holder["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # gone, or being written this instant: looked at again


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether a lock's process still runs (another host's cannot be asked: assumed so)."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def numerics() -> dict[str, str]:
    """What the numbers depend on beyond the config: the platform and the matmul precision in
    force (``"auto"``: the platform's default)."""
    return {
        "platform": jax.default_backend(),
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "auto"),
    }


def results_table(record: Mapping[str, Any]) -> str:
    """A Markdown table of exactly the splits a record evaluated (no empty cells).

    Base-to-novel records show Base / New / HM; every other record (few-shot, cross-domain,
    TPT, POUF) shows one column per evaluated split, in the order they were evaluated.
    """
    acc = dict(record["accuracy"])
    columns = list(acc)
    if {"base", "new"} <= set(acc):
        columns = ["base", "new", "hm"] + [c for c in acc if c not in ("base", "new", "hm")]
    details = [str(record["protocol"])] if record.get("protocol") else []
    if record.get("seed") is not None:
        details.append(f"seed {record['seed']}")
    title = str(record.get("method", ""))
    if details:
        title += f" ({', '.join(details)})"
    table = eval_lib.markdown_table(
        {str(record.get("dataset", "run")): acc}, columns=columns, average=False
    )
    return f"**{title}**\n\n{table}" if title else table


def evaluation_key(record: Mapping[str, Any]) -> str:
    """A file-name-safe key for what an evaluation covers: the run's dataset, then the
    evaluated splits (``toy_textures-base-new``, ``ImageNet-ImageNetV2-ImageNetSketch``)."""
    parts = [str(record.get("dataset", "eval"))]
    parts += [k for k in record["accuracy"] if k != "hm" and k not in parts]
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))
    if len(key) > 100:  # many evaluations: a readable head and a digest of the rest
        key = key[:80] + "-" + hashlib.sha1(key.encode()).hexdigest()[:12]
    return key


def plot_run(run: RunDir, record: Mapping[str, Any]) -> None:
    """``results.png``: the training loss (and per-epoch eval curves) and the accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    rows = read_metrics(run)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    axes[0].plot(list(losses), list(losses.values()), label="training loss")
    axes[0].set(xlabel="step", ylabel="training loss", title=record.get("method", ""))
    curves: dict[str, dict[int, float]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/"):
                curves.setdefault(k[len("eval/") :], {})[r["step"]] = v
    if curves:
        twin = axes[0].twinx()
        for name, pts in curves.items():
            twin.plot(list(pts), list(pts.values()), marker="o", label=f"{name} top-1")
        twin.set(ylabel="top-1 %", ylim=(0, 100))
        twin.legend(loc="lower right", fontsize="small")
    acc = record["accuracy"]
    axes[1].bar(list(acc), list(acc.values()), color="tab:blue")
    axes[1].set(ylabel="top-1 %", ylim=(0, 100), title=record.get("dataset", ""))
    for i, v in enumerate(acc.values()):
        axes[1].text(i, v + 1, f"{v:.1f}", ha="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    (run / "results.png").write_bytes(buf.getvalue())


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` (the later of two lines for one step wins)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[tuple[int, bool], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        # Training lines and eval lines of one step are kept apart.
        by_step[(r["step"], any(k.startswith("eval/") for k in r))] = r
    return [by_step[k] for k in sorted(by_step)]


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically (a temporary file renamed; an object store writes whole)."""
    text = json.dumps(obj, indent=1, default=_default)
    if not is_local(path):
        epath.Path(path).write_text(text)
        return
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
