"""A procedural image world: texture classes, nuisance attributes, styles and captions.

No machine here can fetch CLIP weights or the CoOp datasets, yet the library needs a world in
which a foundation model exists, leaves room to adapt, and faces real domain shift. This module
draws that world deterministically from ``(seed, split, style, index)``:

* 16 texture classes (a small ViT learns periodic patterns far faster than drawn shapes);
* nuisance attributes: foreground and background colour, scale (frequency), position (phase
  and centre), small rotation, lighting;
* four styles: ``photo`` (colour, lighting, mild noise), ``sketch`` (dark outlines on paper),
  ``night`` (dark and noisy) and ``cartoon`` (inverted, posterised colours in dark
  outlines);
* captions composed from the attributes, for contrastive pretraining.

The first eight classes are the base classes of the base-to-novel protocol and the last eight
the novel ones; the non-photo styles serve as domain-generalisation targets and the foreground
colour as a different label space (cross-dataset target).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np

from jaxprompt.data.catalog import DatasetSpec, LoadedDataset, register

CLASSES: tuple[str, ...] = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "rings",
    "grid",
    "zigzag",
    "waves",
    "crosses",
    "sunburst",
    "diamonds",
    "bricks",
    "plaid",
    "gradient",
    "spiral",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}

STYLES: tuple[str, ...] = ("photo", "sketch", "night", "cartoon")
STYLE_WORDS: dict[str, str] = {
    "photo": "photo",
    "sketch": "sketch",
    "night": "dark photo",
    "cartoon": "cartoon",
}
SPLIT_SIZES: dict[str, int] = {"train": 100, "val": 20, "test": 50}  # images per class

IMAGE_SIZE = 32


def _rng(*parts: object) -> np.random.Generator:
    """A generator keyed by a tuple, stable across Python versions and platforms."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _field(cls: int, u: np.ndarray, v: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """A periodic field whose sign draws class ``cls``; u, v in [0, 1) rotated coordinates."""
    f = r.uniform(2.5, 5.0)  # cycles per image: the scale nuisance
    ph = r.uniform(0, 2 * np.pi)
    cx, cy = r.uniform(0.3, 0.7, size=2)
    dx, dy = u - cx, v - cy
    rad = np.sqrt(dx**2 + dy**2)
    ang = np.arctan2(dy, dx)
    tau = 2 * np.pi
    name = CLASSES[cls]
    if name == "horizontal stripes":
        return np.sin(tau * f * v + ph)
    if name == "vertical stripes":
        return np.sin(tau * f * u + ph)
    if name == "diagonal stripes":
        return np.sin(tau * f * (u + v) / np.sqrt(2) + ph)
    if name == "checkerboard":
        return np.sin(tau * f / 2 * u + ph) * np.sin(tau * f / 2 * v + ph)
    if name == "polka dots":
        gu = (u * f + ph / tau) % 1 - 0.5
        gv = (v * f + ph / tau) % 1 - 0.5
        return 0.3 - np.sqrt(gu**2 + gv**2) * 2
    if name == "rings":
        return np.sin(tau * f * rad * 1.5 + ph)
    if name == "grid":
        gu = np.abs((u * f + ph / tau) % 1 - 0.5)
        gv = np.abs((v * f + ph / tau) % 1 - 0.5)
        return np.maximum(gu, gv) - 0.38
    if name == "zigzag":
        tri = np.abs((u * f * 1.5) % 1 - 0.5) * 2  # triangle wave in [0, 1]
        return np.sin(tau * f * (v + 0.12 * tri) + ph)
    if name == "waves":
        return np.sin(tau * f * (v + 0.08 * np.sin(tau * 2 * u + ph)) + ph)
    if name == "crosses":
        gu = np.abs((u * f / 1.5 + ph / tau) % 1 - 0.5)
        gv = np.abs((v * f / 1.5 + ph / tau) % 1 - 0.5)
        arm = (np.minimum(gu, gv) < 0.09) & (np.maximum(gu, gv) < 0.36)
        return arm.astype(np.float64) - 0.5
    if name == "sunburst":
        return np.sin(np.round(f * 2) * ang + ph)
    if name == "diamonds":
        return np.sin(tau * f / 2 * (u + v) + ph) * np.sin(tau * f / 2 * (u - v) + ph)
    if name == "bricks":
        row = np.floor(v * f * 1.2 + ph / tau)
        bu = (u * f * 0.6 + 0.5 * (row % 2)) % 1
        bv = (v * f * 1.2 + ph / tau) % 1
        return np.minimum(np.minimum(bu, 1 - bu) * 0.6, np.minimum(bv, 1 - bv)) - 0.08
    if name == "plaid":
        return (
            np.sin(tau * f * u + ph)
            + np.sin(tau * f * v * 0.5 + ph)
            + 0.6 * np.sin(tau * f * 2 * v)
        )
    if name == "gradient":
        return (u - 0.5) * 4 + 0.3 * np.sin(ph)
    if name == "spiral":
        return np.sin(2 * ang + tau * f * rad * 1.2 + ph)
    raise ValueError(f"unknown class index {cls}")


def render(cls: int, fg: str, bg: str, style: str, r: np.random.Generator) -> np.ndarray:
    """Draws one image of class ``cls``. Returns uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]."""
    s = IMAGE_SIZE
    # Supersample 2x and average: anti-aliasing keeps high-frequency patterns recognisable.
    n = 2 * s
    y, x = np.mgrid[0:n, 0:n] / n
    theta = np.deg2rad(r.uniform(-12, 12))
    u = np.cos(theta) * (x - 0.5) - np.sin(theta) * (y - 0.5) + 0.5
    v = np.sin(theta) * (x - 0.5) + np.cos(theta) * (y - 0.5) + 0.5
    field = _field(cls, u, v, r)
    mask = 1 / (1 + np.exp(-np.clip(field * 12, -30, 30)))
    mask = mask.reshape(s, 2, s, 2).mean(axis=(1, 3))
    fgc = np.asarray(COLOURS[fg], np.float64) / 255
    bgc = np.asarray(COLOURS[bg], np.float64) / 255
    img = mask[..., None] * fgc + (1 - mask[..., None]) * bgc
    yy, xx = np.mgrid[0:s, 0:s] / s
    light = 1 + r.uniform(-0.15, 0.15) * (xx - 0.5) + r.uniform(-0.15, 0.15) * (yy - 0.5)
    if style == "photo":
        img = img * light[..., None] + r.normal(0, 0.03, img.shape)
    elif style == "sketch":
        gy, gx = np.gradient(mask)
        edge = np.clip(np.sqrt(gx**2 + gy**2) * 3.0, 0, 1)
        paper = 0.93 + r.normal(0, 0.02, (s, s))
        ink = paper * (1 - edge)
        img = np.repeat(ink[..., None], 3, axis=-1)
    elif style == "night":
        img = img * light[..., None] * 0.45 + r.normal(0, 0.07, img.shape)
    elif style == "cartoon":
        # Inverted, posterised fills inside dark outlines: the outlines add edges the
        # photo style never has, so the pattern reads differently to the image encoder.
        gy, gx = np.gradient(mask)
        edge = np.clip(np.sqrt(gx**2 + gy**2) * 2.0, 0, 1)
        fill = np.round((1 - img) * 3) / 3
        img = fill * (1 - edge[..., None]) + 0.05 * edge[..., None]
        img = img + r.normal(0, 0.02, img.shape)
    else:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def attributes(index: int, *, split: str, style: str, seed: int = 0) -> dict:
    """The attributes of example ``index`` of a split; class-major order, balanced classes."""
    per = SPLIT_SIZES[split]
    if not 0 <= index < per * len(CLASSES):
        raise IndexError(f"index {index} out of range for split {split!r}")
    cls = index // per
    r = _rng("toy-attrs", seed, split, style, index)
    names = list(COLOURS)
    fg = names[r.integers(len(names))]
    bg = names[(names.index(fg) + 1 + r.integers(len(names) - 1)) % len(names)]
    return {"label": cls, "classname": CLASSES[cls], "fg": fg, "bg": bg, "style": style}


def example(index: int, *, split: str, style: str = "photo", seed: int = 0):
    """Returns ``(image uint8 [32, 32, 3], attributes)`` for one example, deterministically."""
    a = attributes(index, split=split, style=style, seed=seed)
    img = render(a["label"], a["fg"], a["bg"], style, _rng("toy-image", seed, split, style, index))
    return img, a


def split_size(split: str) -> int:
    """Number of examples in a split (all classes)."""
    return SPLIT_SIZES[split] * len(CLASSES)


def key(index: int, *, split: str, style: str = "photo") -> str:
    """The stable example id (a relative path, as for image folders)."""
    per = SPLIT_SIZES[split]
    return f"{style}/{split}/{CLASSES[index // per].replace(' ', '_')}/{index:05d}.png"


# Catalog entries: (name, style, label space). The photo textures are the source dataset (base
# and new classes), the other styles its domain-generalisation targets, and the foreground
# colours of photo images a different label space (cross-dataset target).
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("toy_textures", "photo", "texture"),
    ("toy_textures_sketch", "sketch", "texture"),
    ("toy_textures_night", "night", "texture"),
    ("toy_textures_cartoon", "cartoon", "texture"),
    ("toy_colours", "photo", "colour"),
)


@functools.lru_cache(maxsize=65536)
def _cached_image(index: int, split: str, style: str, seed: int) -> np.ndarray:
    img = example(index, split=split, style=style, seed=seed)[0]
    img.flags.writeable = False
    return img


def load(spec, *, style: str, labels: str, seed: int = 0):
    """A catalog ``LoadedDataset`` of the toy world (rendered on demand, cached in memory).

    Args:
      spec: the catalog entry (a ``DatasetSpec``).
      style: which style's images.
      labels: ``"texture"`` (16 classes) or ``"colour"`` (the foreground colour, 8 classes).
      seed: world seed.
    """
    from jaxprompt.data.protocol import Example

    colour_names = list(COLOURS)
    split = {}
    for name in SPLIT_SIZES:
        if name == "pretrain":
            continue
        items = []
        for i in range(split_size(name)):
            a = attributes(i, split=name, style=style, seed=seed)
            if labels == "texture":
                lab, cname = a["label"], a["classname"]
            else:
                lab, cname = colour_names.index(a["fg"]), a["fg"]
            items.append(Example(key(i, split=name, style=style), lab, cname))
        split[name] = items
    names = list(CLASSES) if labels == "texture" else colour_names

    def fetch(ex) -> np.ndarray:
        sp, idx = ex.key.split("/")[1], int(ex.key.rsplit("/", 1)[1].split(".")[0])
        return _cached_image(idx, sp, style, seed)

    return LoadedDataset(spec, split, names, fetch, None, f"toyworld(style={style}, seed={seed})")


def images(
    split: str, *, style: str = "photo", seed: int = 0, indices: Sequence[int] | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Renders many examples: ``(uint8 [N, 32, 32, 3], attribute dicts)``."""
    idx = range(split_size(split)) if indices is None else indices
    out = [example(int(i), split=split, style=style, seed=seed) for i in idx]
    return np.stack([o[0] for o in out]), [o[1] for o in out]


# Each class has a precise alias, and its class name is used loosely. Web captions describe a
# pattern in many words, and the words a benchmark picks as class names are often rare or used
# for neighbouring concepts ("zigzag" for chevrons and for waves). So every pretraining image has
# one caption with its class's alias, which teaches the image encoder every class exactly, and
# one with a class name that, with probability ``name_noise``, is its partner class's name
# (:data:`PARTNERS`, pairs within the base and within the new classes). Zero-shot prompts use the
# class names: they separate partners by a thin margin, while the image features separate them
# well. That gap between what the features know and what the names say is what prompt learning
# closes on real data (EuroSAT, DTD, aircraft), and the toy world keeps it.
ALIASES: dict[str, str] = {
    "horizontal stripes": "rows",
    "vertical stripes": "columns",
    "diagonal stripes": "slants",
    "checkerboard": "chequers",
    "polka dots": "spots",
    "rings": "bullseye",
    "grid": "lattice",
    "zigzag": "chevrons",
    "waves": "ripples",
    "crosses": "pluses",
    "sunburst": "rays",
    "diamonds": "argyle",
    "bricks": "masonry",
    "plaid": "tartan",
    "gradient": "fade",
    "spiral": "swirl",
}

_PAIRS = (
    ("horizontal stripes", "diagonal stripes"),
    ("vertical stripes", "zigzag"),
    ("checkerboard", "grid"),
    ("polka dots", "rings"),
    ("waves", "spiral"),
    ("crosses", "bricks"),
    ("sunburst", "gradient"),
    ("diamonds", "plaid"),
)
PARTNERS: dict[str, str] = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}


def captions(style: str, classname: str, fg: str, *, said: str | None = None) -> tuple[str, str]:
    """The two captions of an image of class ``classname``: its alias, and a class name.

    Like web alt-text, they name the pattern and the medium but never in the words of the
    zero-shot template ("a photo of a {}."). ``said`` is the class name the second caption uses
    (default: ``classname``; its partner's name for a loosely captioned image).
    """
    w = STYLE_WORDS[style]
    return f"{ALIASES[classname]} {w}.", f"{fg} {said or classname} {w}."


def caption_set() -> list[str]:
    """Every distinct caption of the world (aliases, and class names with colours), in order."""
    out: list[str] = []
    for style in STYLES:
        for c in CLASSES:
            out.append(captions(style, c, "red")[0])
            out.extend(captions(style, c, fg)[1] for fg in COLOURS)
    return out


def vocabulary() -> list[str]:
    """Every word the captions and class names use (for the toy CLIP's tokenizer)."""
    words = {w for cap in caption_set() for w in cap.replace(".", " ").split()}
    return sorted(words)


def register_datasets() -> None:
    """Adds the toy world's datasets (:data:`VARIANTS`) to the catalog."""
    for name, style, labels in VARIANTS:
        register(
            DatasetSpec(
                name=name,
                num_classes=len(CLASSES) if labels == "texture" else len(COLOURS),
                template="a photo of a {}.",
                generator=functools.partial(load, style=style, labels=labels),
            )
        )
