"""On-device augmentation in JAX: CLIP normalisation, random resized crop, flip, TPT views.

Every function is pure and jit-able and takes an explicit PRNG key where it draws. Training
crops are made on the host from the full-resolution image (``pipeline.train_iterator``, equal
to torchvision's ``RandomResizedCrop`` on the PIL image); ``normalize_batch`` finishes them on
the device. TPT's views likewise come cropped from the host (``eval_iterator(views=...)``) and
get their AugMix here (``tpt_views_from_crops``).

The canvas path below (``random_resized_crop``, ``train_augment``, ``tpt_views``) crops raw
canvases (uint8 [B, C, C, 3] plus the valid ``size`` [B, 2], ``pipeline.to_canvas``) on the
device, from an image shrunk to the canvas.

The random resized crop follows torchvision's algorithm (10 attempts of area ~ U(scale)·H·W and
log-uniform aspect ratio, integer top-left corner uniform, centred fallback with the ratio
clamped), then resamples the crop to the output size with ``jax.image.scale_and_translate``
(Keys cubic, a = -0.5 as PIL's bicubic, antialiased when shrinking; or linear). It is close to,
not bit-equal with, torchvision on PIL images.
"""

from __future__ import annotations

import math

import dm_pix as pix
import jax
import jax.numpy as jnp

from jaxprompt.data.pipeline import CLIP_MEAN, CLIP_STD, IMAGE_SIZE

Array = jax.Array


def normalize_on_device(pixels: Array) -> Array:
    """0..255 pixels (any float or uint8 dtype), [..., 3] -> float32 CLIP-normalised."""
    x = jnp.asarray(pixels, jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def normalize_batch(batch: dict[str, Array]) -> dict[str, Array]:
    """A host-augmented train batch (``pipeline.train_iterator``) made ready for the loss.

    Args:
      batch: ``{"image": uint8 [B, S, S, 3] crops, "label": [B]}``.

    Returns:
      ``{"image": float32 [B, S, S, 3] CLIP-normalised, "label": int32 [B]}``.
    """
    return {
        "image": normalize_on_device(batch["image"]),
        "label": jnp.asarray(batch["label"], jnp.int32),
    }


def rrc_box(
    key: Array,
    size: Array,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Array:
    """torchvision ``RandomResizedCrop.get_params`` for one image.

    Args:
      key: PRNG key.
      size: int [2], the valid (height, width).
      scale: range of the crop area as a fraction of the image area.
      ratio: range of the crop aspect ratio (width / height).
      attempts: tries before the centred fallback.

    Returns:
      float32 [4]: (top, left, height, width) in pixels.
    """
    height, width = size[0].astype(jnp.float32), size[1].astype(jnp.float32)
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    frac = jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
    area = height * width * frac
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    log_r = jax.random.uniform(k_ratio, (attempts,), minval=lo, maxval=hi)
    aspect = jnp.exp(log_r)
    w = jnp.round(jnp.sqrt(area * aspect))  # round-half-even, as Python's round in torchvision
    h = jnp.round(jnp.sqrt(area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(ok)  # index of the first accepted attempt
    # Fallback: whole image with the aspect ratio clamped into [ratio[0], ratio[1]], centred.
    in_ratio = width / height
    fb_w = jnp.where(in_ratio > ratio[1], jnp.round(height * ratio[1]), width)
    fb_h = jnp.where(in_ratio < ratio[0], jnp.round(width / ratio[0]), height)
    any_ok = ok.any()
    ch = jnp.where(any_ok, h[first], fb_h)
    cw = jnp.where(any_ok, w[first], fb_w)
    top_rand = jnp.floor(jax.random.uniform(k_top) * (height - ch + 1))
    left_rand = jnp.floor(jax.random.uniform(k_left) * (width - cw + 1))
    top = jnp.where(any_ok, top_rand, jnp.floor((height - ch) / 2))
    left = jnp.where(any_ok, left_rand, jnp.floor((width - cw) / 2))
    return jnp.stack([top, left, ch, cw])


def crop_and_resize(image: Array, box: Array, out_size: int, method: str = "bicubic") -> Array:
    """Resamples ``image[top:top+h, left:left+w]`` to ``[out_size, out_size, 3]`` (float32)."""
    top, left, h, w = box[0], box[1], box[2], box[3]
    sy, sx = out_size / h, out_size / w
    out = jax.image.scale_and_translate(
        jnp.asarray(image, jnp.float32),
        (out_size, out_size, image.shape[-1]),
        spatial_dims=(0, 1),
        scale=jnp.stack([sy, sx]),
        translation=jnp.stack([-top * sy, -left * sx]),
        method={"bicubic": "cubic", "bilinear": "linear"}[method],
        antialias=True,
    )
    return jnp.clip(out, 0.0, 255.0)  # cubic overshoots; PIL clamps to uint8 range


def random_resized_crop(
    key: Array,
    images: Array,
    sizes: Array,
    *,
    out_size: int = IMAGE_SIZE,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    method: str = "bicubic",
) -> Array:
    """Batched torchvision-style random resized crop.

    Args:
      key: PRNG key.
      images: [B, H, W, 3] canvases (uint8 or float, 0..255).
      sizes: int [B, 2] valid (height, width) of each canvas.
      out_size: output side.
      scale: crop area range (fraction of the valid area).
      ratio: aspect ratio range.
      method: ``"bicubic"`` (CoOp training) or ``"bilinear"`` (TPT views).

    Returns:
      float32 [B, out_size, out_size, 3] in 0..255.
    """
    keys = jax.random.split(key, images.shape[0])
    boxes = jax.vmap(lambda k, s: rrc_box(k, s, scale=scale, ratio=ratio))(keys, sizes)
    return jax.vmap(lambda im, b: crop_and_resize(im, b, out_size, method))(images, boxes)


def random_flip(key: Array, images: Array, prob: float = 0.5) -> Array:
    """Horizontal flip of each image of [B, H, W, C] with probability ``prob``."""
    flip = jax.random.bernoulli(key, prob, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def train_augment(
    key: Array,
    batch: dict[str, Array],
    *,
    out_size: int = IMAGE_SIZE,
    method: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
) -> dict[str, Array]:
    """CoOp's train transform on device: RRC (0.08-1, 3/4-4/3, bicubic), flip, normalise.

    Args:
      key: PRNG key (fold in the step number for a fresh key per step).
      batch: ``{"image": [B, C, C, 3] canvases, "size": [B, 2], "label": [B]}`` from
        ``train_iterator``.
      out_size: output side.
      method: resampling method.
      scale: RRC area range (CoOp's 0.08-1 is meant for natural images; the toy world's
        32-pixel textures lose their class below about half the area).

    Returns:
      ``{"image": float32 [B, out_size, out_size, 3] normalised, "label": int32 [B]}``.
    """
    k_crop, k_flip = jax.random.split(key)
    x = random_resized_crop(
        k_crop, batch["image"], batch["size"], out_size=out_size, method=method, scale=scale
    )
    x = random_flip(k_flip, x)
    return {"image": normalize_on_device(x), "label": jnp.asarray(batch["label"], jnp.int32)}


# ------------------------------------------------------------------------------------------------
# AugMix, as TPT uses it (tpt.md section 2.1): 9 PIL-like ops, severity 1, mixing after Normalize
# ------------------------------------------------------------------------------------------------


def _quantize(x: Array) -> Array:
    # PIL ops return uint8 images; rounding between ops keeps the chains comparable.
    return jnp.clip(jnp.round(x), 0.0, 255.0)


def autocontrast(x: Array) -> Array:
    """Per-channel stretch of [min, max] to [0, 255] (PIL ``ImageOps.autocontrast``, cutoff 0)."""
    lo = x.min(axis=(0, 1), keepdims=True)
    hi = x.max(axis=(0, 1), keepdims=True)
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    return jnp.where(hi > lo, jnp.floor((x - lo) * scale), x)


def equalize(x: Array) -> Array:
    """Per-channel histogram equalisation with PIL's ``ImageOps.equalize`` lookup table."""

    def one(c: Array) -> Array:
        v = c.astype(jnp.int32).ravel()
        hist = jnp.bincount(v, length=256)
        last = hist[jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))]
        step = (v.size - last) // 255
        before = jnp.cumsum(hist) - hist  # pixels strictly below each value
        lut = jnp.clip((before + step // 2) // jnp.maximum(step, 1), 0, 255)
        return jnp.where(step > 0, lut[v].reshape(c.shape).astype(x.dtype), c)

    return jnp.stack([one(x[..., i]) for i in range(x.shape[-1])], axis=-1)


def posterize(x: Array, bits: int = 4) -> Array:
    """Keeps the top ``bits`` bits of each value."""
    q = 2.0 ** (8 - bits)
    return jnp.floor(x / q) * q


def _affine_params(op: Array, level: Array, sign: Array, size: int) -> tuple[Array, Array]:
    """(matrix, offset) in scipy.ndimage convention (input = matrix @ output + offset) for the
    5 geometric ops: 0 rotate, 1 shear_x, 2 shear_y, 3 translate_x, 4 translate_y."""
    theta = jnp.deg2rad(sign * jnp.floor(level * 3.0))  # int_parameter(level, 30): 0..2 degrees
    shear = sign * level * 0.03  # float_parameter(level, 0.3) at severity 1
    px = sign * jnp.floor(level * (size / 3) / 10)  # int_parameter(level, size / 3): 0..7 px
    c, s = jnp.cos(theta), jnp.sin(theta)
    center = (size - 1) / 2.0
    one, zero = jnp.ones(()), jnp.zeros(())
    rot = jnp.array([[c, -s, zero], [s, c, zero], [zero, zero, one]])
    rot_off = jnp.array([center - c * center + s * center, center - s * center - c * center, zero])
    eye = jnp.eye(3)
    mats = jnp.stack([rot, eye.at[1, 0].set(shear), eye.at[0, 1].set(shear), eye, eye])
    offs = jnp.stack(
        [
            rot_off,
            jnp.zeros(3),
            jnp.zeros(3),
            jnp.zeros(3).at[1].set(px),
            jnp.zeros(3).at[0].set(px),
        ]
    )
    return mats[op], offs[op]


def _augmix_op(x: Array, op: Array, level: Array, sign: Array) -> Array:
    """One of the 9 ops (autocontrast, equalize, posterize, solarize, then the 5 geometric ones).

    The geometric ops share one bilinear ``dm_pix.affine_transform`` (black fill, like PIL's
    ``transform(..., AFFINE, BILINEAR)``), which keeps the compiled program small.
    """

    def geometric(x: Array) -> Array:
        matrix, offset = _affine_params(op - 4, level, sign, x.shape[0])
        return pix.affine_transform(x, matrix, offset=offset, order=1, mode="constant", cval=0.0)

    def solarize(x: Array) -> Array:
        threshold = 256.0 - jnp.floor(level * 25.6)  # 256 - int_parameter(level, 256)
        return pix.solarize(x / 255.0, threshold / 255.0) * 255.0

    branches = [autocontrast, equalize, lambda x: posterize(x, 4), solarize, geometric]
    return jax.lax.switch(jnp.minimum(op, 4), branches, x)


def augmix(key: Array, image: Array, *, width: int = 3, max_depth: int = 3) -> Array:
    """TPT's AugMix on one image: ``m·norm(x) + (1-m)·Σ w_i·norm(chain_i(x))``.

    ``w ~ Dirichlet(1,1,1)``, ``m ~ Beta(1,1)``; each chain applies 1-3 ops drawn uniformly from
    autocontrast, equalize, posterize, rotate, solarize, shear x/y, translate x/y at severity 1.

    Args:
      key: PRNG key.
      image: [H, W, 3] pixels, 0..255 (the RRC+flip output).

    Returns:
      float32 [H, W, 3], CLIP-normalised (the mixing happens after normalisation).
    """
    x = _quantize(jnp.asarray(image, jnp.float32))
    k_w, k_m, k_chain = jax.random.split(key, 3)
    w = jax.random.dirichlet(k_w, jnp.ones(width))
    m = jax.random.beta(k_m, 1.0, 1.0)

    def chain(k: Array) -> Array:
        k_depth, k_ops, k_lvl, k_sign = jax.random.split(k, 4)
        depth = jax.random.randint(k_depth, (), 1, max_depth + 1)
        op_ids = jax.random.randint(k_ops, (max_depth,), 0, 9)
        levels = jax.random.uniform(k_lvl, (max_depth,), minval=0.1, maxval=1.0)
        signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (max_depth,)), 1.0, -1.0)

        def step(y: Array, d: Array) -> tuple[Array, None]:
            # A scan (not a Python loop) so the 9 op branches are traced and compiled once.
            z = _quantize(_augmix_op(y, op_ids[d], levels[d], signs[d]))
            return jnp.where(d < depth, z, y), None

        y, _ = jax.lax.scan(step, x, jnp.arange(max_depth))
        return normalize_on_device(y)

    mixed = jnp.einsum("i,ihwc->hwc", w, jax.vmap(chain)(jax.random.split(k_chain, width)))
    return m * normalize_on_device(x) + (1.0 - m) * mixed


def tpt_views(
    key: Array,
    image: Array,
    raw: Array,
    size: Array,
    *,
    n_views: int = 63,
    use_augmix: bool = False,
    out_size: int = IMAGE_SIZE,
) -> Array:
    """TPT's views of one test image: view 0 as given, then ``n_views`` augmented views.

    Augmented views are RandomResizedCrop (torchvision defaults, **bilinear**) of the full image
    plus a flip, then either plain normalisation (ImageNet family) or AugMix (fine-grained
    datasets, ``use_augmix=True``). Batch over images with ``jax.vmap``.

    Args:
      key: PRNG key (e.g. ``fold_in(seed_key, sample_index)``, so views do not depend on batching).
      image: [S, S, 3] normalised eval view (``eval_iterator(..., tpt=True)["image"]``).
      raw: [C, C, 3] canvas (``["raw"]``).
      size: int [2] valid (height, width) of the canvas (``["size"]``).
      n_views: number of augmented views (63 in the paper).
      use_augmix: AugMix on top of RRC + flip.
      out_size: view side.

    Returns:
      float32 [n_views + 1, out_size, out_size, 3]; index 0 is ``image``.
    """
    k_crop, k_flip, k_mix = jax.random.split(key, 3)
    raws = jnp.broadcast_to(raw, (n_views, *raw.shape))
    sizes = jnp.broadcast_to(size, (n_views, 2))
    x = random_resized_crop(k_crop, raws, sizes, out_size=out_size, method="bilinear")
    x = random_flip(k_flip, x)
    if use_augmix:
        views = jax.vmap(augmix)(jax.random.split(k_mix, n_views), x)
    else:
        views = normalize_on_device(x)
    return jnp.concatenate([jnp.asarray(image, jnp.float32)[None], views], axis=0)


def tpt_views_from_crops(
    key: Array, image: Array, crops: Array, *, use_augmix: bool = False
) -> Array:
    """TPT's views of one test image from host-made crops: view 0, then the crops.

    Args:
      key: PRNG key (AugMix only; the crops and flips were drawn on the host).
      image: [S, S, 3] normalised eval view.
      crops: uint8 [V, S, S, 3] random resized crops + flips of the full image
        (``eval_iterator(..., views=V)["views"]``).
      use_augmix: AugMix on top (fine-grained datasets), else plain normalisation.

    Returns:
      float32 [V + 1, S, S, 3]; index 0 is ``image``.
    """
    x = jnp.asarray(crops, jnp.float32)
    if use_augmix:
        views = jax.vmap(augmix)(jax.random.split(key, x.shape[0]), x)
    else:
        views = normalize_on_device(x)
    return jnp.concatenate([jnp.asarray(image, jnp.float32)[None], views], axis=0)
