"""Host-side input pipeline: decoding, CLIP eval preprocessing, train crops, grain iterators.

Reading needs no TensorFlow: records come from ``tfds.data_source`` (array_record) or from image
files, and grain does shuffling, per-host sharding and threaded prefetching. Iterator position is
a small JSON-able dict, so a checkpoint can store it and a resumed run sees the same batches.

What the iterators yield (all numpy, batch-major, NHWC):

* eval: ``{"image": float32 [B, S, S, 3]`` normalised with the CLIP mean/std (PIL bicubic resize
  of the shorter side to S, then center crop: bit-for-bit the CoOp/CLIP test transform),
  ``"label": int32 [B]``, ``"mask": bool [B]}``. Batches are always full: the last one is padded
  with ``mask=False, label=-1`` entries so every host runs the same number of equal-shape steps.
* train: ``{"image": uint8 [B, S, S, 3]`` the random resized crop + flip of each image, made on
  the host from the full-resolution image with PIL (the same box algorithm and resampling as
  torchvision's ``RandomResizedCrop`` on a PIL image), ``"label": int32 [B]}``; the device only
  normalises (``jaxprompt.data.augment.normalize_batch``). Epochs follow Dassl: a fresh shuffle
  each, ``floor(n / global batch)`` full batches, the remainder dropped.
* tpt: eval fields plus ``"raw"`` and ``"size"`` (a canvas, for ``augment.tpt_views``), or with
  ``views=V`` the ``"views"`` uint8 [B, V, S, S, 3] bilinear crops + flips of the full image.
"""

from __future__ import annotations

import functools
import io
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from jaxprompt.data.protocol import Example

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
TRAIN_CANVAS = 512

# A fetch function reads the image of one example: encoded bytes, or an already decoded array.
Fetch = Callable[[Example], "bytes | np.ndarray"]


# ------------------------------------------------------------------------------------------------
# Decoding and preprocessing (pure numpy / PIL)
# ------------------------------------------------------------------------------------------------


def to_pil_rgb(data: bytes | np.ndarray | Image.Image) -> Image.Image:
    """Decodes to an RGB PIL image as CoOp does (``Image.open(...).convert("RGB")``).

    Grey, palette and CMYK images become RGB; an alpha channel is dropped (not composited),
    which is what ``convert("RGB")`` does.
    """
    if isinstance(data, Image.Image):
        img = data
    elif isinstance(data, bytes | bytearray | memoryview):
        img = Image.open(io.BytesIO(bytes(data)))
    else:
        arr = np.asarray(data)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        img = Image.fromarray(arr.astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes | np.ndarray | Image.Image) -> np.ndarray:
    """Decodes to a uint8 [H, W, 3] array (see ``to_pil_rgb``)."""
    return np.asarray(to_pil_rgb(data), dtype=np.uint8)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: shorter side to ``size``, longer side
    ``int(size * long / short)`` (truncated), PIL bicubic (antialiased when shrinking)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop``: offsets ``int(round((h - size) / 2))`` (Python rounding)."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (or 0..255 float) HWC pixels -> float32 ``(x/255 - mean) / std``."""
    x = np.asarray(pixels, np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def eval_transform(data: bytes | np.ndarray | Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """CLIP/CoOp test transform: decode, bicubic short-side resize, center crop, normalise.

    Returns:
      float32 [size, size, 3].
    """
    img = center_crop(resize_shorter(to_pil_rgb(data), size), size)
    return normalize(np.asarray(img))


def to_canvas(
    data: bytes | np.ndarray | Image.Image, canvas: int = TRAIN_CANVAS
) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels on a fixed canvas for on-device augmentation.

    Images whose longer side exceeds ``canvas`` are shrunk (PIL bicubic, aspect kept); smaller
    images are not enlarged. The image is pasted top-left on a zero canvas.

    Returns:
      ``(pixels uint8 [canvas, canvas, 3], size int32 [2] = (height, width))``.
    """
    img = to_pil_rgb(data)
    w, h = img.size
    if max(w, h) > canvas:
        scale = canvas / max(w, h)
        w, h = max(1, min(canvas, round(w * scale))), max(1, min(canvas, round(h * scale)))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    out = np.zeros((canvas, canvas, 3), np.uint8)
    out[:h, :w] = np.asarray(img)
    return out, np.asarray([h, w], np.int32)


# ------------------------------------------------------------------------------------------------
# Train-time crops on the host, from the full-resolution image
# ------------------------------------------------------------------------------------------------

# The train transforms of the references (``data.augment`` in the configs):
#   "coop": CoOp/Dassl (protocol spec 6): RandomResizedCrop(S, bicubic) of the image + flip.
#   "pouf": POUF/tllib (pouf spec 1.1): square resize to round(S * 256 / 224) (256 for 224;
#           PIL's default bicubic, aspect ratio ignored), RandomResizedCrop(S) with
#           torchvision's default bilinear, flip.
TRAIN_AUGMENTS: tuple[str, ...] = ("coop", "pouf")
# Tags that keep the random streams of one seed apart (SeedSequence entropy words).
_SHUFFLE_STREAM, _CROP_STREAM, _VIEW_STREAM = 0, 1, 2


def sample_crop_box(
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """The crop box of torchvision's ``RandomResizedCrop`` (its documented algorithm).

    Each attempt draws an area ``U(scale) * height * width`` and an aspect ratio (width / height)
    log-uniform in ``ratio``, rounds the side lengths, and is accepted if the box fits; the
    top-left corner is then uniform over the integer positions. After ``attempts`` misses the
    whole image is taken, cropped to the nearest ratio in range, centred.

    Draw order (what a replay must follow): per attempt ``uniform(scale)``,
    ``uniform(log ratio)``; on acceptance ``integers(0, height - h + 1)`` then
    ``integers(0, width - w + 1)``.

    Args:
      rng: the random stream (numpy, seeded by the caller).
      height: image height in pixels.
      width: image width in pixels.
      scale: range of the crop area as a fraction of the image area.
      ratio: range of the crop aspect ratio (width / height).
      attempts: tries before the centred fallback.

    Returns:
      ``(top, left, crop_height, crop_width)`` in pixels.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        # Python's round (half to even), as the reference rounds the sides.
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resized_crop(
    img: Image.Image, *, box: tuple[int, int, int, int], size: int, method: str = "bicubic"
) -> Image.Image:
    """``img[top:top+h, left:left+w]`` resampled to ``size x size`` with PIL.

    Crop first, then resize: the filter sees only the crop's pixels (clamped at its edges), as
    torchvision's ``resized_crop`` on a PIL image does. ``Image.resize(box=...)`` would read
    the pixels around the box and differ along the border.

    Args:
      img: the full-resolution image.
      box: ``(top, left, height, width)`` (``sample_crop_box``).
      size: output side.
      method: ``"bicubic"`` or ``"bilinear"`` (PIL filters, antialiased when shrinking).
    """
    top, left, h, w = box
    return img.crop((left, top, left + w, top + h)).resize((size, size), _RESAMPLE[method])


def train_view(
    img: Image.Image,
    rng: np.random.Generator,
    *,
    size: int,
    augment: str = "coop",
    scale: tuple[float, float] = (0.08, 1.0),
) -> np.ndarray:
    """One train view of a decoded image: the reference's crop, resize and flip (no normalise).

    Args:
      img: the RGB image at full resolution.
      rng: this example's random stream for this epoch.
      size: output side (the model's image size).
      augment: one of ``TRAIN_AUGMENTS`` (see there).
      scale: RandomResizedCrop area range.

    Returns:
      uint8 [size, size, 3].
    """
    if augment == "pouf":
        side = round(size * 256 / 224)
        img = img.resize((side, side), Image.Resampling.BICUBIC)
        method = "bilinear"
    elif augment == "coop":
        method = "bicubic"
    else:
        raise ValueError(f"unknown train augmentation {augment!r}; choose one of {TRAIN_AUGMENTS}")
    box = sample_crop_box(rng, height=img.height, width=img.width, scale=scale)
    out = np.asarray(resized_crop(img, box=box, size=size, method=method))
    if rng.random() < 0.5:  # RandomHorizontalFlip(p=0.5)
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.uint8)


def tpt_crops(img: Image.Image, rng: np.random.Generator, *, n: int, size: int) -> np.ndarray:
    """TPT's augmented views before AugMix: ``RandomResizedCrop(size)`` (torchvision defaults:
    scale 0.08-1, **bilinear**) of the full image, then a horizontal flip, ``n`` times.

    Returns:
      uint8 [n, size, size, 3].
    """
    out = np.empty((n, size, size, 3), np.uint8)
    for v in range(n):
        box = sample_crop_box(rng, height=img.height, width=img.width)
        x = np.asarray(resized_crop(img, box=box, size=size, method="bilinear"))
        out[v] = x[:, ::-1] if rng.random() < 0.5 else x
    return out


def example_rng(seed: int, *, stream: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of example ``index`` in ``epoch``: the same whatever the host count,
    the batch it lands in, the threads or a resume."""
    words = [seed & 0xFFFF_FFFF_FFFF_FFFF, stream, epoch, index]  # SeedSequence wants >= 0
    return np.random.default_rng(np.random.SeedSequence(words))


# ------------------------------------------------------------------------------------------------
# grain sources and iterators
# ------------------------------------------------------------------------------------------------


class ExampleSource:
    """Random-access source over a list of examples; ``index = -1`` gives a padding record."""

    def __init__(
        self, examples: Sequence[Example], fetch: Fetch, indices: Sequence[int] | None = None
    ):
        self.examples = list(examples)
        self.fetch = fetch
        self.indices = list(range(len(self.examples))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        if j < 0:
            return {"image": None, "label": -1, "mask": False, "index": -1}
        x = self.examples[j]
        return {"image": self.fetch(x), "label": x.label, "mask": True, "index": j}


def canvas_size(image_size: int) -> int:
    """The side of the canvas an image is decoded into before on-device random resized crops.

    Four times the crop (the crops sample from the full image, so it keeps detail), between
    64 and 512 pixels: 512 for ViT-B/16's 224, 128 for the toy CLIP's 32.
    """
    return min(512, max(64, 4 * image_size))


def _host_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is not None:
        return shard
    import jax  # imported lazily: the pure-numpy parts of this module need no jax

    return jax.process_index(), jax.process_count()


class DataIterator:
    """A batch iterator with a checkpointable position.

    ``get_state()`` returns a small JSON-able dict; ``set_state(state)`` on a freshly built
    iterator with the same arguments continues with exactly the batches that would have followed.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        read_options: grain.ReadOptions,
        num_batches: int | None,
        batches_per_epoch: int | None = None,
    ):
        self._dataset = dataset
        self._read_options = read_options
        self.num_batches = num_batches  # None for the endless train stream
        self.batches_per_epoch = batches_per_epoch  # train: floor(n / global batch)
        self._it = dataset.to_iter_dataset(read_options).__iter__()

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the train iterator is endless")
        return self.num_batches

    def get_state(self) -> dict[str, Any]:
        """The iterator position (JSON-serialisable)."""
        return dict(self._it.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position saved by ``get_state``."""
        self._it.set_state(state)


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    # grain only runs as many threads in parallel as it has prefetch slots.
    prefetch = max(prefetch, num_threads)
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def _eval_record(
    size: int, with_raw: bool, canvas: int, views: int, seed: int
) -> Callable[[dict], dict]:
    def fn(rec: dict) -> dict:
        out: dict[str, Any] = {"label": np.int32(rec["label"]), "mask": np.bool_(rec["mask"])}
        if rec["image"] is None:
            out["image"] = np.zeros((size, size, 3), np.float32)
            if with_raw:
                out["raw"] = np.zeros((canvas, canvas, 3), np.uint8)
                out["size"] = np.asarray([1, 1], np.int32)
            if views:
                out["views"] = np.zeros((views, size, size, 3), np.uint8)
            return out
        img = to_pil_rgb(rec["image"])  # decode once for all views
        out["image"] = eval_transform(img, size)
        if with_raw:
            out["raw"], out["size"] = to_canvas(img, canvas)
        if views:
            # Keyed by the position in `examples`: an image's views do not depend on the
            # batch, host or resume point.
            rng = example_rng(seed, stream=_VIEW_STREAM, epoch=0, index=rec["index"])
            out["views"] = tpt_crops(img, rng, n=views, size=size)
        return out

    return fn


def eval_iterator(
    examples: Sequence[Example],
    fetch: Fetch,
    *,
    batch_size: int,
    image_size: int = IMAGE_SIZE,
    tpt: bool = False,
    canvas: int = TRAIN_CANVAS,
    views: int = 0,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    num_threads: int = 8,
    prefetch: int = 8,
) -> DataIterator:
    """Sequential, padded, per-host-sharded eval batches (see the module docstring).

    Args:
      examples: the examples to evaluate, in order.
      fetch: reads one example's image (``LoadedDataset.fetch``).
      batch_size: per-host batch size.
      image_size: crop size (224 for CLIP ViT-B/16).
      tpt: also yield ``raw``/``size`` for TPT's augmented views.
      canvas: canvas side for ``raw``.
      views: also yield ``views`` uint8 [B, views, S, S, 3]: TPT's random resized crops
        (bilinear) + flips of the full-resolution image (``tpt_crops``), for
        ``augment.tpt_views_from_crops``.
      seed: seed of ``views`` (example ``i``'s are drawn from ``(seed, i)``).
      shard: ``(index, count)`` of this host; defaults to ``jax.process_index/count()``.
      num_threads: decoding threads.
      prefetch: batches prefetched.

    Returns:
      A ``DataIterator`` of ``len(...)`` batches; host ``i`` sees examples ``i, i+count, ...``.
    """
    index, count = _host_shard(shard)
    per_step = batch_size * count
    n_batches = max(1, math.ceil(len(examples) / per_step))
    padded = list(range(len(examples))) + [-1] * (n_batches * per_step - len(examples))
    src = ExampleSource(examples, fetch, padded[index::count])
    ds = (
        grain.MapDataset.source(src)
        .map(_eval_record(image_size, tpt, canvas, views, seed))
        .batch(batch_size, drop_remainder=True)
    )
    return DataIterator(ds, _read_options(num_threads, prefetch), n_batches)


class EpochSource:
    """The endless train stream with Dassl's epochs, as a random-access source.

    Position ``t`` of the global stream is in epoch ``e = t // (batches * global_batch)``:
    each epoch is its own permutation of the ``n`` examples (seeded by ``(seed, e)``), of which
    the first ``floor(n / global_batch) * global_batch`` are used, so a global batch never
    mixes two epochs and the last partial batch is dropped (PyTorch's ``RandomSampler`` +
    ``drop_last``).
    """

    def __init__(self, examples: Sequence[Example], fetch: Fetch, *, global_batch: int, seed: int):
        self.examples = list(examples)
        self.fetch = fetch
        self.seed = seed
        self.batches_per_epoch = len(self.examples) // global_batch
        self.per_epoch = self.batches_per_epoch * global_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(self.examples)} training examples make no full global batch of "
                f"{global_batch}"
            )
        # Epochs are read in order (prefetching may touch the next one): a small cache.
        self._permutations = functools.lru_cache(maxsize=4)(self._permutation)

    def __len__(self) -> int:
        return sys.maxsize  # endless; grain slices and batches it lazily

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the examples in ``epoch`` (a permutation of ``range(n)``)."""
        return self._permutations(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = example_rng(self.seed, stream=_SHUFFLE_STREAM, epoch=epoch, index=0)
        return rng.permutation(len(self.examples))

    def position(self, t: int) -> tuple[int, int]:
        """``(epoch, example index)`` at position ``t`` of the global stream."""
        epoch, r = divmod(t, self.per_epoch)
        return epoch, int(self.permutation(epoch)[r])

    def __getitem__(self, t: int) -> dict[str, Any]:
        epoch, j = self.position(t)
        x = self.examples[j]
        return {"image": self.fetch(x), "label": x.label, "epoch": epoch, "index": j}


def _train_record(
    seed: int, size: int, augment: str, scale: tuple[float, float]
) -> Callable[[dict], dict]:
    def fn(rec: dict) -> dict:
        rng = example_rng(seed, stream=_CROP_STREAM, epoch=rec["epoch"], index=rec["index"])
        img = to_pil_rgb(rec["image"])
        view = train_view(img, rng, size=size, augment=augment, scale=scale)
        return {"image": view, "label": np.int32(rec["label"])}

    return fn


def train_iterator(
    examples: Sequence[Example],
    fetch: Fetch,
    *,
    batch_size: int,
    seed: int,
    image_size: int = IMAGE_SIZE,
    augment: str = "coop",
    scale: tuple[float, float] = (0.08, 1.0),
    shard: tuple[int, int] | None = None,
    num_threads: int = 8,
    prefetch: int = 8,
) -> DataIterator:
    """Endless train batches with Dassl's epochs, augmented on the host (see module docstring).

    Every epoch is a fresh shuffle cut into ``floor(n / (batch_size * count))`` full global
    batches (the remainder is dropped: no batch straddles two epochs), so step ``s`` is in epoch
    ``s // batches_per_epoch`` as in the reference trainers. Host ``i`` takes every
    ``count``-th element of each global batch, so the union of the host batches is the same
    whatever the host count. Crops and flips are drawn from ``(seed, epoch, example)``.

    Args:
      examples: the (few-shot) train examples.
      fetch: reads one example's image.
      batch_size: per-host batch size.
      seed: data seed (shuffle, crops and flips).
      image_size: output side (the model's image size).
      augment: the train transform, one of ``TRAIN_AUGMENTS`` (``"coop"``, ``"pouf"``).
      scale: RandomResizedCrop area range.
      shard: ``(index, count)`` of this host; defaults to ``jax.process_index/count()``.
      num_threads: decoding threads.
      prefetch: batches prefetched.

    Returns:
      A ``DataIterator`` whose ``batches_per_epoch`` is ``floor(n / global batch)``.
    """
    if not examples:
        raise ValueError("no training examples")
    if augment not in TRAIN_AUGMENTS:
        raise ValueError(f"unknown train augmentation {augment!r}; choose one of {TRAIN_AUGMENTS}")
    index, count = _host_shard(shard)
    src = EpochSource(examples, fetch, global_batch=batch_size * count, seed=seed)
    ds = grain.MapDataset.source(src)[index::count]
    ds = ds.map(_train_record(seed, image_size, augment, tuple(scale)))
    ds = ds.batch(batch_size, drop_remainder=True)
    return DataIterator(ds, _read_options(num_threads, prefetch), None, src.batches_per_epoch)
