"""Runs a protocol config end to end: data, method, training, evaluation, results.

This is where a resolved ``ml_collections`` config meets the library's keyword-argument
functions: :func:`run_train` and :func:`run_eval` take a config (plain ``ConfigDict`` or the
equivalent dict stored in a checkpoint's meta) and a run directory. The CLI is a thin layer over
them; research code can call them too.

A run directory holds ``config.json`` (resolved config), ``data/`` (the sampled few-shot ids),
``metrics.jsonl``, orbax checkpoints, and at the end ``results.json``, ``results.md`` and
``results.png``. A run whose ``results.json`` exists is skipped; an interrupted run resumes from
its newest checkpoint.

The run directory may be a bucket (``gs://...``): every file goes through ``etils.epath`` and
the checkpoints through orbax. On several hosts (``jax.distributed``), every process runs the
same code on its share of each batch (``data.batch_size`` is the GLOBAL batch) and process 0
alone writes the JSON, markdown and plot files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import clip as clip_lib
from jaxprompt import data as data_lib
from jaxprompt import evaluate as eval_lib
from jaxprompt import gpa as gpa_lib
from jaxprompt import methods as methods_lib
from jaxprompt import sharding as shard_lib
from jaxprompt import train as train_lib
from jaxprompt.data import protocol as protocol_lib

log = logging.getLogger("jaxprompt")

RESULTS = "results.json"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def to_dict(config: Any) -> dict[str, Any]:
    """A ConfigDict (or mapping) as plain JSON-able dicts and lists."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


def resolve_clip(name: str, dtype: str = "float32") -> clip_lib.Clip:
    """Loads the configured CLIP; ``"toy"`` is the toy world's shipped (or cached) model."""
    if name == "toy":
        from jaxprompt import toyclip

        name = toyclip.toy_clip_dir()
    return clip_lib.load_clip(name, dtype=dtype)


def _dataset_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    d = cfg["data"]
    return {
        k: d[k] or None for k in ("data_dir", "manual_dir", "split_file") if d.get(k) is not None
    }


def _load(name: str, cfg: Mapping[str, Any], cache: dict) -> data_lib.LoadedDataset:
    if name not in cache:
        try:
            cache[name] = data_lib.load_dataset(name, **_dataset_kwargs(cfg))
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"")) from e
    return cache[name]


def build_method(cfg: Mapping[str, Any]) -> methods_lib.PromptMethod:
    """The configured method (``method.name`` with ``method.kw``)."""
    return methods_lib.get(cfg["method"]["name"], **dict(cfg["method"].get("kw", {})))


def _eval_batches(split, ds, cfg, clip):
    return data_lib.eval_iterator(
        split["test"],
        ds.fetch,
        batch_size=int(cfg["data"]["eval_batch_size"]),
        image_size=clip.spec.image_size,
    )


def evaluate_all(
    method: methods_lib.PromptMethod,
    prompt: Any,
    clip: clip_lib.Clip,
    cfg: Mapping[str, Any],
    *,
    mesh: jax.sharding.Mesh,
    cache: dict | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) of ``prompt`` on every entry of ``cfg["evals"]``.

    Each entry ``{"name", "dataset", "subset"}`` is evaluated on its test split with its own
    class names (base, new, another dataset, a shifted domain). Adds ``hm`` when both ``base``
    and ``new`` are present.
    """
    cache = {} if cache is None else cache
    out: dict[str, float] = {}
    for ev in cfg["evals"]:
        ds = _load(ev["dataset"], cfg, cache)
        if ds.spec.test_only or ev["subset"] == "all":
            split, names = ds.split, list(ds.classnames)
            if ev["subset"] != "all":
                raise ConfigError(f"eval {ev['name']}: {ds.spec.name} has no base/new split")
        else:
            # The test split does not depend on the shots; sample 1 shot to get the subset.
            split, names = data_lib.apply_protocol(ds, shots=1, seed=1, subset=ev["subset"])
        task = clip_lib.make_task(clip, names)
        key = jax.random.key(int(cfg["seed"]))
        res = eval_lib.evaluate(
            method, prompt, clip, task, _eval_batches(split, ds, cfg, clip), mesh=mesh, key=key
        )
        out[ev["name"]] = round(res["top1"], 2)
        log.info(
            "eval %s (%s, %d classes): top-1 %.2f%%",
            ev["name"],
            ds.spec.name,
            len(names),
            res["top1"],
        )
    if "base" in out and "new" in out:
        out["hm"] = round(eval_lib.harmonic_mean(out["base"], out["new"]), 2)
    return out


def _is_main() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-host job)."""
    return jax.process_index() == 0


def _is_local(workdir: str | os.PathLike) -> bool:
    return "://" not in os.fspath(workdir)


def _apply_protocol(ds, d: Mapping[str, Any], workdir: str) -> tuple[Any, list[str]]:
    """``data.apply_protocol`` with the few-shot record kept in ``workdir/data`` on any host.

    On one host with a local run directory the record is read and written in place. On a
    bucket or several hosts it is staged through a local temporary directory: an existing
    record is read by every process (a resumed run keeps its examples), and process 0 alone
    uploads a new one (the sampling is seeded, so all processes draw the same examples).
    """
    kw = dict(shots=int(d["shots"]), seed=int(d["seed"]), subset=d["subset"])
    if _is_local(workdir) and jax.process_count() == 1:
        return data_lib.apply_protocol(ds, **kw, workdir=workdir)
    name = protocol_lib.fewshot_filename(int(d["shots"]), int(d["seed"]))
    remote = epath.Path(workdir) / "data" / name
    tmp = tempfile.mkdtemp(prefix="jaxprompt-")
    try:
        local = os.path.join(tmp, "data", name)
        # Process 0 reads the record and every host uses its copy: a host looking a moment
        # later could find a half-uploaded record of a new run.
        text = shard_lib.decide_once(lambda: remote.read_text() if remote.exists() else None)
        existed = text is not None
        if existed:
            os.makedirs(os.path.dirname(local))
            with open(local, "w") as f:
                f.write(text)
        out = data_lib.apply_protocol(ds, **kw, workdir=tmp)
        if _is_main() and not existed:
            remote.parent.mkdir(parents=True, exist_ok=True)
            with open(local) as f:
                remote.write_text(f.read())
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mesh(cfg: Mapping[str, Any]) -> jax.sharding.Mesh:
    m = cfg.get("mesh", {"data": -1, "model": 1})
    return shard_lib.make_mesh(data=int(m["data"]), model=int(m["model"]))


def run_train(config: Any, workdir: str) -> dict[str, Any]:
    """Trains the configured method and evaluates it; writes the run directory.

    Returns:
      The contents of ``results.json``.
    """
    cfg = to_dict(config)
    finished = start_run(workdir, cfg)
    if finished is not None:
        return finished
    t0 = time.time()
    # Cheap checks first: a typo in the method or dataset fails before any weights load.
    method = build_method(cfg)
    cache: dict = {}
    d = cfg["data"]
    ds = _load(d["dataset"], cfg, cache)
    for ev in cfg["evals"]:
        _load(ev["dataset"], cfg, cache)
    clip = resolve_clip(cfg["clip"]["name"], cfg["clip"]["dtype"])
    mesh = _mesh(cfg)
    split, names = _apply_protocol(ds, d, workdir)
    task = clip_lib.make_task(clip, names)
    if method.name == "promptsrc":
        from jaxprompt.methods.promptsrc import with_teacher

        # The frozen 60-template teacher is computed once for the training classes.
        method = with_teacher(method, clip, task)
    o = cfg["optim"]
    epochs = int(o["epochs"])
    key = jax.random.key(int(cfg["seed"]))
    state_prompt = None
    steps = 0
    if epochs > 0:
        batch_size = int(d["batch_size"])
        n_train = len(split["train"])
        if n_train < batch_size:
            raise ConfigError(
                f"data.batch_size={batch_size} exceeds the {n_train} training examples: "
                "lower it with --config.data.batch_size"
            )
        n_proc = jax.process_count()
        if batch_size % n_proc:
            raise ConfigError(
                f"data.batch_size={batch_size} (the global batch) does not split over "
                f"{n_proc} hosts: use a multiple of {n_proc}"
            )
        iters = n_train // batch_size  # drop_last, as the reference trainers do
        steps = iters * epochs
        schedule = train_lib.make_schedule(
            float(o["lr"]),
            epochs=epochs,
            iters_per_epoch=iters,
            warmup_epochs=int(o["warmup_epochs"]),
            warmup_lr=float(o["warmup_lr"]),
        )
        tx = train_lib.make_optimizer(
            schedule, momentum=float(o["momentum"]), weight_decay=float(o["weight_decay"])
        )
        batches = data_lib.train_iterator(
            split["train"],
            ds.fetch,
            batch_size=batch_size // n_proc,  # this host's share; the iterator shards by host
            seed=int(d["seed"]),
            # The canvas holds a decoded image before the on-device random resized crop.
            canvas=min(512, max(64, 4 * clip.spec.image_size)),
        )
        size = clip.spec.image_size
        scale = tuple(float(x) for x in d.get("rrc_scale", (0.08, 1.0)))

        def augment(batch, k):
            return data_lib.train_augment(k, batch, out_size=size, scale=scale)

        aggregator = None
        if "gpa_mean" in method.config:
            # Gaussian prompt aggregation over per-epoch snapshots (PromptSRC).
            aggregator = gpa_lib.gaussian_aggregation(
                mean=float(method.config["gpa_mean"]),
                std=float(method.config["gpa_std"]),
                num_epochs=epochs,
            )
        meta = {
            "config": cfg,
            "dataset": ds.spec.name,
            "classnames": list(names),
            "few_shot_ids": [x.key for x in split["train"]],
        }
        log.info(
            "training %s on %s: %d classes, %d examples, %d epochs x %d steps",
            method.name,
            ds.spec.name,
            len(names),
            n_train,
            epochs,
            iters,
        )
        state = train_lib.fit(
            method,
            tx,
            clip,
            task,
            batches,
            steps=steps,
            key=key,
            mesh=mesh,
            workdir=workdir,
            log_every=int(cfg.get("log_every", 50)),
            aggregator=aggregator,
            iters_per_epoch=iters,
            checkpoint_every=iters * max(1, int(cfg["ckpt"]["every_epochs"])),
            keep=int(cfg["ckpt"]["keep"]),
            meta=meta,
            lr_schedule=schedule,
            augment=augment,
        )
        state_prompt = state.prompt
    else:
        state_prompt = method.init(key, clip, task)
    results = evaluate_all(method, state_prompt, clip, cfg, mesh=mesh, cache=cache)
    record = {
        "accuracy": results,
        "protocol": cfg.get("protocol", ""),
        "method": method.name,
        "model": cfg["clip"]["name"],
        "dataset": ds.spec.name,
        "shots": int(d["shots"]),
        "seed": int(cfg["seed"]),
        "steps": steps,
        "wall_time_s": round(time.time() - t0, 1),
    }
    if _is_main():
        finish(workdir, record)
    shard_lib.barrier("jaxprompt:results")  # a sweep moves on only once results.json exists
    return record


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def start_run(workdir: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Opens a run directory: a finished run's ``results.json`` contents (skip it), else None.

    Creates ``workdir`` and writes ``config.json``, or checks that a resumed run's config is
    the one it was started with (every runner: train, TPT, POUF). Process 0 alone looks at
    the directory and writes; its verdict reaches every host (``sharding.decide_once``), so
    all hosts skip, refuse or start together whatever their timing.
    """
    outcome = shard_lib.decide_once(lambda: _open_run(workdir, cfg))
    if outcome.get("error"):
        raise ConfigError(outcome["error"])
    if outcome.get("finished") is not None:
        log.info("%s exists: skipping this run (delete it to run again)", outcome["where"])
    return outcome.get("finished")


def _open_run(workdir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``start_run``'s look at the directory (process 0): finished, refused, or opened."""
    wd = epath.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    done = wd / RESULTS
    if done.exists():
        return {"finished": json.loads(done.read_text()), "where": str(done)}
    path = wd / "config.json"
    if path.exists():
        diff = _diff_keys(json.loads(path.read_text()), cfg)
        if diff:
            return {
                "error": f"{workdir} holds a run with a different config "
                f"({', '.join(diff[:4])}): use a new --workdir, or the original config to "
                "resume it"
            }
        return {}
    _write_json(path, cfg)
    return {}


def run_eval(workdir: str, config: Any | None = None) -> dict[str, Any]:
    """Evaluates the prompt saved in ``workdir`` (no config needed: it is in the meta).

    Args:
      workdir: a training run directory (local or copied from a bucket).
      config: optional config whose ``evals`` replace the run's (other datasets or domains).
    """
    prompt, meta = ckpt_lib.load_prompt(workdir)
    cfg = meta.get("config")
    if cfg is None:
        raise ConfigError(f"{workdir} has no resolved config in its checkpoint meta: pass --config")
    if config is not None:
        cfg = {**cfg, "evals": to_dict(config)["evals"]}
    clip = resolve_clip(cfg["clip"]["name"], cfg["clip"]["dtype"])
    method = build_method(cfg)
    results = evaluate_all(method, prompt, clip, cfg, mesh=_mesh(cfg))
    record = {
        "accuracy": results,
        "method": method.name,
        "model": cfg["clip"]["name"],
        "evaluated_from": os.path.abspath(workdir) if _is_local(workdir) else str(workdir),
    }
    if _is_main():
        _write_json(epath.Path(workdir) / "eval_results.json", record)
    return record


def finish(workdir: str, record: Mapping[str, Any]) -> None:
    """Writes results.json, a markdown table and a plot of the training curve and accuracies."""
    acc = record["accuracy"]
    wd = epath.Path(workdir)
    (wd / "results.md").write_text(eval_lib.markdown_table({record["method"]: acc}) + "\n")
    try:
        _plot(workdir, record)
    except Exception as e:  # noqa: BLE001 - a plot must never cost the results
        log.warning("no plot: %s", e)
    _write_json(wd / RESULTS, record)
    log.info("results: %s", json.dumps(acc))


def _plot(workdir: str, record: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps, losses = [], []
    path = epath.Path(workdir) / "metrics.jsonl"
    if path.exists():
        rows = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "loss" in r:
                rows[r["step"]] = r["loss"]
        steps, losses = list(rows), list(rows.values())
    axes[0].plot(steps, losses)
    axes[0].set(xlabel="step", ylabel="training loss", title=record["method"])
    acc = record["accuracy"]
    axes[1].bar(list(acc), list(acc.values()), color="tab:blue")
    axes[1].set(ylabel="top-1 %", ylim=(0, 100), title=record.get("dataset", ""))
    for i, v in enumerate(acc.values()):
        axes[1].text(i, v + 1, f"{v:.1f}", ha="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    (epath.Path(workdir) / "results.png").write_bytes(buf.getvalue())


def _write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=1, default=_default)
    if not _is_local(path):
        epath.Path(path).write_text(text)  # an object store writes an object whole
        return
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
