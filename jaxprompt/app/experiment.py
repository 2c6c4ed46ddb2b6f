"""Runs a protocol config end to end: data, method, training, evaluation, results.

This is where a resolved ``ml_collections`` config meets the library's keyword-argument
functions: :func:`run_train` and :func:`run_eval` take a config (plain ``ConfigDict`` or the
equivalent dict stored in a checkpoint's meta) and a run directory. The CLI is a thin layer over
them; research code can call them too.

The run directory (:class:`jaxprompt.app.rundir.RunDir`) holds ``config.json`` (resolved config),
``data/`` (the sampled few-shot ids), ``metrics.jsonl`` and TensorBoard events, orbax
checkpoints, and at the end ``results.json``, ``results.md`` and ``results.png``. A run whose
``results.json`` exists is skipped; an interrupted run resumes from its newest checkpoint. Every
input is checked before anything is written.

The run directory may be a bucket (``gs://...``): every file goes through ``etils.epath`` and
the checkpoints through orbax. On several hosts (``jax.distributed``), every process runs the
same code on its share of each batch (``data.batch_size`` is the GLOBAL batch) and process 0
alone writes the JSON, markdown and plot files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import clip as clip_lib
from jaxprompt import data as data_lib
from jaxprompt import evaluate as eval_lib
from jaxprompt import methods as methods_lib
from jaxprompt import sharding as shard_lib
from jaxprompt import train as train_lib
from jaxprompt.app import console
from jaxprompt.app import rundir as rundir_lib
from jaxprompt.data import augment as augment_lib
from jaxprompt.data import protocol as protocol_lib

log = logging.getLogger("jaxprompt")

RESULTS = "results.json"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


# Values of config.matmul_precision: "auto" (the platform's default) or jax's own names.
MATMUL_PRECISIONS = ("auto", "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


@contextlib.contextmanager
def matmul_precision(cfg: Mapping[str, Any]) -> Iterator[None]:
    """Runs the block under the config's ``matmul_precision`` (see configs/common.py).

    A context, not a global setting: research code calling a runner keeps its own precision.

    Raises:
      ConfigError: for an unknown value (before anything is written).
    """
    value = str(cfg.get("matmul_precision", "auto"))
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"config.matmul_precision={value!r}: choose one of {', '.join(MATMUL_PRECISIONS)}"
        )
    if value == "auto":
        yield
        return
    with jax.default_matmul_precision(value):
        yield


def to_dict(config: Any) -> dict[str, Any]:
    """A ConfigDict (or mapping) as plain JSON-able dicts and lists."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


def resolve_clip(name: str, dtype: str = "float32") -> clip_lib.Clip:
    """Loads the configured CLIP; ``"toy"`` is the toy world's shipped (or cached) model,
    pretrained now when this install has neither."""
    if name == "toy":
        from jaxprompt.side import toyclip

        toyclip.toy_clip_dir()  # pretrains into the cache when nothing is shipped or cached
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
            raise ConfigError(str(e.args[0]) if e.args else str(e)) from e
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
        task = clip_lib.make_task(clip, names, template=ds.spec.template)
        key = jax.random.key(int(cfg["seed"]))
        bar = console.Progress(
            len(split["test"]), f"eval {ev['name']} ({ds.spec.name})", unit="images"
        )
        batches = _counted(_eval_batches(split, ds, cfg, clip), bar)
        res = eval_lib.evaluate(method, prompt, clip, task, batches, mesh=mesh, key=key)
        bar.close()
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


def _counted(batches: Iterator[dict], bar: console.Progress) -> Iterator[dict]:
    """Passes the batches through, counting this host's real (unpadded) rows on ``bar``."""
    for b in batches:
        bar.update(int(np.sum(b["mask"])) if "mask" in b else len(b["label"]))
        yield b


def _apply_protocol(ds, d: Mapping[str, Any], workdir: str) -> tuple[Any, list[str]]:
    """``data.apply_protocol`` with the few-shot record kept in ``workdir/data`` on any host.

    On one host with a local run directory the record is read and written in place. On a
    bucket or several hosts it is staged through a local temporary directory: an existing
    record is read by every process (a resumed run keeps its examples), and process 0 alone
    uploads a new one (the sampling is seeded, so all processes draw the same examples).
    """
    kw = dict(shots=int(d["shots"]), seed=int(d["seed"]), subset=d["subset"])
    if rundir_lib.is_local(workdir) and jax.process_count() == 1:
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
        if rundir_lib.is_main() and not existed:
            remote.parent.mkdir(parents=True, exist_ok=True)
            with open(local) as f:
                remote.write_text(f.read())
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mesh(cfg: Mapping[str, Any]) -> jax.sharding.Mesh:
    m = cfg.get("mesh", {"data": -1, "model": 1})
    return shard_lib.make_mesh(data=int(m["data"]), model=int(m["model"]))


def train_batch_size(batch_size: int, n_train: int) -> int:
    """The global batch a training set of ``n_train`` examples is read in.

    Dassl's train loader drops the last partial batch only when the set holds at least one
    whole batch (``drop_last=is_train and len(data_source) >= batch_size``,
    KaiyangZhou/Dassl.pytorch ``dassl/data/data_manager.py:43``), so a smaller set (CoOp's 1-
    and 2-shot EuroSAT: 10 and 20 images at batch 32) trains on one batch of all of it per
    epoch. The same here: ``min(batch_size, n_train)``, recorded in ``results.json``.
    """
    return min(int(batch_size), int(n_train))


def check_batch(
    batch_size: int,
    n_train: int,
    what: str = "training examples",
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> None:
    """A one-line ConfigError if the global batch exceeds the data, or does not split over the
    hosts and (with ``mesh``) over each host's data-parallel devices; checked before the run
    directory is written."""
    if n_train < batch_size:
        raise ConfigError(
            f"data.batch_size={batch_size} exceeds the {n_train} {what}: lower it with "
            "--config.data.batch_size"
        )
    n_proc = jax.process_count()
    if batch_size % n_proc:
        raise ConfigError(
            f"data.batch_size={batch_size} (the global batch) does not split over {n_proc} "
            f"hosts: use a multiple of {n_proc}"
        )
    if mesh is not None:
        devices = mesh.devices.size // mesh.shape["model"]  # data-parallel devices, all hosts
        if batch_size % devices:
            raise ConfigError(
                f"data.batch_size={batch_size} does not split over the {devices} data-parallel "
                f"devices: use a multiple of {devices} (--config.data.batch_size={devices})"
            )


@dataclasses.dataclass
class TrainCheck:
    """A training run whose inputs were all checked (:func:`check_train`); nothing written.

    ``finished`` holds the record of a run that is already done (it is skipped).
    """

    cfg: dict[str, Any]
    run: rundir_lib.RunDir
    finished: dict[str, Any] | None = None
    method: Any = None
    ds: Any = None
    clip: Any = None
    mesh: Any = None
    cache: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 0  # the global batch trained with (train_batch_size)


def check_train(config: Any, workdir: str, *, cache: dict | None = None) -> TrainCheck:
    """Every check of a training run, reading only: a sweep checks all its runs before any.

    Order: a different config in ``workdir`` is refused and a finished run is returned as
    such; then the method, the datasets, the weights, the method's init on this CLIP and class
    set, and the batch size are checked.

    Args:
      config: the run's config.
      workdir: its run directory.
      cache: loaded datasets by name, shared between the checks of several runs.

    Raises:
      ConfigError (or the loaders' one-line errors) for any input that cannot work.
    """
    cfg = to_dict(config)
    run = rundir_lib.RunDir(workdir, cfg)
    finished = run.check()
    if finished is not None:
        return TrainCheck(cfg, run, finished)
    # Cheap checks first: a typo in the method or dataset fails before any weights load.
    d = cfg["data"]
    if int(cfg["optim"]["epochs"]) < 0:
        raise ConfigError(
            f"optim.epochs={cfg['optim']['epochs']} is negative: give 0 (evaluate the initial "
            "prompt) or more"
        )
    if int(d["batch_size"]) < 1:
        raise ConfigError(f"data.batch_size={d['batch_size']} must be at least 1")
    method = build_method(cfg)
    cache = {} if cache is None else cache
    ds = _load(d["dataset"], cfg, cache)
    for ev in cfg["evals"]:
        _load(ev["dataset"], cfg, cache)
    clip = resolve_clip(cfg["clip"]["name"], cfg["clip"]["dtype"])
    mesh = _mesh(cfg)
    # The few-shot draw is checked in memory; the record is written once the run is open.
    split, names = data_lib.apply_protocol(
        ds, shots=int(d["shots"]), seed=int(d["seed"]), subset=d["subset"]
    )
    # The method's own checks on this CLIP and class set (prompt depth, context length, vision
    # prompts on a ResNet) run on shapes only, before the run directory is written.
    jax.eval_shape(
        lambda c, t: method.init(jax.random.key(0), c, t),
        clip,
        clip_lib.make_task(clip, names, template=ds.spec.template),
    )
    n_train, asked = len(split["train"]), int(d["batch_size"])
    batch = train_batch_size(asked, n_train)
    if int(cfg["optim"]["epochs"]) > 0:
        if batch < asked:
            log.info(
                "data.batch_size=%d exceeds the %d training examples: one batch of %d per epoch "
                "(as Dassl's loader)", asked, n_train, batch,
            )  # fmt: skip
            # The whole set is the batch, so it must split over the hosts and devices itself.
            unit = math.lcm(jax.process_count(), mesh.devices.size // mesh.shape["model"])
            if batch % unit:
                fit = n_train // unit * unit
                fix = (
                    f"--config.data.batch_size={fit} (drops {n_train - fit} examples an epoch)"
                    if fit
                    else "more shots, or fewer data-parallel devices (--config.mesh.model=K "
                    "puts K of them on the model axis)"
                )
                raise ConfigError(
                    f"the {n_train} training examples are one batch (fewer than "
                    f"data.batch_size={asked}), which does not split over {unit} data-parallel "
                    f"devices: use {fix}"
                )
        check_batch(batch, n_train, mesh=mesh)
    return TrainCheck(cfg, run, None, method, ds, clip, mesh, cache, batch)


def run_train(config: Any, workdir: str, *, checked: TrainCheck | None = None) -> dict[str, Any]:
    """Trains the configured method and evaluates it; writes the run directory.

    Everything is checked first (:func:`check_train`, or ``checked``, its result for this
    config and directory); only then is the run directory written.

    Returns:
      The contents of ``results.json``.
    """
    t0 = time.time()
    c = checked if checked is not None else check_train(config, workdir)
    if c.finished is not None:
        return c.finished
    cfg, run, method, ds, clip, mesh, cache = c.cfg, c.run, c.method, c.ds, c.clip, c.mesh, c.cache
    d, o = cfg["data"], cfg["optim"]
    epochs = int(o["epochs"])
    run.open()
    split, names = _apply_protocol(ds, d, workdir)
    task = clip_lib.make_task(clip, names, template=ds.spec.template)
    if method.prepare is not None:
        # Work that depends only on the frozen model and the classes, done once
        # (PromptSRC's teacher text features: minutes for ImageNet's 1000 classes on a CPU).
        log.info("preparing %s for %d classes ...", method.name, len(names))
        t_prep = time.time()
        method = method.prepare(clip, task)
        log.info("prepared %s in %s", method.name, console.format_seconds(time.time() - t_prep))
    key = jax.random.key(int(cfg["seed"]))
    meta = {
        "config": cfg,
        "dataset": ds.spec.name,
        "classnames": list(names),
        "few_shot_ids": [x.key for x in split["train"]],
    }
    steps = 0
    # Per-epoch evaluations by step; fit's last one is of the final (aggregated) prompt.
    evaluated: dict[int, dict[str, float]] = {}
    if epochs > 0:
        n_train, batch_size = len(split["train"]), c.batch_size
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
        # Crops are made on the host from the full-resolution images (data.augment: "coop",
        # CoOp's bicubic RandomResizedCrop + flip); the device only normalises.
        batches = data_lib.train_iterator(
            split["train"],
            ds.fetch,
            batch_size=batch_size // jax.process_count(),  # this host's share
            seed=int(d["seed"]),
            image_size=clip.spec.image_size,
            augment=str(d.get("augment", "coop")),
            scale=tuple(float(x) for x in d.get("rrc_scale", (0.08, 1.0))),
        )
        # The iterator's epochs (a fresh shuffle each, last partial batch dropped) are the
        # schedule's and the aggregator's epochs.
        assert batches.batches_per_epoch == iters, (batches.batches_per_epoch, iters)

        def augment(batch, k):
            del k  # the crops and flips were drawn on the host
            return augment_lib.normalize_batch(batch)

        aggregator = None if method.aggregator is None else method.aggregator(epochs)
        eval_every = int(cfg.get("eval_every_epochs", 0) or 0)

        def eval_fn(prompt, step):
            evaluated[step] = evaluate_all(method, prompt, clip, cfg, mesh=mesh, cache=cache)
            return evaluated[step]

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
            eval_fn=eval_fn if eval_every else None,
            eval_every=iters * eval_every if eval_every else None,
            aggregator=aggregator,
            iters_per_epoch=iters,
            checkpoint_every=iters * max(1, int(cfg["ckpt"]["every_epochs"])),
            keep=int(cfg["ckpt"]["keep"]),
            meta=meta,
            lr_schedule=schedule,
            augment=augment,
        )
        prompt = state.prompt
    else:
        # Nothing to train (zero-shot, or 0 epochs): the initial prompt is saved as step 0,
        # so `jaxprompt eval` can evaluate the run again like any other.
        prompt = method.init(key, clip, task)
        if shard_lib.decide_once(lambda: ckpt_lib.latest_step(workdir)) is None:
            ckpt_lib.save(
                workdir,
                {"prompt": prompt, "step": 0},
                meta={**meta, "method": method.name, "method_config": dict(method.config)},
                step=0,
            )
    # With eval_every_epochs, fit has just evaluated the final prompt: not a second time.
    results = evaluated.get(steps) or evaluate_all(
        method, prompt, clip, cfg, mesh=mesh, cache=cache
    )
    record = {
        "accuracy": results,
        "protocol": cfg.get("protocol", ""),
        "method": method.name,
        "model": cfg["clip"]["name"],
        "dataset": ds.spec.name,
        "shots": int(d["shots"]),
        "seed": int(cfg["seed"]),
        "steps": steps,
        # The global batch trained with: data.batch_size, or the whole set when it is smaller.
        "batch_size": c.batch_size,
        "wall_time_s": round(time.time() - t0, 1),
    }
    return run.write_results(record)


def run_eval(workdir: str, config: Any | None = None) -> dict[str, Any]:
    """Evaluates the prompt saved in ``workdir`` (no config needed: it is in the meta).

    The record is kept beside the run's own results (``evals/<key>.json``, listed in
    ``results.md``): evaluating on other datasets never overwrites an earlier evaluation.

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
    cache: dict = {}
    for ev in cfg["evals"]:
        _load(ev["dataset"], cfg, cache)  # a typo fails before the weights load
    clip = resolve_clip(cfg["clip"]["name"], cfg["clip"]["dtype"])
    method = build_method(cfg)
    with matmul_precision(cfg):
        results = evaluate_all(method, prompt, clip, cfg, mesh=_mesh(cfg), cache=cache)
    record = {
        "accuracy": results,
        "method": method.name,
        "model": cfg["clip"]["name"],
        "dataset": cfg["data"]["dataset"],
        "evals": list(cfg["evals"]),
        "step": meta.get("step"),
        **rundir_lib.numerics(),
        "evaluated_from": os.path.abspath(workdir)
        if rundir_lib.is_local(workdir)
        else str(workdir),
    }
    key = rundir_lib.RunDir(workdir).add_evaluation(record)
    log.info("evaluation %s: %s (in %s/evals/%s.json)", key, json.dumps(results), workdir, key)
    return record
