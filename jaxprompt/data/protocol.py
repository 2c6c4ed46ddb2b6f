"""The CoOp benchmark protocol as pure functions over stable example ids.

Every example is identified by its relative path (``Example.key``), never by its position in a
record file: TFDS writes records in a shuffled order, so anything keyed on record order would
change between two builds of the same dataset. The functions here reproduce CoOp's algorithms
exactly (stdlib ``random``, train drawn before val, labels in first-appearance order) so that the
sampled sets can be compared with published split and few-shot index files.

A *split* is a plain dict ``{"train": [...], "val": [...], "test": [...]}`` of ``Example`` lists
(``val`` may be empty, e.g. for ImageNet).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

SPLITS: tuple[str, ...] = ("train", "val", "test")
SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
SEEDS: tuple[int, ...] = (1, 2, 3)


class Example(NamedTuple):
    """One labelled image.

    Attributes:
      key: stable id, the image path relative to the dataset's image root, with ``/``
        separators (CoOp's ``split_zhou_*.json`` uses the same convention).
      label: 0-based class index.
      classname: the class name as stored (underscores kept; ``_`` becomes a space only when
        prompts are built).
    """

    key: str
    label: int
    classname: str


Split = dict[str, list[Example]]


def normalize_key(path: str) -> str:
    """Canonical form of a relative path: ``/`` separators, no leading ``./`` or ``/``."""
    key = path.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key.lstrip("/")


# ------------------------------------------------------------------------------------------------
# Few-shot sampling (protocol.md section 3)
# ------------------------------------------------------------------------------------------------


def group_by_label(items: Sequence[Example]) -> dict[int, list[Example]]:
    """Groups items by label; dict order is the order of each label's first appearance."""
    groups: dict[int, list[Example]] = {}
    for item in items:
        groups.setdefault(int(item[1]), []).append(item)
    return groups


def sample_per_class(items: Sequence[Example], k: int, rng: random.Random) -> list[Example]:
    """Draws ``k`` items per label exactly as CoOp's ``generate_fewshot_dataset``.

    Labels are visited in first-appearance order (not sorted: for Flowers and Cars the two give
    different samples), each class uses one ``rng.sample`` call, and a class with fewer than ``k``
    items is kept whole without repetition.

    Args:
      items: examples in split-file order (the order within a class matters).
      k: shots per class.
      rng: a ``random.Random``; it is advanced, so calls sharing it share one stream.

    Returns:
      The sampled examples, class block after class block.
    """
    out: list[Example] = []
    for group in group_by_label(items).values():
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def sample_few_shot(split: Mapping[str, Sequence[Example]], *, shots: int, seed: int) -> Split:
    """K-shot train and min(K, 4)-shot val sets, CoOp's algorithm.

    One ``random.Random(seed)`` stream is shared, train is drawn before val, and the test list is
    returned unchanged. ``shots <= 0`` means "all data" and returns copies of the lists.

    Args:
      split: ``{"train", "val", "test"}`` lists in split-file order; ``val`` may be missing or
        empty (ImageNet), in which case no val draw happens (as in CoOp).
      shots: K.
      seed: the run seed (1, 2 or 3 in the papers).

    Returns:
      A new split dict with the same keys.
    """
    out: Split = {name: list(items) for name, items in split.items()}
    if shots <= 0:
        return out
    # CoOp seeds Python's global RNG; a private instance seeded the same way gives the same draws
    # without touching global state.
    rng = random.Random(seed)
    out["train"] = sample_per_class(split["train"], shots, rng)
    if split.get("val"):
        out["val"] = sample_per_class(split["val"], min(shots, 4), rng)
    return out


# ------------------------------------------------------------------------------------------------
# Base-to-novel (protocol.md section 4)
# ------------------------------------------------------------------------------------------------


def base_new_labels(labels: Iterable[int], subset: str) -> list[int]:
    """The labels kept by ``subset``: the first ceil(n/2) sorted labels ("base"), the rest
    ("new"), or all of them ("all")."""
    ordered = sorted(set(int(x) for x in labels))
    m = math.ceil(len(ordered) / 2)
    if subset == "all":
        return ordered
    if subset == "base":
        return ordered[:m]
    if subset == "new":
        return ordered[m:]
    raise ValueError(f"subset must be one of 'all', 'base', 'new'; got {subset!r}")


def subsample_classes(split: Mapping[str, Sequence[Example]], subset: str) -> Split:
    """Keeps the base or new half of the classes and relabels them 0..m-1.

    The label set is taken from ``split["train"]`` (CoOp uses the first list passed, which is the
    few-shot train set). Items of other classes are dropped from every list; class names are
    unchanged. ``subset="all"`` returns copies.
    """
    keep = base_new_labels((x.label for x in split["train"]), subset)
    relabel = {old: new for new, old in enumerate(keep)}
    return {
        name: [Example(x.key, relabel[x.label], x.classname) for x in items if x.label in relabel]
        for name, items in split.items()
    }


def classnames(items: Sequence[Example]) -> list[str]:
    """Class names in label order (CoOp's ``lab2cname`` of a list); labels must be 0..n-1."""
    names: dict[int, str] = {}
    for x in items:
        names.setdefault(x.label, x.classname)
    missing = sorted(set(range(len(names))) - set(names))
    if missing or (names and max(names) != len(names) - 1):
        raise ValueError(f"labels are not contiguous from 0 (missing {missing[:10]})")
    return [names[i] for i in range(len(names))]


# ------------------------------------------------------------------------------------------------
# Building train/val/test when no split file is given (protocol.md section 2)
# ------------------------------------------------------------------------------------------------


def make_random_split(
    items: Sequence[Example], *, seed: int = 0, p_train: float = 0.5, p_val: float = 0.2
) -> Split:
    """CoOp's ``read_and_split_data`` maths: per class, shuffle, then round(0.5 n) train,
    round(0.2 n) val, the rest test. Classes are visited in sorted label order.

    CoOp's own files were made with an unrecorded RNG state, so this gives a split of the same
    shape, not the published one; pass the published ``split_zhou_*.json`` for comparability.
    """
    rng = random.Random(seed)
    groups = group_by_label(sorted(items, key=lambda x: (x.label, x.key)))
    out: Split = {"train": [], "val": [], "test": []}
    for label in sorted(groups):
        group = list(groups[label])
        rng.shuffle(group)
        n_train, n_val = round(p_train * len(group)), round(p_val * len(group))
        out["train"] += group[:n_train]
        out["val"] += group[n_train : n_train + n_val]
        out["test"] += group[n_train + n_val :]
    return out


def split_trainval(
    items: Sequence[Example], *, seed: int = 0, p_val: float = 0.2
) -> tuple[list[Example], list[Example]]:
    """CoOp's ``split_trainval``: per label (first-appearance order), round(p_val n) random items
    go to val and the rest to train. Returns ``(train, val)``."""
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for group in group_by_label(items).values():
        idx = list(range(len(group)))
        rng.shuffle(idx)
        n_val = round(p_val * len(group))
        val += [group[i] for i in idx[:n_val]]
        train += [group[i] for i in idx[n_val:]]
    return train, val


def canonical_order(split: Mapping[str, Sequence[Example]]) -> Split:
    """Sorts every list by (label, key): the order used when no split file fixes one, so the
    sampled examples never depend on how records happen to be stored."""
    return {name: sorted(items, key=lambda x: (x.label, x.key)) for name, items in split.items()}


# ------------------------------------------------------------------------------------------------
# Split files: CoOp's split_zhou_*.json and our own run-directory records
# ------------------------------------------------------------------------------------------------


def fingerprint(obj: Any) -> str:
    """First 16 hex digits of sha256 over canonical JSON (protocol.md section 2)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_examples(rows: Sequence[Sequence[Any]]) -> list[Example]:
    return [Example(normalize_key(str(r[0])), int(r[1]), str(r[2])) for r in rows]


def load_split_file(path: str | os.PathLike[str]) -> Split:
    """Reads a CoOp ``split_zhou_<Name>.json`` (or a file written by ``save_split``).

    Returns:
      ``{"train", "val", "test"}`` lists of ``Example`` in file order (absent lists are empty).
    """
    with open(path) as f:
        obj = json.load(f)
    return {name: _to_examples(obj.get(name) or []) for name in SPLITS}


@dataclasses.dataclass(frozen=True)
class MatchReport:
    """What happened when a split file was matched against the images available.

    Attributes:
      matched: number of split-file entries found.
      missing: per split, the split-file keys with no image (in file order).
      unused: available keys that no split list mentions (sorted).
      renamed: split-file key -> available key, for matches found only case-insensitively.
    """

    matched: int
    missing: dict[str, list[str]]
    unused: list[str]
    renamed: dict[str, str]

    @property
    def ok(self) -> bool:
        """True when every split-file entry was found."""
        return not any(self.missing.values())

    def summary(self, limit: int = 5) -> str:
        """One human-readable paragraph, listing at most ``limit`` keys per kind."""
        n_missing = sum(len(v) for v in self.missing.values())
        lines = [f"matched {self.matched}, missing {n_missing}, unused images {len(self.unused)}"]
        for name, keys in self.missing.items():
            if keys:
                more = " ..." * (len(keys) > limit)
                lines.append(f"  missing from {name}: {keys[:limit]}{more}")
        if self.unused:
            lines.append(f"  unused: {self.unused[:limit]}" + (" ..." * (len(self.unused) > limit)))
        if self.renamed:
            some = dict(list(self.renamed.items())[:limit])
            lines.append(f"  matched case-insensitively: {some}")
        return "\n".join(lines)


def match_split(
    split: Mapping[str, Sequence[Example]], available: Iterable[str]
) -> tuple[Split, MatchReport]:
    """Matches a split file to the images present, by relative path.

    An exact match on the normalised key is tried first, then a case-insensitive one (mirrors and
    TFDS sometimes change case, e.g. Caltech's ``Faces`` folder). Entries that match neither are
    dropped and reported, never silently replaced.

    Args:
      split: lists from ``load_split_file``.
      available: the keys of the images that exist.

    Returns:
      ``(matched_split, report)``; the matched split uses the *available* spelling of each key,
      the split file's labels and names, and keeps file order.
    """
    exact = {normalize_key(k): k for k in available}
    folded: dict[str, str | None] = {}
    for k in exact:
        folded[k.lower()] = None if k.lower() in folded else k  # None marks an ambiguous fold
    used: set[str] = set()
    missing: dict[str, list[str]] = {}
    renamed: dict[str, str] = {}
    out: Split = {}
    for name, items in split.items():
        out[name], missing[name] = [], []
        for x in items:
            key = normalize_key(x.key)
            hit = key if key in exact else folded.get(key.lower())
            if hit is None:
                missing[name].append(x.key)
                continue
            if hit != key:
                renamed[x.key] = hit
            used.add(hit)
            out[name].append(Example(hit, x.label, x.classname))
    unused = sorted(set(exact) - used)
    matched = sum(len(v) for v in out.values())
    return out, MatchReport(matched=matched, missing=missing, unused=unused, renamed=renamed)


def fewshot_filename(shots: int, seed: int) -> str:
    """The run-directory file name for a sampled split, e.g. ``shot_16-seed_1.json``."""
    return f"shot_{shots}-seed_{seed}.json"


def save_split(
    path: str | os.PathLike[str], split: Mapping[str, Sequence[Example]], **meta: Any
) -> str:
    """Writes a split as JSON (CoOp's ``[key, label, classname]`` rows) plus metadata.

    The file can be read back with ``load_split_file`` or by any tool that reads CoOp splits, so a
    run's exact examples can be repeated and shared.

    Returns:
      The fingerprint of the rows (also stored under ``"fingerprint"``).
    """
    rows = {
        name: [[x.key, int(x.label), x.classname] for x in items] for name, items in split.items()
    }
    fp = fingerprint(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**meta, "fingerprint": fp, **rows}, f, indent=0)
    os.replace(tmp, path)  # atomic, so a crash never leaves half a split behind
    return fp
