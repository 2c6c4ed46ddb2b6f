"""A small CLIP pretrained contrastively on the toy world: the offline foundation model.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020 (InfoNCE with a learned temperature), at toy scale: a Hugging Face
CLIP in Hugging Face's layout (ViT, 4 layers, width 128 per tower) and a word-level tokenizer,
trained from scratch on captions of toy-world images, saved as a Hugging Face directory
(:func:`jaxprompt.testing.save_clip_weights`) and loaded back through :func:`jaxprompt.load_clip`
like any checkpoint.

Two choices make the class concept learnable within minutes on two CPU cores:

* each image is contrasted against a set of *distinct* captions of the world (its batch's true
  captions plus random others, or all 576), not against the other captions of its batch:
  duplicate captions in a batch would be false negatives;
* an image has two true captions, its class's alias ("bullseye photo.") and a class name with
  its colour ("red rings photo."); the target puts half its mass on each.

The class name in the second caption is loose: with probability ``name_noise`` it is the name
of the image's partner class (:data:`toyworld.PARTNERS`). The image encoder learns every class
exactly from the aliases; zero-shot prompts, which use the class names, separate partners by a
thin margin. So a probe on the frozen features beats zero-shot by far, as on the fine-grained
datasets where prompt learning pays off (:func:`linear_probe_accuracy` measures that room).

The other styles appear in only a fraction of the pretraining images, so zero-shot accuracy on
them is below the photo style: the domain shift the generalisation protocols need.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt import backbones, testing
from jaxprompt import clip as clip_lib
from jaxprompt.data import toyworld

log = logging.getLogger(__name__)

MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


def normalise(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 normalised with CLIP's mean and std."""
    return ((images_uint8.astype(np.float32) / 255.0) - MEAN) / STD


def pretraining_pool(
    *, photo_per_class: int, other_per_class: int, seed: int, name_noise: float = 0.0
):
    """Images and their caption targets for pretraining (disjoint from the protocol splits).

    Returns:
      ``(images uint8 [N, 32, 32, 3], targets int32 [N, 2])``: indices into
      :func:`toyworld.caption_set` of the two true captions of each image (its alias, and a
      class name with its colour). With probability ``name_noise`` that class name is its
      partner class's (:data:`toyworld.PARTNERS`).
    """
    caps = {c: i for i, c in enumerate(toyworld.caption_set())}
    imgs, targets = [], []
    for style in toyworld.STYLES:
        per = photo_per_class if style == "photo" else other_per_class
        for cls in range(len(toyworld.CLASSES)):
            for j in range(per):
                r = toyworld._rng("toy-pretrain", seed, style, cls, j)
                names = list(toyworld.COLOURS)
                fg = names[r.integers(len(names))]
                bg = names[(names.index(fg) + 1 + r.integers(len(names) - 1)) % len(names)]
                imgs.append(toyworld.render(cls, fg, bg, style, r))
                name = toyworld.CLASSES[cls]
                said = toyworld.PARTNERS[name] if r.random() < name_noise else name
                a, b = toyworld.captions(style, name, fg, said=said)
                targets.append((caps[a], caps[b]))
    return np.stack(imgs), np.asarray(targets, np.int32)


def zero_shot_accuracy(
    clip: clip_lib.Clip,
    *,
    style: str,
    split: str = "test",
    seed: int = 0,
    images=None,
    classes: Sequence[int] | None = None,
) -> float:
    """Top-1 zero-shot accuracy (%) on a toy split with "a photo of a {}." prompts.

    ``classes`` restricts the label space (and the test images) to those class indices, as the
    base-to-novel protocol does; default all 16.
    """
    cls = np.arange(len(toyworld.CLASSES)) if classes is None else np.asarray(classes)
    prompts = [f"a photo of a {toyworld.CLASSES[c]}." for c in cls]
    ids, eot = clip_lib.tokenize(clip, prompts)
    txt = clip_lib.normalize(clip_lib.encode_token_ids(clip, jnp.asarray(ids), jnp.asarray(eot)))
    images, attrs = images or toyworld.images(split, style=style, seed=seed)
    labels = np.asarray([a["label"] for a in attrs])
    keep = np.isin(labels, cls)
    feats = image_features(clip, images[keep])
    pred = cls[np.argmax(feats @ np.asarray(txt).T, -1)]
    return 100.0 * float(np.mean(pred == labels[keep]))


# Module level so that one compilation serves every call (pretraining's progress lines).
_encode_images = jax.jit(lambda c, x: clip_lib.normalize(clip_lib.encode_image(c, x)))


def image_features(clip: clip_lib.Clip, images_uint8: np.ndarray, batch: int = 256) -> np.ndarray:
    """Normalised frozen image features of uint8 NHWC toy images, float32 [N, D]."""
    return np.concatenate(
        [
            np.asarray(_encode_images(clip, jnp.asarray(normalise(images_uint8[i : i + batch]))))
            for i in range(0, len(images_uint8), batch)
        ]
    )


def linear_probe_accuracy(
    clip: clip_lib.Clip,
    *,
    classes: Sequence[int] | None = None,
    style: str = "photo",
    seed: int = 0,
    steps: int = 500,
    weight_decay: float = 1e-3,
) -> float:
    """Top-1 (%) of a logistic regression on frozen image features (all train images).

    The ceiling of what the frozen features know about the classes: a foundation model leaves
    room to adapt when this is well above zero-shot accuracy on the same classes.

    Args:
      clip: the model.
      classes: class indices to probe (default all 16); test images of other classes are left out.
      style: the style of the train and test images.
      seed: world seed.
      steps: full-batch Adam steps (the problem is convex; 500 converge).
      weight_decay: L2 penalty on the weights.
    """
    cls = np.arange(len(toyworld.CLASSES)) if classes is None else np.asarray(classes)
    data = []
    for split in ("train", "test"):
        imgs, attrs = toyworld.images(split, style=style, seed=seed)
        labels = np.asarray([a["label"] for a in attrs])
        keep = np.isin(labels, cls)
        data.append((image_features(clip, imgs[keep]), np.searchsorted(cls, labels[keep])))
    (x, y), (xt, yt) = data
    tx = optax.adam(1e-2)

    def loss(p):
        logits = 30.0 * x @ p["w"] + p["b"]
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))
        return ce + weight_decay * jnp.sum(p["w"] ** 2)

    @jax.jit
    def fit(p):
        def body(carry, _):
            p, st = carry
            upd, st = tx.update(jax.grad(loss)(p), st, p)
            return (optax.apply_updates(p, upd), st), None

        return jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[0][0]

    # Features are unit vectors: the scale of 30 puts logits in a trainable range.
    p = fit({"w": jnp.zeros((x.shape[1], len(cls))), "b": jnp.zeros(len(cls))})
    pred = np.argmax(np.asarray(30.0 * xt @ p["w"] + p["b"]), -1)
    return round(100.0 * float(np.mean(pred == yt)), 2)


def pretrain(
    out_dir: str,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    captions_per_step: int = 192,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    photo_per_class: int = 400,
    other_per_class: int = 40,
    name_noise: float = 0.0,
    seed: int = 0,
    log_every: int = 50,
    **shape: int,
) -> dict:
    """Pretrains the toy CLIP and saves it in Hugging Face format to ``out_dir``.

    Args:
      out_dir: output directory (weights, config, tokenizer, ``pretrain.json``).
      steps: optimisation steps.
      batch_size: images per step.
      captions_per_step: distinct captions each image is contrasted with per step (the batch's
        true captions plus random others; at most 576, the whole caption set).
      lr: peak AdamW learning rate (linear warm-up, cosine decay).
      weight_decay: AdamW weight decay.
      warmup: warm-up steps.
      photo_per_class: photo-style pretraining images per class.
      other_per_class: pretraining images per class in each other style.
      name_noise: probability that an image's class-name caption uses its partner's name.
      seed: seed of the images, the initialisation and the batches.
      log_every: steps between progress lines.
      **shape: overrides of the ``"toy"`` preset of :data:`jaxprompt.clip.PRESETS`.

    Returns:
      The report written to ``pretrain.json`` (zero-shot accuracy per style, loss curve).
    """
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    vocab_size = testing.save_word_tokenizer(out_dir, toyworld.vocabulary())
    config = testing.clip_config(vocab_size, preset="toy", **shape)
    tokenizer = clip_lib.load_tokenizer(out_dir)
    params = testing.random_clip_params(config, seed=seed)
    clip = clip_lib.from_params(config, params, tokenizer, name="toy-clip")
    # The temperature starts at CLIP's initial 1/0.07, not the 100 the config stores for
    # finished models; it is learned.
    clip = clip.replace(params={**clip.params, "logit_scale": jnp.asarray(np.log(1 / 0.07))})

    images, targets = pretraining_pool(
        photo_per_class=photo_per_class,
        other_per_class=other_per_class,
        seed=seed,
        name_noise=name_noise,
    )
    images = normalise(images)
    ids, eot = clip_lib.tokenize(clip, toyworld.caption_set())
    ids, eot = jnp.asarray(ids), jnp.asarray(eot)
    n_caps = ids.shape[0]
    log.info("toy CLIP: %d pretraining images, %d captions", len(images), n_caps)

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, clip.params)
    tx = optax.adamw(sched, weight_decay=weight_decay, mask=decay_mask)
    opt_state = tx.init(clip.params)

    n_sub = min(captions_per_step, n_caps)

    def loss_fn(params, x, tgt, sub):
        # tgt indexes into `sub`, the distinct captions of this step.
        c = clip.replace(params=params)
        img = clip_lib.normalize(clip_lib.encode_image(c, x))
        txt = clip_lib.normalize(clip_lib.encode_token_ids(c, ids[sub], eot[sub]))
        scale = jnp.exp(jnp.clip(params["logit_scale"], 0.0, np.log(100.0)))
        logp = jax.nn.log_softmax(scale * img @ txt.T, axis=-1)
        target = 0.5 * (jax.nn.one_hot(tgt[:, 0], n_sub) + jax.nn.one_hot(tgt[:, 1], n_sub))
        loss = -jnp.mean(jnp.sum(target * logp, axis=-1))
        acc = jnp.mean(jnp.argmax(logp, -1)[:, None] == tgt)  # either true caption counts
        return loss, acc

    @jax.jit
    def step(params, opt_state, x, tgt, sub):
        (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, tgt, sub)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss, acc

    def caption_subset(tgt):
        """The batch's true captions plus random distinct others, and tgt re-indexed into it."""
        need = np.unique(tgt)
        if len(need) > n_sub:
            raise ValueError(f"captions_per_step={n_sub} < {len(need)} true captions in a batch")
        rest = np.setdiff1d(np.arange(n_caps), need)
        sub = np.concatenate([need, rng.choice(rest, n_sub - len(need), replace=False)])
        pos = np.full(n_caps, -1, np.int32)
        pos[sub] = np.arange(n_sub)
        return sub.astype(np.int32), pos[tgt]

    rng = np.random.default_rng(seed)
    params = clip.params
    val = toyworld.images("val", style="photo", seed=seed)  # for progress lines only
    # A fixed probe batch: its loss before and after training is the learning signal
    # (single-batch losses along the way are noisy).
    probe_idx = np.random.default_rng(seed + 1).choice(len(images), batch_size, replace=False)
    probe_sub, probe_tgt = caption_subset(targets[probe_idx])
    probe = (jnp.asarray(images[probe_idx]), probe_tgt, probe_sub)
    probe_loss = jax.jit(lambda p, x, t, sub: loss_fn(p, x, t, sub)[0])
    initial_loss = float(probe_loss(params, *probe))
    history = []
    t_start = time.time()
    for s in range(1, steps + 1):
        idx = rng.integers(0, len(images), batch_size)
        x = images[idx]
        # Horizontal flips would turn some classes into others' mirror images only for
        # asymmetric patterns (spiral, zigzag phase); none changes class, so flip freely.
        flip = rng.random(batch_size) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        sub, tgt = caption_subset(targets[idx])
        params, opt_state, loss, acc = step(params, opt_state, jnp.asarray(x), tgt, sub)
        if s % log_every == 0 or s == steps:
            loss, acc = float(loss), float(acc)
            rate = s / (time.time() - t_start)
            zs = zero_shot_accuracy(clip.replace(params=params), style="photo", images=val)
            history.append(
                {"step": s, "loss": round(loss, 4), "caption_acc": round(acc, 4), "val_zs": zs}
            )
            log.info(
                "pretrain step %d/%d loss %.3f caption-acc %.3f val zero-shot %.1f%% "
                "(%.2f steps/s, ETA %.0fs)",
                *(s, steps, loss, acc, zs, rate, (steps - s) / rate),
            )
    final_loss = float(probe_loss(params, *probe))
    params = dict(params)
    # Save with the learned temperature, as CLIP checkpoints do.
    testing.save_clip_weights(out_dir, config, params, weights="flax")
    trained = clip_lib.load_clip(out_dir)
    base = range(len(toyworld.CLASSES) // 2)
    report = {
        "probe_loss": {"initial": round(initial_loss, 4), "final": round(final_loss, 4)},
        "zero_shot_top1": {
            st: round(zero_shot_accuracy(trained, style=st), 2) for st in toyworld.STYLES
        },
        # Base-to-novel's base half: zero-shot against what the frozen features can do.
        "base_classes": {
            "zero_shot_top1": round(zero_shot_accuracy(trained, style="photo", classes=base), 2),
            "linear_probe_top1": linear_probe_accuracy(trained, classes=base),
        },
        "logit_scale": round(float(np.exp(params["logit_scale"])), 3),
        "steps": steps,
        "batch_size": batch_size,
        "captions_per_step": n_sub,
        "lr": lr,
        "seed": seed,
        "pool": {
            "photo_per_class": photo_per_class,
            "other_per_class": other_per_class,
            "name_noise": name_noise,
        },
        "history": history,
        "seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out_dir, "pretrain.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--patch-size", type=int, default=8)
    args = ap.parse_args()
    rep = pretrain(
        args.out_dir, steps=args.steps, batch_size=args.batch_size, patch_size=args.patch_size
    )
    print(json.dumps({k: v for k, v in rep.items() if k != "history"}))


# The recipe of the shipped weights (jaxprompt/assets/toy_clip). They were made by
# `jaxprompt pretrain-toy` with these arguments when the towers were transformers' Flax models,
# whose random initialisation (transformers 4.57's Flax CLIP class) started them. Since the
# towers and their initialisation are jaxprompt's own (testing.random_clip_params), the same
# command trains a model of the same recipe from another starting point, not these weights
# (transformers 5 has no Flax models to redraw the old one). The shipped weights stay as they
# are, so every toy-world number keeps its meaning; the command is deterministic (the same
# weights, bit for bit, on one machine and jax version: tests/test_toyworld.py).
RECIPE: dict = {
    "steps": 1600,
    "batch_size": 128,
    "name_noise": 0.25,
    "other_per_class": 20,
    "seed": 0,
}
RECIPE_HELP: dict = {
    "steps": "optimisation steps (default %(default)s: the shipped weights' recipe)",
    "batch_size": "images per step (default %(default)s)",
    "name_noise": "probability that an image's class-name caption uses its partner's name "
    "(default %(default)s)",
    "other_per_class": "pretraining images per class in each style but photo (default %(default)s)",
    "seed": "seed of the images, the initialisation and the batches (default %(default)s)",
}


def toy_clip_dir() -> str:
    """The toy CLIP's directory: the shipped weights, else a cached copy, else pretrain now.

    Pretraining on first use (when the package ships no weights) writes to
    :func:`jaxprompt.backbones.toy_cache_dir` and takes minutes.
    """
    try:
        return backbones.resolve(backbones.TOY)
    except backbones.CheckpointNotFoundError:
        cache = backbones.toy_cache_dir()
        log.info("no toy CLIP shipped or cached: pretraining one into %s (minutes)", cache)
        pretrain(cache, **RECIPE)
        return cache
