"""Host-side input pipeline: decoding, CLIP eval preprocessing, grain iterators.

Reading needs no TensorFlow: records come from ``tfds.data_source`` (array_record) or from image
files, and grain does shuffling, per-host sharding and threaded prefetching. Iterator position is
a small JSON-able dict, so a checkpoint can store it and a resumed run sees the same batches.

What the iterators yield (all numpy, batch-major, NHWC):

* eval: ``{"image": float32 [B, S, S, 3]`` normalised with the CLIP mean/std (PIL bicubic resize
  of the shorter side to S, then center crop: bit-for-bit the CoOp/CLIP test transform),
  ``"label": int32 [B]``, ``"mask": bool [B]}``. Batches are always full: the last one is padded
  with ``mask=False, label=-1`` entries so every host runs the same number of equal-shape steps.
* train: ``{"image": uint8 [B, C, C, 3]`` raw pixels on a fixed canvas (the image scaled down so
  its longer side is at most C, pasted top-left, zero padding), ``"size": int32 [B, 2]`` the valid
  (height, width), ``"label": int32 [B]}``. Random-resized-crop, flip and normalisation then run on
  the device with ``jaxprompt.data.augment.train_augment`` (jit-able, explicit key).
* tpt: eval fields plus ``"raw"`` and ``"size"`` as in train, for ``augment.tpt_views``.
"""

from __future__ import annotations

import io
import math
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
            return {"image": None, "label": -1, "mask": False}
        x = self.examples[j]
        return {"image": self.fetch(x), "label": x.label, "mask": True}


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
        self, dataset: grain.MapDataset, read_options: grain.ReadOptions, num_batches: int | None
    ):
        self._dataset = dataset
        self._read_options = read_options
        self.num_batches = num_batches  # None for the endless train stream
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


def _eval_record(size: int, with_raw: bool, canvas: int) -> Callable[[dict], dict]:
    def fn(rec: dict) -> dict:
        out: dict[str, Any] = {"label": np.int32(rec["label"]), "mask": np.bool_(rec["mask"])}
        if rec["image"] is None:
            out["image"] = np.zeros((size, size, 3), np.float32)
            if with_raw:
                out["raw"] = np.zeros((canvas, canvas, 3), np.uint8)
                out["size"] = np.asarray([1, 1], np.int32)
            return out
        img = to_pil_rgb(rec["image"])  # decode once for both views
        out["image"] = eval_transform(img, size)
        if with_raw:
            out["raw"], out["size"] = to_canvas(img, canvas)
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
        .map(_eval_record(image_size, tpt, canvas))
        .batch(batch_size, drop_remainder=True)
    )
    return DataIterator(ds, _read_options(num_threads, prefetch), n_batches)


def _train_record(canvas: int) -> Callable[[dict], dict]:
    def fn(rec: dict) -> dict:
        raw, size = to_canvas(rec["image"], canvas)
        return {"image": raw, "size": size, "label": np.int32(rec["label"])}

    return fn


def train_iterator(
    examples: Sequence[Example],
    fetch: Fetch,
    *,
    batch_size: int,
    seed: int,
    canvas: int = TRAIN_CANVAS,
    shard: tuple[int, int] | None = None,
    num_threads: int = 8,
    prefetch: int = 8,
) -> DataIterator:
    """Endless, reshuffled-every-epoch train batches of raw canvases (see module docstring).

    The global stream is one shuffled sequence per epoch (grain's index shuffle, reseeded per
    epoch) cut into global batches of ``batch_size * count``; host ``i`` takes every
    ``count``-th element, so the union of the host batches is the same whatever the host count.

    Args:
      examples: the (few-shot) train examples.
      fetch: reads one example's image.
      batch_size: per-host batch size.
      seed: data seed (shuffling only; augmentation randomness is a separate device key).
      canvas: canvas side; see ``to_canvas``.
      shard: ``(index, count)`` of this host; defaults to ``jax.process_index/count()``.
      num_threads: decoding threads.
      prefetch: batches prefetched.
    """
    if not examples:
        raise ValueError("no training examples")
    index, count = _host_shard(shard)
    src = ExampleSource(examples, fetch)
    ds = grain.MapDataset.source(src).seed(seed).shuffle().repeat(None)
    ds = ds[index::count].map(_train_record(canvas)).batch(batch_size, drop_remainder=True)
    return DataIterator(ds, _read_options(num_threads, prefetch), None)
