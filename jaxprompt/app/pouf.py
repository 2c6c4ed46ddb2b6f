"""The ``jaxprompt adapt`` runner for POUF: unsupervised adaptation on an unlabeled target set.

Tanwisuth et al., "POUF: Prompt-Oriented Unsupervised Fine-tuning for Large Pre-trained
Models", ICML 2023, arXiv 2305.00350; reference github.com/korawat-tanwisuth/POUF @9e12dbb.
Spec: ``specs/pouf.md``.

    jaxprompt adapt --config configs/adapt.py:pouf,dataset=folder:/data/office31/webcam \\
        --workdir runs/pouf/w
    jaxprompt adapt --config configs/adapt.py:pouf_full,dataset=DomainNet/clipart --workdir ...
    jaxprompt adapt --config configs/adapt.py:pouf_mlm,dataset=glue/sst2 --workdir ...

CLIP (``method.name == "pouf"``): accuracy of the initial prompt (zero-shot) on the target test
set, then ``epochs x iters_per_epoch`` steps of :func:`jaxprompt.methods.pouf.pouf` with
:func:`jaxprompt.methods.pouf.make_optimizer` through :func:`jaxprompt.train.fit` (sharded over
the mesh's ``data`` axis, checkpoints, resume), then the accuracy after. The training batches
have their labels replaced by -1 before they reach the device: the adaptation cannot read them.

Target sets:

* Office-31 / Office-Home: ``folder:PATH`` to one domain's image folder (class sub-folders).
  The reference adapts on ALL images of the domain and tests on the same images
  (transductive): ``data.adapt_split = data.test_split = "all"`` is the default for folders.
* DomainNet: ``DomainNet/<domain>`` (clipart, infograph, painting, quickdraw, real, sketch),
  read from TFDS ``domainnet/<domain>`` (prepare it with ``tfds build``); adapt on ``train``,
  test on ``test``.
* Any catalog dataset (the toy world): adapt on ``train``, test on ``test``.

Model selection (spec 1.10): by default the LAST step, which needs no label. With
``select_with_target_labels=True`` the target test accuracy is measured after every epoch and
the best epoch is reported too (``pouf_best_by_target_labels``, and its prompt exported): the
reference's protocol, which selects on the test labels (label leakage).

Masked LM (``method.name == "pouf_mlm"``), the LM-BFF protocol (spec 2.3): for each seed of
``seeds`` (13, 21, 42, 87, 100), :func:`jaxprompt.side.mlm.adapt` on that seed's k-shot train
split (16 per class, labels dropped) of a TFDS GLUE set or CSV file, selection on its k-shot
dev split (16 per class; ``select_on_dev``), the task's metric (F1 for MRPC/QQP, Matthews
correlation for CoLA, else accuracy) on the original evaluation split. ``results.json`` holds
each seed's metrics (``per_seed``) and their mean / std (``accuracy`` = the main metric's
mean, ``std``, ``summary`` for every metric); ``select_with_target_labels`` adds the
test-label selection (label leakage) as ``pouf_best_by_target_labels``.

Outputs in the run directory: ``config.json``, ``metrics.jsonl``, checkpoints (CLIP),
``results.json`` (``accuracy`` = ``{"zero_shot", "pouf"[, "pouf_best_by_target_labels"]}`` in
percent) and ``results.md``. A run whose ``results.json`` exists is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import clip as clip_lib
from jaxprompt import data as data_lib
from jaxprompt import evaluate as eval_lib
from jaxprompt import methods as methods_lib
from jaxprompt import train as train_lib
from jaxprompt.app import experiment
from jaxprompt.app import rundir as rundir_lib
from jaxprompt.data import augment as augment_lib
from jaxprompt.data import catalog as catalog_lib

# (jaxprompt.methods.pouf the attribute is the constructor: import from the module itself)
from jaxprompt.methods.pouf import inverse_decay
from jaxprompt.methods.pouf import make_optimizer as make_pouf_optimizer

log = logging.getLogger("jaxprompt")

DOMAINNET_DOMAINS = catalog_lib.DOMAINNET_DOMAINS

__all__ = ["domainnet_spec", "run_pouf"]


def _hash_key(rec: Mapping[str, Any], split: str, label_names: Any) -> str:
    # TFDS domainnet stores no file name: the image bytes identify a record.
    del label_names
    img = rec["image"]
    raw = img if isinstance(img, bytes) else np.asarray(img).tobytes()
    return f"{split}/{hashlib.sha1(raw).hexdigest()[:20]}"


def domainnet_spec(domain: str) -> data_lib.DatasetSpec:
    """A catalog entry for one DomainNet domain in TFDS (``domainnet/<domain>``).

    Args:
      domain: ``clipart``, ``infograph``, ``painting``, ``quickdraw``, ``real``, ``sketch``
        or its first letter.

    Raises:
      experiment.ConfigError: an unknown domain (one line).
    """
    try:
        full = catalog_lib.domainnet_domain("DomainNet/" + domain)
    except KeyError as e:
        raise experiment.ConfigError(str(e).strip("'\"")) from None
    return data_lib.DatasetSpec(
        name=f"DomainNet_{full}",
        num_classes=345,
        tfds=f"domainnet/{full}",
        tfds_splits={"train": ("train",), "test": ("test",)},
        auto_split="native",
        key=_hash_key,
        # Not a catalog entry, so `jaxprompt prepare` does not build it: TFDS does.
        manual=(
            f"build it with TensorFlow Datasets: `tfds build domainnet/{full} "
            "--data_dir DIR` (pip install 'jaxprompt[prepare]'), then --config.data.data_dir=DIR"
        ),
    )


def _dataset(name: str, cfg: Mapping[str, Any]) -> data_lib.LoadedDataset:
    try:
        domain = catalog_lib.domainnet_domain(name)
    except KeyError as e:
        raise experiment.ConfigError(str(e).strip("'\"")) from None
    if domain is not None:
        kw = experiment._dataset_kwargs(cfg)
        return data_lib.load_dataset(domainnet_spec(domain), data_dir=kw.get("data_dir"))
    return experiment._load(name, cfg, {})


def _examples(ds: data_lib.LoadedDataset, which: str, folder: bool, default: str) -> list:
    """``"auto"``: every image of a folder domain (Office protocol), else ``default``."""
    if which == "auto":
        which = "all" if folder else default
    if which == "all":
        return [x for s in ("train", "val", "test") for x in ds.split.get(s, [])]
    return list(ds.split[which])


class _Unlabeled:
    """Wraps a train iterator: labels become -1 on the host, position state passes through."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self._it))
        batch["label"] = np.full_like(batch["label"], -1)
        return batch

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def run_pouf(config: Any, workdir: str) -> dict[str, Any]:
    """Runs POUF on CLIP (``configs/adapt.py`` presets ``pouf``, ``pouf_full``).

    Returns:
      The contents of ``results.json``.
    """
    return _unless_finished(config, workdir, _run_clip)


def run_pouf_mlm(config: Any, workdir: str) -> dict[str, Any]:
    """Runs POUF on a masked language model (``configs/adapt.py`` preset ``pouf_mlm``).

    Returns:
      The contents of ``results.json``.
    """
    return _unless_finished(config, workdir, _run_mlm)


def _unless_finished(config: Any, workdir: str, body: Any) -> dict[str, Any]:
    cfg = experiment.to_dict(config)
    run = rundir_lib.RunDir(workdir, cfg)
    finished = run.check()
    return finished if finished is not None else body(cfg, run)


def _run_clip(cfg: dict[str, Any], run: rundir_lib.RunDir) -> dict[str, Any]:
    workdir = run.workdir
    t0 = time.time()
    m, d, o = cfg["method"], cfg["data"], cfg["optim"]
    kw = {k: m[k] for k in ("w_transport", "w_info", "train_logit_scale", "full_model")}
    method = methods_lib.get(
        "pouf", base=m["base"], base_kwargs=dict(m.get("base_kwargs") or {}), **kw
    )
    ds = _dataset(d["dataset"], cfg)
    folder = ds.spec.custom is not None and ds.spec.custom[0] == "folder"
    train_x = _examples(ds, d.get("adapt_split", "auto"), folder, "train")
    test_x = _examples(ds, d.get("test_split", "auto"), folder, "test")
    if int(d.get("limit", 0)) > 0:
        test_x = test_x[: int(d["limit"])]
    clip = experiment.resolve_clip(cfg["clip"]["name"], cfg["clip"]["dtype"])
    names = list(ds.classnames)
    task = clip_lib.make_task(clip, names, template=ds.spec.template)
    mesh = experiment._mesh(cfg)
    key = jax.random.key(int(cfg["seed"]))
    tx = make_pouf_optimizer(
        ctx_lr=float(o["ctx_lr"]),
        logit_scale_lr=float(o["logit_scale_lr"]),
        clip_lr=float(o["clip_lr"]),
        momentum=float(o["momentum"]),
        weight_decay=float(o["weight_decay"]),
        gamma=float(o["gamma"]),
        decay=float(o["decay"]),
    )
    ipe, epochs = int(o["iters_per_epoch"]), int(o["epochs"])
    steps = ipe * epochs
    batch_size = int(d["batch_size"])
    experiment.check_batch(batch_size, len(train_x), "target images", mesh=mesh)
    run.open()
    size = clip.spec.image_size

    def test_batches():
        return data_lib.eval_iterator(
            test_x, ds.fetch, batch_size=int(d["eval_batch_size"]), image_size=size
        )

    def accuracy(prompt) -> float:
        res = eval_lib.evaluate(method, prompt, clip, task, test_batches(), mesh=mesh, key=key)
        return round(float(res["top1"]), 2)

    init_key, _ = jax.random.split(key)  # the prompt fit initialises
    zero_shot = accuracy(method.init(init_key, clip, task))
    log.info(
        "POUF (%s) on %s: %d classes, adapt on %d unlabeled images, test on %d; zero-shot "
        "%.2f%%", "full model" if m["full_model"] else "prompt", ds.spec.name, len(names),
        len(train_x), len(test_x), zero_shot,
    )  # fmt: skip
    # tllib's target loader: each pass a fresh shuffle, drop_last; the spec-1.1 transform
    # (data.augment = "pouf": square resize to 256/224 of the image size, bilinear
    # RandomResizedCrop, flip) made on the host from the full-resolution image.
    batches = _Unlabeled(
        data_lib.train_iterator(
            train_x, ds.fetch, batch_size=batch_size // jax.process_count(),  # host's share
            seed=int(cfg["seed"]), image_size=size, augment=str(d.get("augment", "pouf")),
            scale=tuple(float(x) for x in d.get("rrc_scale", (0.08, 1.0))),
        )
    )  # fmt: skip

    def augment(batch, k):
        del k  # the crops and flips were drawn on the host
        return augment_lib.normalize_batch(batch)

    select = bool(cfg.get("select_with_target_labels", False))
    best: dict[str, Any] = {"acc": -1.0, "step": 0, "prompt": None}

    def eval_fn(prompt, step):
        # Only with select_with_target_labels: reads the target labels (label leakage).
        acc = accuracy(prompt)
        if acc > best["acc"]:
            best.update(acc=acc, step=step, prompt=jax.device_get(prompt))
        return {"target_top1": acc}

    state = train_lib.fit(
        method, tx, clip, task, batches,
        steps=steps, key=key, mesh=mesh, workdir=workdir,
        log_every=int(cfg.get("log_every", 50)),
        eval_fn=eval_fn if select else None, eval_every=ipe if select else None,
        iters_per_epoch=ipe, checkpoint_every=ipe, keep=int(cfg.get("ckpt_keep", 2)),
        meta={"config": cfg, "dataset": ds.spec.name, "classnames": names},
        lr_schedule=inverse_decay(float(o["ctx_lr"]), gamma=float(o["gamma"]),
                                           decay=float(o["decay"])),
        augment=augment,
    )  # fmt: skip
    accuracy_ = {"zero_shot": zero_shot, "pouf": accuracy(state.prompt)}
    record: dict[str, Any] = {
        "accuracy": accuracy_,
        "protocol": "adapt",
        "method": "pouf",
        "variant": "full_model" if m["full_model"] else "prompt",
        "selection": "last step (label-free)",
        "model": cfg["clip"]["name"],
        "dataset": ds.spec.name,
        "n_adapt": len(train_x),
        "n_test": len(test_x),
        "seed": int(cfg["seed"]),
        "steps": steps,
    }
    if select:
        accuracy_["pouf_best_by_target_labels"] = best["acc"]
        record["best_step_by_target_labels"] = best["step"]
        record["selection"] = (
            "last step reported as 'pouf'; best epoch by target TEST labels as "
            "'pouf_best_by_target_labels' (label leakage, the reference's protocol)"
        )
        if jax.process_index() == 0 and best["prompt"] is not None:
            ckpt_lib.save_exported(
                os.path.join(workdir, "best_by_target_labels.npz"),
                best["prompt"],
                {"method": "pouf", "step": best["step"], "label_leakage": True},
            )
    record["wall_time_s"] = round(time.time() - t0, 1)
    return run.write_results(record)


def _run_mlm(cfg: dict[str, Any], run: rundir_lib.RunDir) -> dict[str, Any]:
    """POUF-MLM over the split seeds (spec 2.3): per seed, LM-BFF's k-shot train (unlabeled)
    and dev (selection) splits of that seed and training with that seed; the task's metrics
    on the original evaluation split; per-seed records and their mean / std in results.json.

    Each finished seed is kept as ``seeds/<seed>.json``: a run stopped between seeds resumes
    with the next one.
    """
    from jaxprompt.side import mlm

    workdir = run.workdir
    t0 = time.time()
    m, d, o = cfg["method"], cfg["data"], cfg["optim"]
    k = int(d.get("k_shot", 0))
    seeds = [int(s) for s in (cfg.get("seeds") or [cfg["seed"]])]
    select_on_dev = bool(cfg.get("select_on_dev", k > 0))
    if select_on_dev and k <= 0:
        raise experiment.ConfigError(
            "select_on_dev needs the k-shot dev split: set data.k_shot=16, or "
            "select_on_dev=False (the last step is the result)"
        )
    if len(set(seeds)) != len(seeds):
        raise experiment.ConfigError(f"seeds {seeds} repeat a seed: list each seed once")
    data = mlm.load_text_dataset(
        d["dataset"], task=d.get("task") or None, data_dir=d.get("data_dir") or None
    )
    if int(d.get("limit", 0)) > 0:
        data.split["test"] = data.split["test"][: int(d["limit"])]
    # Every seed's splits before any weight loads or anything is written: a pool too small
    # for k fails here, in one line.
    splits = {s: mlm.kshot_dataset(data, k=k, seed=s) if k > 0 else data for s in seeds}
    model = mlm.load_mlm(cfg["mlm"]["name"])
    run.open()
    eval_bs = int(cfg.get("eval_batch_size", 32))
    done_dir = run / "seeds"
    per_seed: list[dict[str, Any]] = []
    zero_shot: dict[str, float] | None = None
    for seed in seeds:
        done = done_dir / f"{seed}.json"
        if done.exists():
            rec = json.loads(done.read_text())
            zero_shot = zero_shot or rec["metrics"]["zero_shot"]
            log.info("seed %d finished earlier (%s): kept", seed, done)
        else:
            if zero_shot is None:  # no training: the same for every seed, evaluated once
                zero_shot = mlm.evaluate(
                    model, model.params, data.split["test"], task=data.task, batch_size=eval_bs
                )
            res = mlm.adapt(
                model, splits[seed],
                steps=int(o["steps"]), batch_size=int(o["batch_size"]), lr=float(o["lr"]),
                w_transport=float(m["w_transport"]), w_info=float(m["w_info"]),
                scale=float(m["scale"]), feature_gelu=m["feature_gelu"],
                dropout=bool(m["dropout"]), seed=seed,
                eval_every=int(cfg.get("eval_every", 100)), eval_batch_size=eval_bs,
                select_on_dev=select_on_dev,
                select_with_target_labels=bool(cfg.get("select_with_target_labels", False)),
                zero_shot=False, log_every=int(cfg.get("log_every", 50)),
                metrics_path=os.path.join(workdir, "metrics.jsonl"), log_fields={"seed": seed},
            )  # fmt: skip
            drop = ("params", "best_params_by_dev", "metrics")
            rec = {
                "seed": seed,
                "metrics": {"zero_shot": zero_shot, **res["metrics"]},
                **{key: v for key, v in res.items() if key not in drop},
            }
            if rundir_lib.is_main():
                done_dir.mkdir(parents=True, exist_ok=True)
                rundir_lib.write_json(done, rec)
        per_seed.append(rec)
    metric = per_seed[0]["metric"]
    columns = list(per_seed[0]["metrics"])
    # {column: {metric: {"mean", "std" (population, np.std), "n"}}} over the seeds.
    summary = {c: eval_lib.summarize_seeds([r["metrics"][c] for r in per_seed]) for c in columns}
    record: dict[str, Any] = {
        # The run directory's tables and sweeps read "accuracy": it holds the mean over the
        # seeds of the task's main metric (``metric``: acc, or f1 / mcc / pearson), percent.
        "accuracy": {c: round(summary[c][metric]["mean"], 2) for c in columns},
        "std": {c: round(summary[c][metric]["std"], 2) for c in columns},
        "metric": metric,
        "summary": summary,
        "per_seed": per_seed,
        "protocol": "adapt",
        "method": "pouf_mlm",
        "model": cfg["mlm"]["name"],
        "dataset": d["dataset"],
        "task": data.task.name,
        "seeds": seeds,
        "k_shot": k,
        "selection": per_seed[0]["selection"],
        "steps": int(o["steps"]),
        "batch_size": int(o["batch_size"]),
        "n_test": per_seed[0]["n_test"],
    }
    if len(seeds) == 1:
        record["seed"] = seeds[0]
    record["wall_time_s"] = round(time.time() - t0, 1)
    return run.write_results(record)
