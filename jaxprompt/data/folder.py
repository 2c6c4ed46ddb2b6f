"""Image-folder and CSV readers: custom datasets, and the datasets TFDS lacks or breaks.

Two layouts are understood, with no code change:

* **Image folder** (``dataset="folder:/data/birds"``): one sub-folder per class, classes in sorted
  (Python string) order, images anywhere below their class folder. If the root holds ``train/``
  and ``test/`` (and optionally ``val/``) folders, each laid out the same way, those splits are
  used as given; otherwise the split is CoOp's 50/20/30 per class (seed 0).
* **CSV** (``dataset="csv:/data/birds.csv"``): a header with ``path,label`` and optionally
  ``split`` (train/val/test). ``path`` is relative to the CSV's folder (absolute paths work too).
  ``label`` is an integer index into a class-names file (one name per line:
  ``<stem>.classnames.txt`` or ``classnames.txt`` beside the CSV) or a class name; with names and
  no file, classes are the sorted unique names.

Keys are paths relative to the dataset root (the folder, or the CSV's folder), with ``/``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from jaxprompt.data.protocol import Example, Split, make_random_split, normalize_key

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
_SPLIT_DIRS = ("train", "val", "test")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _list_images(folder: str) -> list[str]:
    """All image files below ``folder``, as sorted relative paths (hidden entries skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if _is_image(name):
                found.append(normalize_key(name if rel == "." else os.path.join(rel, name)))
    return sorted(found)


def _class_dirs(folder: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(folder)
        if not d.startswith(".") and os.path.isdir(os.path.join(folder, d))
    )


def scan_image_folder(root: str, *, seed: int = 0) -> tuple[Split, list[str]]:
    """Lists an image folder (see the module docstring for the layouts).

    Args:
      root: the dataset folder.
      seed: seed of the 50/20/30 split used when the folder is not pre-split.

    Returns:
      ``(split, classnames)``: ``split`` maps train/val/test to ``Example`` lists (keys relative to
      ``root``); ``classnames`` are the class folder names in label order.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    top = _class_dirs(root)
    presplit = "train" in top and "test" in top and set(top) <= set(_SPLIT_DIRS)
    if presplit:
        names = sorted({c for s in top for c in _class_dirs(os.path.join(root, s))})
        index = {c: i for i, c in enumerate(names)}
        split: Split = {s: [] for s in _SPLIT_DIRS}
        for s in top:
            for c in _class_dirs(os.path.join(root, s)):
                for rel in _list_images(os.path.join(root, s, c)):
                    split[s].append(Example(f"{s}/{c}/{rel}", index[c], c))
    else:
        names = top
        items = [
            Example(f"{c}/{rel}", i, c)
            for i, c in enumerate(names)
            for rel in _list_images(os.path.join(root, c))
        ]
        split = make_random_split(items, seed=seed)
    if not names:
        raise ValueError(f"no class sub-folders in {root}")
    return split, names


def read_classnames(path: str) -> list[str]:
    """One class name per line (blank lines ignored), in label order."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _find_classnames_file(csv_path: str) -> str | None:
    stem = os.path.splitext(csv_path)[0]
    beside = os.path.join(os.path.dirname(csv_path), "classnames.txt")
    for cand in (f"{stem}.classnames.txt", beside):
        if os.path.exists(cand):
            return cand
    return None


def read_csv(
    path: str, *, classnames: str | Sequence[str] | None = None, seed: int = 0
) -> tuple[Split, list[str]]:
    """Reads a CSV of ``path,label[,split]`` (see the module docstring).

    Args:
      path: the CSV file.
      classnames: a class-names file or list; by default found beside the CSV.
      seed: seed of the 50/20/30 split used when there is no ``split`` column.

    Returns:
      ``(split, classnames)`` with keys relative to the CSV's folder.
    """
    root = os.path.dirname(os.path.abspath(path))
    if classnames is None:
        classnames = _find_classnames_file(path)
    names = read_classnames(classnames) if isinstance(classnames, str) else classnames
    names = list(names) if names is not None else None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a header with 'path' and 'label' columns")
    labels = [r["label"].strip() for r in rows]
    numeric = all(lab.lstrip("-").isdigit() for lab in labels)
    if names is None:
        if numeric:
            raise ValueError(f"{path}: integer labels need a class-names file (classnames.txt)")
        names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    items: list[tuple[Example, str | None]] = []
    for row, lab in zip(rows, labels, strict=True):
        y = int(lab) if numeric else index.get(lab, -1)
        if not 0 <= y < len(names):
            raise ValueError(f"{path}: label {lab!r} is not one of the {len(names)} classes")
        p = row["path"].strip()
        key = normalize_key(os.path.relpath(p, root) if os.path.isabs(p) else p)
        items.append((Example(key, y, names[y]), (row.get("split") or "").strip() or None))
    if any(s is not None for _, s in items):
        split: Split = {s: [] for s in _SPLIT_DIRS}
        for x, s in items:
            if s not in split:
                raise ValueError(f"{path}: split must be train/val/test, got {s!r} for {x.key}")
            split[s].append(x)
    else:
        split = make_random_split([x for x, _ in items], seed=seed)
    return split, names


class FileSource:
    """A grain random-access source over image files: ``source[i]`` is a record dict.

    Records are ``{"image": encoded bytes, "label": int, "key": str}``; decoding happens later in
    the pipeline (in parallel workers), exactly as for a TFDS source.
    """

    def __init__(self, root: str, examples: Sequence[Example]):
        self.root = root
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        x = self.examples[index]
        with open(os.path.join(self.root, x.key), "rb") as f:
            data = f.read()
        return {"image": data, "label": x.label, "key": x.key}

    def __repr__(self) -> str:
        return f"FileSource({self.root!r}, n={len(self)})"
