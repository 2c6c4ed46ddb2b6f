"""The ``jaxprompt adapt`` runner: TPT over a dataset's test split, zero-shot beside it.

Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models",
arXiv 2209.07511 (reference github.com/azshue/TPT @63ecbace79694205d7884e63fdc3137a200f0b0e).

Per batch of test images: the host cuts the views of image ``i`` (its global index in the
test split) from the full-resolution image with a random stream keyed by ``(seed, i)``, and
AugMix, when on, is drawn on device from ``fold_in(key(seed), i)``, so the views do not depend
on the batch size, the number of hosts or the order; then
:func:`jaxprompt.methods.tpt.episodes` runs one episode per image, sharded over the ``data``
axis of the mesh. The step-0 logits of view 0 are the initial prompt's (zero-shot)
prediction, so both accuracies come from one pass.

The run directory gets ``config.json``, ``progress.json`` (counts so far and the input
iterator's position: an interrupted run resumes there), and at the end ``results.json`` and
``results.md``. A run whose ``results.json`` exists is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import clip as clip_lib
from jaxprompt import data as data_lib
from jaxprompt import methods as methods_lib
from jaxprompt import sharding as shard_lib
from jaxprompt.app import console, experiment
from jaxprompt.app import rundir as rundir_lib
from jaxprompt.data import augment as aug_lib
from jaxprompt.methods.tpt import episodes, make_optimizer, num_selected

log = logging.getLogger("jaxprompt")

PROGRESS = "progress.json"

# The ImageNet family gets crops + flips only; every other dataset AugMix (spec section 2.1).
IMAGENET_FAMILY = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

__all__ = ["batch_views", "initial_prompt", "make_adapt_step", "run_adapt", "use_augmix"]


def use_augmix(setting: str | bool, dataset: str) -> bool:
    """Resolves ``data.augmix`` (``"auto"``, ``"true"``/``"false"`` or a bool) for a dataset."""
    if isinstance(setting, bool):
        return setting
    s = str(setting).lower()
    if s == "auto":
        return dataset not in IMAGENET_FAMILY
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no"):
        return False
    raise experiment.ConfigError(f"data.augmix must be 'auto', 'true' or 'false', got {setting!r}")


def initial_prompt(
    init_from: str,
    base_name: str,
    base_kwargs: Mapping[str, Any],
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    key: jax.Array,
) -> tuple[methods_lib.PromptMethod, Any, str]:
    """The base method and the prompt every episode starts from.

    Args:
      init_from: ``""`` (the base's own initialisation, e.g. "a photo of a"), a run directory
        (``checkpoint.load_prompt``) or an exported ``.npz`` file (``checkpoint.load_exported``).
      base_name: the configured base method, used when the loaded meta names none.
      base_kwargs: its keyword arguments (a loaded run's own ``method_config`` wins).
      clip: the frozen CLIP.
      task: the test class set.
      key: for the base's initialisation.

    Returns:
      ``(base, prompt, description)``.

    Raises:
      ConfigError: a missing source, or a prompt that does not fit the base.
    """
    if not init_from:
        base = methods_lib.get(base_name, **dict(base_kwargs))
        return base, base.init(key, clip, task), "init"
    source = epath.Path(init_from)  # local or gs://
    if source.is_dir():
        prompt, meta = ckpt_lib.load_prompt(init_from)
    elif source.is_file():
        prompt, meta = ckpt_lib.load_exported(init_from)
    else:
        raise experiment.ConfigError(
            f"config.init_from={init_from!r} is neither a run directory nor an exported .npz"
        )
    name = meta.get("method", base_name)
    kwargs = dict(meta.get("method_config") or base_kwargs)
    base = methods_lib.get(name, **kwargs)
    if base.config.get("remat") is False:
        # Test-time tuning backpropagates through C text sequences: bound the memory where
        # the base offers rematerialisation.
        base = methods_lib.get(name, **{**kwargs, "remat": True})
    like = jax.eval_shape(lambda k: base.init(k, clip, task), key)
    got = jax.tree.map(np.shape, prompt)
    want = jax.tree.map(lambda x: tuple(x.shape), like)
    if got != want:
        raise experiment.ConfigError(
            f"the prompt in {init_from} ({got}) does not fit {name} on this task ({want})"
        )
    prompt = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), prompt)
    return base, prompt, os.path.abspath(init_from) if rundir_lib.is_local(init_from) else init_from


def _sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    correct = (jnp.argmax(logits, axis=-1) == labels) & mask
    return {"correct": jnp.sum(correct.astype(jnp.int32))}


def batch_views(
    key: jax.Array, batch: Mapping[str, Any], *, views: int, augmix: bool, image_size: int
) -> jax.Array:
    """TPT's views of a batch, image ``i``'s drawn from ``fold_in(key, batch["index"][i])``.

    The random resized crops and flips come from the host (``eval_iterator(..., views=V-1)``:
    cut from the full-resolution image, as the reference's torchvision transforms do); AugMix,
    when on, is drawn here from ``fold_in(key, index)``. Keyed by the global test-split index,
    the views of an image are the same whatever batch, host or position it lands in.

    Args:
      key: the run's data key (``key(seed)``).
      batch: ``image`` [B, S, S, 3] normalised view 0, ``views`` uint8 [B, V-1, S, S, 3]
        crops and ``index`` [B] (the images' global positions in the test split).
      views: views per image, view 0 included.
      augmix: AugMix on top of the crops and flips.
      image_size: the view side.

    Returns:
      float32 [B, views, S, S, 3].
    """
    del image_size  # the host made the crops at the model's size
    if batch["views"].shape[1] != views - 1:
        raise ValueError(f"the batch holds {batch['views'].shape[1]} crops, not {views - 1}")
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(batch["index"]))

    def one(k, image, crops):
        return aug_lib.tpt_views_from_crops(k, image, crops, use_augmix=augmix)

    return jax.vmap(one)(keys, batch["image"], batch["views"])


def make_adapt_step(
    base: methods_lib.PromptMethod,
    tx: Any,
    *,
    steps: int,
    views: int,
    keep: float,
    augmix: bool,
    image_size: int,
    cocoop_unnormalized: bool = True,
):
    """The per-batch TPT step: views on device, episodes, zero-shot and TPT correct counts.

    Returns:
      ``step(prompt, clip, task, batch, key) -> {"tpt", "zero_shot", "count"}`` (int32 sums
      over ``batch["mask"]``). ``batch`` holds ``image`` [B, S, S, 3] normalised, ``views``
      uint8 [B, V-1, S, S, 3] host crops, ``label``, ``mask`` and ``index`` [B], the images'
      global positions in the test split.
    """

    def step(prompt, clip, task, batch, key):
        v = batch_views(key, batch, views=views, augmix=augmix, image_size=image_size)
        out = episodes(
            base, tx, prompt, clip, task, v,
            steps=steps, keep=keep, cocoop_unnormalized=cocoop_unnormalized, details=True,
        )  # fmt: skip
        labels = jnp.asarray(batch["label"], jnp.int32)
        mask = jnp.asarray(batch["mask"], bool)
        return {
            "tpt": _sums(out["logits"], labels, mask)["correct"],
            "zero_shot": _sums(out["initial"], labels, mask)["correct"],
            "count": jnp.sum(mask.astype(jnp.int32)),
        }

    return step


def run_adapt(config: Any, workdir: str) -> dict[str, Any]:
    """Runs TPT over the configured dataset's test split (see ``configs/adapt.py``).

    Args:
      config: the resolved config (``ConfigDict`` or dict).
      workdir: the run directory.

    Returns:
      The contents of ``results.json``: ``accuracy`` = ``{"zero_shot", "tpt"}`` top-1 in
      percent, plus the dataset, model, seed, steps, views, image count and wall time.
    """
    cfg = experiment.to_dict(config)
    run = rundir_lib.RunDir(workdir, cfg)
    finished = run.check()
    if finished is not None:
        return finished
    t0 = time.time()
    m, d = cfg["method"], cfg["data"]
    tx = make_optimizer(m["optimizer"])
    n_views, keep, steps = int(m["views"]), float(m["keep"]), int(m["steps"])
    num_selected(n_views, keep)
    if cfg.get("preset") in ("tpt_coop", "tpt_cocoop") and not cfg.get("init_from"):
        raise experiment.ConfigError(
            f"preset {cfg['preset']} starts from a trained prompt: set --config.init_from=DIR"
        )
    ds = experiment._load(d["dataset"], cfg, {})
    clip = experiment.resolve_clip(cfg["clip"]["name"], cfg["clip"]["dtype"])
    names = list(ds.classnames)
    task = clip_lib.make_task(clip, names, template=ds.spec.template)
    key = jax.random.key(int(cfg["seed"]))
    base, prompt, source = initial_prompt(
        cfg.get("init_from", ""), m["base"], m.get("base_kwargs", {}), clip, task, key
    )
    augmix = use_augmix(d.get("augmix", "auto"), ds.spec.name)
    examples = list(ds.split["test"])[:: max(1, int(d.get("every", 1)))]
    if int(d.get("limit", 0)) > 0:
        examples = examples[: int(d["limit"])]
    mesh = experiment._mesh(cfg)
    index, count = jax.process_index(), jax.process_count()
    batch_size = int(d["batch_size"])
    local = mesh.devices.size // count // mesh.shape["model"]
    if batch_size % max(local, 1):
        raise experiment.ConfigError(
            f"data.batch_size={batch_size} must be a multiple of this host's {local} "
            "data-parallel devices"
        )
    size = clip.spec.image_size
    run.open()
    batches = data_lib.eval_iterator(
        examples,
        ds.fetch,
        batch_size=batch_size,
        image_size=size,
        # TPT's 63 random resized crops + flips, cut on the host from the full-resolution
        # image (the reference's torchvision transforms), keyed by (seed, test index).
        views=n_views - 1,
        seed=int(cfg["seed"]),
        prefetch=2,  # a batch of 8 holds 8 x 63 crops: ~75 MB at 224 px
    )
    step = jax.jit(
        make_adapt_step(
            base, tx, steps=steps, views=n_views, keep=keep, augmix=augmix, image_size=size,
            cocoop_unnormalized=bool(m.get("cocoop_unnormalized", True)),
        )
    )  # fmt: skip
    clip = shard_lib.shard_clip(clip, mesh)
    task = shard_lib.replicate(task, mesh)
    prompt = shard_lib.replicate(prompt, mesh)
    dkey = shard_lib.replicate(key, mesh)

    totals = {"tpt": 0, "zero_shot": 0, "count": 0}
    start = 0
    progress = os.path.join(workdir, PROGRESS)
    # Where to resume is process 0's reading of the progress file, the same on every host.
    saved = shard_lib.decide_once(
        lambda: (
            json.loads(epath.Path(progress).read_text()) if epath.Path(progress).exists() else None
        )
    )
    if saved is not None:
        batches.set_state(saved["iterator"])
        totals, start = saved["totals"], int(saved["batches"])
        log.info("resuming at batch %d (%d images done)", start, totals["count"])
    log.info(
        "TPT on %s: %d test images, %d classes, %d views (keep %d), %d step(s), augmix=%s, "
        "prompt from %s",
        ds.spec.name, len(examples), len(names), n_views, num_selected(n_views, keep),
        steps, augmix, source,
    )  # fmt: skip
    n_batches = len(batches)
    bar = console.Progress(len(examples), "tpt", unit="images")
    bar.done = int(totals["count"])
    for j in range(start, n_batches):
        local_batch = dict(next(batches))
        # Global test-split index of each row: host `index` holds padded positions index,
        # index + count, ... (eval_iterator's sharding), batch j rows j*B .. j*B + B - 1.
        rows = np.arange(j * batch_size, (j + 1) * batch_size)
        local_batch["index"] = (index + rows * count).astype(np.int32)
        sums = step(prompt, clip, task, shard_lib.put_batch(local_batch, mesh), dkey)
        sums = jax.device_get(sums)
        for k in totals:
            totals[k] += int(sums[k])
        n = max(totals["count"], 1)
        bar.update(
            int(sums["count"]),
            note=f"zero-shot {100.0 * totals['zero_shot'] / n:.2f}% "
            f"TPT {100.0 * totals['tpt'] / n:.2f}%",
        )
        last = j == n_batches - 1
        if ((j + 1) % int(cfg.get("save_every", 50)) == 0 and not last) and index == 0:
            rundir_lib.write_json(
                progress,
                {"batches": j + 1, "totals": totals, "iterator": batches.get_state()},
            )
    bar.close()
    n = max(totals["count"], 1)
    accuracy = {
        "zero_shot": round(100.0 * totals["zero_shot"] / n, 2),
        "tpt": round(100.0 * totals["tpt"] / n, 2),
    }
    record = {
        "accuracy": accuracy,
        "protocol": "adapt",
        "method": "tpt",
        "preset": cfg.get("preset", "tpt"),
        "base": base.name,
        "init_from": source,
        "model": cfg["clip"]["name"],
        "dataset": ds.spec.name,
        "n": totals["count"],
        "seed": int(cfg["seed"]),
        "steps": steps,
        "views": n_views,
        "augmix": augmix,
        "wall_time_s": round(time.time() - t0, 1),
    }
    record = run.write_results(record)
    if index == 0 and epath.Path(progress).exists():
        epath.Path(progress).unlink()
    return record
