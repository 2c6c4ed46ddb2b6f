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
iterator's position: an interrupted run resumes there), and at the end ``results.json``,
``results.md`` and ``prompt.safetensors``: TPT (its optimiser, steps, views, keep) around the
prompt every episode started from, so ``jaxprompt export`` / ``predict`` / ``push`` take an
adapt run as they take a training run.

Online TPT (``method.reset = "online"``, :func:`make_online_step`): each image starts from the
prompt the previous test image ended with (with ``method.carry_optimizer``, its AdamW state
too), across batches, in the order of :func:`stream` (a seeded shuffle of the test split).
The carry is written beside ``carry.npz`` before each progress file and renamed over it after
(:func:`resume_carry`), and a resumed run reads the one its progress file names, so an online
run killed at any moment ends exactly as an uninterrupted one; at the end ``carry.npz`` holds
the prompt the last image ended with.

Any trained prompt can be the starting point (``init_from``: a run directory, a
``.safetensors``/``.npz`` prompt file, ``hf://USER/NAME``): its meta names the base method, so
IVLP, MaPLe, PromptSRC and Bayesian prompts are tuned as CoOp ones are (see
:mod:`jaxprompt.methods.tpt` for the path each takes).

A run whose ``results.json`` exists is skipped.
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
from jaxprompt import share as share_lib
from jaxprompt.app import console, experiment
from jaxprompt.app import rundir as rundir_lib
from jaxprompt.data import augment as aug_lib
from jaxprompt.methods.tpt import RESETS, episodes, make_optimizer, num_selected, online_episodes

log = logging.getLogger("jaxprompt")

PROGRESS = "progress.json"

# The ImageNet family gets crops + flips only; every other dataset AugMix (spec section 2.1).
IMAGENET_FAMILY = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

__all__ = [
    "batch_views",
    "initial_prompt",
    "load_carry",
    "make_adapt_step",
    "make_online_step",
    "run_adapt",
    "save_carry",
    "use_augmix",
]

CARRY = "carry.npz"  # online TPT: the carried prompt (and optimiser state) after a batch
NEXT = ".next"  # the carry being saved, until the progress file that points at it is written


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
        (``checkpoint.load_prompt``), or a prompt file: ``.safetensors`` (``jaxprompt
        export``), an old ``.npz`` export, or ``hf://USER/NAME[@REV]``
        (``share.read_prompt_file``). A file of a wrapper (a TPT export: its meta names a
        ``base``) gives that base and its prompt.
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
    if share_lib.is_hub_ref(init_from) or source.is_file():
        prompt, meta = share_lib.read_prompt_file(init_from)
    elif source.is_dir():
        prompt, meta = ckpt_lib.load_prompt(init_from)
    else:
        raise experiment.ConfigError(
            f"config.init_from={init_from!r} is neither a run directory nor a prompt file "
            "(.safetensors, .npz or hf://USER/NAME)"
        )
    name = meta.get("method", base_name)
    kwargs = dict(meta.get("method_config") or base_kwargs)
    wrapped = kwargs.get("base")
    if isinstance(wrapped, Mapping) and "method" in wrapped:
        # A wrapper's file (e.g. a TPT export): its prompt is its base's.
        name, kwargs = str(wrapped["method"]), dict(wrapped.get("method_config") or {})
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


def make_online_step(
    base: methods_lib.PromptMethod,
    tx: Any,
    *,
    steps: int,
    views: int,
    keep: float,
    augmix: bool,
    image_size: int,
    carry_optimizer: bool = False,
):
    """The per-batch step of online TPT (``method.reset = "online"``).

    The batch's images are taken in the order of their test-split positions
    (``batch["index"]``; padding rows last, and masked so they leave the carry alone) and run
    as :func:`~jaxprompt.methods.tpt.online_episodes`: image ``i`` starts from the prompt (and,
    with ``carry_optimizer``, the optimiser state) that image ``i - 1`` ended with, across
    batches too. That is the sequential definition exactly, whatever the batch size. The
    zero-shot column is the initial prompt's prediction on view 0 (``base.logits``).

    Returns:
      ``step(prompt0, carry_prompt, carry_state, clip, task, batch, key) -> (sums, prompt,
      state)`` with ``sums`` as in :func:`make_adapt_step`.
    """

    def step(prompt0, prompt, state, clip, task, batch, key):
        v = batch_views(key, batch, views=views, augmix=augmix, image_size=image_size)
        order = jnp.argsort(jnp.asarray(batch["index"]))
        labels = jnp.asarray(batch["label"], jnp.int32)[order]
        mask = jnp.asarray(batch["mask"], bool)[order]
        out = online_episodes(
            base, tx, prompt, clip, task, v[order], steps=steps, keep=keep,
            carry_optimizer=carry_optimizer, opt_state=state, mask=mask,
        )  # fmt: skip
        zero_shot = base.logits(prompt0, clip, task, v[order, 0])
        sums = {
            "tpt": _sums(out["logits"], labels, mask)["correct"],
            "zero_shot": _sums(zero_shot, labels, mask)["correct"],
            "count": jnp.sum(mask.astype(jnp.int32)),
        }
        return sums, out["prompt"], out["opt_state"]

    return step


def save_carry(path: str, prompt: Any, state: Any, batches: int) -> None:
    """Writes online TPT's carry (prompt, optimiser state leaves, batches done) as one ``.npz``
    (no pickle), to a temporary name then renamed."""
    import io

    arrays = {f"prompt.{k}": v for k, v in ckpt_lib.flatten(jax.device_get(prompt)).items()}
    for i, leaf in enumerate(jax.tree.leaves(jax.device_get(state))):
        arrays[f"opt.{i}"] = np.asarray(leaf)
    arrays["batches"] = np.asarray(batches, np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = epath.Path(path + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # over the previous batch's carry


def load_carry(path: str, prompt_like: Any, state_like: Any) -> tuple[Any, Any, int]:
    """Reads :func:`save_carry`'s file -> ``(prompt, state, batches)``, shaped like the given
    trees (``state_like`` ``None``: no optimiser state carried)."""
    import io

    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as z:
        flat = {k: z[k] for k in z.files}
    prompt = ckpt_lib.unflatten_dict(flat, "prompt")
    want = jax.tree.map(np.shape, prompt_like)
    if jax.tree.map(np.shape, prompt) != want:
        raise experiment.ConfigError(f"{path} holds a prompt that does not fit this run")
    prompt = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), prompt)
    state = None
    if state_like is not None:
        leaves, tree = jax.tree.flatten(state_like)
        saved = [flat[f"opt.{i}"] for i in range(len(leaves))]
        state = jax.tree.unflatten(
            tree, [jnp.asarray(a, x.dtype) for a, x in zip(saved, leaves, strict=True)]
        )
    return prompt, state, int(flat["batches"])


def resume_carry(path: str, prompt_like: Any, state_like: Any, batches: int) -> tuple[Any, Any]:
    """The carry saved after ``batches`` batches -> ``(prompt, state)``.

    A save writes ``path + NEXT``, then the progress file, then renames the first over
    ``path``; a run killed between any two of these leaves the carry that its progress file
    names in one of the two files, the other one batch ahead or behind.

    Raises:
      ConfigError: neither file is from batch ``batches`` (one line, naming the fix).
    """
    found = []
    for candidate in (path + NEXT, path):
        if epath.Path(candidate).exists():
            prompt, state, done = load_carry(candidate, prompt_like, state_like)
            if done == batches:
                return prompt, state
            found.append(f"{candidate} is from batch {done}")
    raise experiment.ConfigError(
        f"{'; '.join(found) or f'no {path}'} but {PROGRESS} from batch {batches}: remove them "
        "to start the run again"
    )


def stream(examples: list, *, online: bool, seed: int) -> list:
    """The order online TPT sees the test split in.

    The carried prompt is shaped by the images before it, so the order is part of the result:
    a split stored class by class would show the prompt one class at a time, and the accuracy
    would measure that ordering. The official loader shuffles the test set, seeded by the run's
    ``--seed`` (azshue/TPT ``tpt_classification.py:213-215``, ``DataLoader(shuffle=True)``
    after ``set_random_seed``). Here: the permutation ``np.random.default_rng(seed)``, the same
    on every host and on resume; ``seed < 0`` keeps the stored order. Episodic runs (every
    image independent) keep the stored order.
    """
    if not online or seed < 0:
        return examples
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order]


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
    reset = str(m.get("reset", "episodic"))
    carry_optimizer = bool(m.get("carry_optimizer", False))
    if reset not in RESETS:
        raise experiment.ConfigError(f"method.reset must be one of {RESETS}, got {reset!r}")
    if carry_optimizer and reset != "online":
        raise experiment.ConfigError("method.carry_optimizer=true needs method.reset=online")
    if cfg.get("needs_init_from") and not cfg.get("init_from"):
        raise experiment.ConfigError(
            f"preset {cfg.get('preset')} starts from a trained prompt: set "
            "--config.init_from=DIR (a run directory) or a prompt file (.safetensors)"
        )
    if int(d["batch_size"]) < 1:
        raise experiment.ConfigError(f"data.batch_size={d['batch_size']} must be at least 1")
    ds = experiment._load(d["dataset"], cfg, {})
    clip = experiment.resolve_clip(cfg["clip"]["name"], cfg["clip"]["dtype"])
    names = list(ds.classnames)
    task = clip_lib.make_task(clip, names, template=ds.spec.template)
    key = jax.random.key(int(cfg["seed"]))
    base, prompt, source = initial_prompt(
        cfg.get("init_from", ""), m["base"], m.get("base_kwargs", {}), clip, task, key
    )
    online = reset == "online"
    if online and base.frozen_image is not None and base.frozen_image.per_image:
        raise experiment.ConfigError(
            f"online TPT carries the tuned prompt, but {base.name}'s tuned context depends on "
            "the image: use method.reset=episodic with this base"
        )
    augmix = use_augmix(d.get("augmix", "auto"), ds.spec.name)
    examples = stream(list(ds.split["test"]), online=online, seed=int(d.get("stream_seed", -1)))
    examples = examples[:: max(1, int(d.get("every", 1)))]
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
    if online:
        online_step = jax.jit(
            make_online_step(
                base, tx, steps=steps, views=n_views, keep=keep, augmix=augmix,
                image_size=size, carry_optimizer=carry_optimizer,
            )
        )  # fmt: skip
    else:
        step = jax.jit(
            make_adapt_step(
                base, tx, steps=steps, views=n_views, keep=keep, augmix=augmix, image_size=size,
                cocoop_unnormalized=bool(m.get("cocoop_unnormalized", True)),
            )
        )  # fmt: skip
    clip = shard_lib.shard_clip(clip, mesh)
    task = shard_lib.replicate(task, mesh)
    prompt0 = prompt
    prompt = shard_lib.replicate(prompt, mesh)
    dkey = shard_lib.replicate(key, mesh)
    # Online TPT: the prompt (and optimiser state) carried from image to image, saved beside
    # the progress file so a resumed run carries on from exactly where it stopped.
    carry_path = os.path.join(workdir, CARRY)
    carry_prompt = prompt
    carry_state = tx.init(prompt0) if carry_optimizer else None

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
        if online:
            carry_prompt, carry_state = resume_carry(carry_path, prompt0, carry_state, start)
            carry_prompt = shard_lib.replicate(carry_prompt, mesh)
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
        put = shard_lib.put_batch(local_batch, mesh)
        if online:
            sums, carry_prompt, carry_state = online_step(
                prompt, carry_prompt, carry_state, clip, task, put, dkey
            )
        else:
            sums = step(prompt, clip, task, put, dkey)
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
            if online:  # the carry first: a progress file never points past its carry
                save_carry(carry_path + NEXT, carry_prompt, carry_state, j + 1)
            rundir_lib.write_json(
                progress,
                {"batches": j + 1, "totals": totals, "iterator": batches.get_state()},
            )
            if online:  # only now over the previous carry, which the old progress needs
                os.replace(carry_path + NEXT, carry_path)
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
        "reset": reset,
        "wall_time_s": round(time.time() - t0, 1),
    }
    if online:
        record["carry_optimizer"] = carry_optimizer
        record["stream_seed"] = int(d.get("stream_seed", -1))
        record["stream_head"] = [x.key for x in examples[:8]]  # the order, checkable
        if index == 0:  # the prompt the last test image ended with, kept with the results
            save_carry(carry_path, carry_prompt, carry_state, n_batches)
    if index == 0:
        # The run as one shareable file: TPT around the prompt every episode starts from
        # (`jaxprompt export` / `predict` / `push` take it from here).
        tpt_method = methods_lib.get(
            "tpt", base=base, optimizer=dict(m["optimizer"]), steps=steps, views=n_views,
            keep=keep, augmix=augmix, reset=reset, carry_optimizer=carry_optimizer,
            cocoop_unnormalized=bool(m.get("cocoop_unnormalized", True)),
        )  # fmt: skip
        header = share_lib.prompt_meta(
            method="tpt",
            method_config=dict(tpt_method.config),
            backbone_name=str(cfg["clip"]["name"]),
            fingerprint=share_lib.backbone_fingerprint(clip),
            classnames=names,
            extra={
                "protocol": "adapt", "dataset": ds.spec.name, "template": ds.spec.template,
                "seed": int(cfg["seed"]), "results": accuracy, "init_from": source,
            },
        )  # fmt: skip
        share_lib.save_prompt(os.path.join(workdir, share_lib.HUB_FILENAME), prompt0, header)
    record = run.write_results(record)
    if index == 0:
        for leftover in (progress, carry_path + NEXT):  # a kill's, never read again
            if epath.Path(leftover).exists():
                epath.Path(leftover).unlink()
    return record
