"""Dataset catalog: the 11 CoOp datasets, the 4 ImageNet variants, and custom folders/CSVs.

``DATASETS`` is a plain dict registry (``register`` adds to it, e.g. the toy world). Each
``DatasetSpec`` says where the images come from (a TFDS builder, or raw files read by a lister
function), how a TFDS record maps to CoOp's relative path (the stable key), how TFDS labels map to
CoOp labels, the cleaned class names (protocol.md section 1.1) and the zero-shot template (1.2).

``load_dataset(name, ...)`` returns a ``LoadedDataset``: the train/val/test ``Example`` lists, the
class names and a ``fetch(example)`` reader. Names:

* a catalog name or alias, case-insensitive (``"OxfordPets"``, ``"oxford_pets"``, ``"pets"``);
* ``"folder:/path/to/dir"``: an image folder (class = sub-folder, sorted);
* ``"csv:/path/to/file.csv"``: a CSV of ``path,label[,split]`` plus class names
  (see ``jaxprompt.data.folder``).

Where images are read from, in order: the array_record dataset written by ``prepare`` under
``data_dir`` (the standard TFDS builder for TFDS-backed entries, ``jp_<name>`` for the others);
otherwise, for folder-backed entries and custom datasets, the raw files under ``manual_dir`` (or
the custom path). A CoOp ``split_zhou_*.json`` (``split_file=``) fixes train/val/test; without it
a split of the same shape is rebuilt deterministically (see ``DatasetSpec.auto_split``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import numpy as np

from jaxprompt import templates
from jaxprompt.data import folder as folder_lib
from jaxprompt.data.protocol import (
    Example,
    MatchReport,
    Split,
    canonical_order,
    load_split_file,
    make_random_split,
    match_split,
    split_trainval,
)

log = logging.getLogger(__name__)

# ImageNet indices of ImageNet-A's and ImageNet-R's 200 classes, ascending (protocol.md section 9).
IMAGENET_A_INDICES: tuple[int, ...] = (
    6,
    11,
    13,
    15,
    17,
    22,
    23,
    27,
    30,
    37,
    39,
    42,
    47,
    50,
    57,
    70,
    71,
    76,
    79,
    89,
    90,
    94,
    96,
    97,
    99,
    105,
    107,
    108,
    110,
    113,
    124,
    125,
    130,
    132,
    143,
    144,
    150,
    151,
    207,
    234,
    235,
    254,
    277,
    283,
    287,
    291,
    295,
    298,
    301,
    306,
    307,
    308,
    309,
    310,
    311,
    313,
    314,
    315,
    317,
    319,
    323,
    324,
    326,
    327,
    330,
    334,
    335,
    336,
    347,
    361,
    363,
    372,
    378,
    386,
    397,
    400,
    401,
    402,
    404,
    407,
    411,
    416,
    417,
    420,
    425,
    428,
    430,
    437,
    438,
    445,
    456,
    457,
    461,
    462,
    470,
    472,
    483,
    486,
    488,
    492,
    496,
    514,
    516,
    528,
    530,
    539,
    542,
    543,
    549,
    552,
    557,
    561,
    562,
    569,
    572,
    573,
    575,
    579,
    589,
    606,
    607,
    609,
    614,
    626,
    627,
    640,
    641,
    642,
    643,
    658,
    668,
    677,
    682,
    684,
    687,
    701,
    704,
    719,
    736,
    746,
    749,
    752,
    758,
    763,
    765,
    768,
    773,
    774,
    776,
    779,
    780,
    786,
    792,
    797,
    802,
    803,
    804,
    813,
    815,
    820,
    823,
    831,
    833,
    835,
    839,
    845,
    847,
    850,
    859,
    862,
    870,
    879,
    880,
    888,
    890,
    897,
    900,
    907,
    913,
    924,
    932,
    933,
    934,
    937,
    943,
    945,
    947,
    951,
    954,
    956,
    957,
    959,
    971,
    972,
    980,
    981,
    984,
    986,
    987,
    988,
)
IMAGENET_R_INDICES: tuple[int, ...] = (
    1,
    2,
    4,
    6,
    8,
    9,
    11,
    13,
    22,
    23,
    26,
    29,
    31,
    39,
    47,
    63,
    71,
    76,
    79,
    84,
    90,
    94,
    96,
    97,
    99,
    100,
    105,
    107,
    113,
    122,
    125,
    130,
    132,
    144,
    145,
    147,
    148,
    150,
    151,
    155,
    160,
    161,
    162,
    163,
    171,
    172,
    178,
    187,
    195,
    199,
    203,
    207,
    208,
    219,
    231,
    232,
    234,
    235,
    242,
    245,
    247,
    250,
    251,
    254,
    259,
    260,
    263,
    265,
    267,
    269,
    276,
    277,
    281,
    288,
    289,
    291,
    292,
    293,
    296,
    299,
    301,
    308,
    309,
    310,
    311,
    314,
    315,
    319,
    323,
    327,
    330,
    334,
    335,
    337,
    338,
    340,
    341,
    344,
    347,
    353,
    355,
    361,
    362,
    365,
    366,
    367,
    368,
    372,
    388,
    390,
    393,
    397,
    401,
    407,
    413,
    414,
    425,
    428,
    430,
    435,
    437,
    441,
    447,
    448,
    457,
    462,
    463,
    469,
    470,
    471,
    472,
    476,
    483,
    487,
    515,
    546,
    555,
    558,
    570,
    579,
    583,
    587,
    593,
    594,
    596,
    609,
    613,
    617,
    621,
    629,
    637,
    657,
    658,
    701,
    717,
    724,
    763,
    768,
    774,
    776,
    779,
    780,
    787,
    805,
    812,
    815,
    820,
    824,
    833,
    847,
    852,
    866,
    875,
    883,
    889,
    895,
    907,
    928,
    931,
    932,
    933,
    934,
    936,
    937,
    943,
    945,
    947,
    948,
    949,
    951,
    953,
    954,
    957,
    963,
    965,
    967,
    980,
    981,
    983,
    988,
)


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
    """CLIP's 1000 hand-cleaned ImageNet class names, in ImageNet index (sorted wnid) order."""
    text = resources.files("jaxprompt").joinpath("assets/imagenet_classnames.txt").read_text()
    names = tuple(line.rstrip("\n") for line in text.splitlines() if line.strip())
    assert len(names) == 1000, len(names)
    return names


# ------------------------------------------------------------------------------------------------
# Class-name cleaning (protocol.md section 1.1), from TFDS ClassLabel names
# ------------------------------------------------------------------------------------------------

# A label rule maps TFDS label names to (CoOp class names, {tfds label: CoOp label}).
LabelRule = Callable[[Sequence[str]], tuple[list[str], dict[int, int]]]


def _identity_rule(clean: Callable[[str], str] = lambda s: s) -> LabelRule:
    def rule(names: Sequence[str]) -> tuple[list[str], dict[int, int]]:
        return [clean(n) for n in names], {i: i for i in range(len(names))}

    return rule


_CALTECH_CASE = {"faces": "Faces", "leopards": "Leopards", "motorbikes": "Motorbikes"}
_CALTECH_DROP = {"background_google", "faces_easy"}
_CALTECH_RENAME = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}


def caltech_folder(tfds_name: str) -> str:
    """CoOp's folder name for a (lowercased) TFDS caltech101 label."""
    return _CALTECH_CASE.get(tfds_name, tfds_name)


def _caltech_rule(names: Sequence[str]) -> tuple[list[str], dict[int, int]]:
    # CoOp sorts the original folders case-sensitively, so Faces/Leopards/Motorbikes come first.
    folders = sorted(caltech_folder(n) for n in names if n not in _CALTECH_DROP)
    rank = {f: i for i, f in enumerate(folders)}
    mapping = {i: rank[caltech_folder(n)] for i, n in enumerate(names) if n not in _CALTECH_DROP}
    return [_CALTECH_RENAME.get(f, f) for f in folders], mapping


def cars_name(meta_name: str) -> str:
    """'AM General Hummer SUV 2000' -> '2000 AM General Hummer SUV' (year moved to the front)."""
    *rest, year = meta_name.split(" ")
    return " ".join([year, *rest])


def _food_rule(names: Sequence[str]) -> tuple[list[str], dict[int, int]]:
    # CoOp uses sorted(os.listdir()): '_' sorts before letters, so cheese_plate (16) precedes
    # cheesecake (17), the reverse of TFDS/classes.txt.
    ordered = sorted(names)
    rank = {n: i for i, n in enumerate(ordered)}
    return ordered, {i: rank[n] for i, n in enumerate(names)}


def sun397_name(path: str) -> str:
    """'/a/apartment_building/outdoor' -> 'outdoor apartment_building'."""
    parts = path.strip("/").split("/")[1:]
    return " ".join(reversed(parts))


EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


def ucf101_name(camel: str) -> str:
    """'ApplyEyeMakeup' -> 'Apply_Eye_Makeup', 'YoYo' -> 'Yo_Yo' (split before capitals)."""
    return "_".join(re.findall(r"[A-Z][^A-Z]*|^[^A-Z]+", camel))


def _imagenet_rule(names: Sequence[str]) -> tuple[list[str], dict[int, int]]:
    return list(imagenet_classnames()), {i: i for i in range(len(names))}


def _subset_rule(indices: Sequence[int]) -> LabelRule:
    # A and R: labels live in the 1000-class space; the 200 classes present, ranked ascending.
    def rule(names: Sequence[str]) -> tuple[list[str], dict[int, int]]:
        del names
        all_names = imagenet_classnames()
        return [all_names[i] for i in indices], {j: r for r, j in enumerate(indices)}

    return rule


# ------------------------------------------------------------------------------------------------
# Record keys: TFDS record -> CoOp relative path
# ------------------------------------------------------------------------------------------------

# A key rule gets (record, TFDS split, TFDS label names) and returns CoOp's relative path.
KeyRule = Callable[[dict, str, Sequence[str]], str]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _field(name: str, transform: Callable[[str], str] = lambda s: s) -> KeyRule:
    return lambda rec, split, names: transform(_text(rec[name]))


def _label_dir(field: str, folder: Callable[[str], str] = lambda s: s) -> KeyRule:
    """``<label folder>/<basename of field>``."""
    return lambda rec, split, names: (
        f"{folder(names[int(rec['label'])])}/{os.path.basename(_text(rec[field]))}"
    )


def _cars_key(rec: dict, split: str, names: Sequence[str]) -> str:
    del names
    folder = "cars_test" if split == "test" else "cars_train"
    return f"{folder}/{_text(rec['id'])}.jpg"


# ------------------------------------------------------------------------------------------------
# Raw-file listers (datasets TFDS lacks or breaks)
# ------------------------------------------------------------------------------------------------

# A lister reads a manual_dir and returns (image root, split, class names).
Lister = Callable[[str], tuple[str, Split, list[str]]]


def _find(base: str, *candidates: str) -> str:
    for c in candidates:
        p = os.path.join(base, c)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"none of {list(candidates)} under {base}")


def list_fgvc_aircraft(manual_dir: str) -> tuple[str, Split, list[str]]:
    """fgvc-aircraft-2013b ``data/``: official variant lists, in file order, labels = line index
    of ``variants.txt``. The 20-px copyright banner is kept (as CoOp does)."""
    data = _find(manual_dir, "fgvc-aircraft-2013b/data", "data", ".")
    names = folder_lib.read_classnames(os.path.join(data, "variants.txt"))
    index = {n: i for i, n in enumerate(names)}
    split: Split = {}
    for s in ("train", "val", "test"):
        split[s] = []
        with open(os.path.join(data, f"images_variant_{s}.txt")) as f:
            for line in f:
                if line.strip():
                    img, variant = line.strip().split(" ", 1)
                    split[s].append(Example(f"{img}.jpg", index[variant], variant))
    return os.path.join(data, "images"), split, names


def list_ucf101(manual_dir: str) -> tuple[str, Split, list[str]]:
    """CoOp's ``UCF-101-midframes`` (one middle frame per video, folder per class).

    With ``split_zhou_UCF101.json`` beside the frames it is used; otherwise a 50/20/30 split.
    """
    root = _find(manual_dir, "UCF-101-midframes", "ucf101/UCF-101-midframes", ".")
    split, names = folder_lib.scan_image_folder(root)
    json_path = os.path.join(manual_dir, "split_zhou_UCF101.json")
    if os.path.exists(json_path):
        split = load_split_file(json_path)
        names = _names_from_split(split)
    return root, split, names


def _loadmat(path: str) -> dict:
    from scipy.io import loadmat  # optional: only the Cars manual path needs it

    return loadmat(path, squeeze_me=True)


def list_stanford_cars(manual_dir: str) -> tuple[str, Split, list[str]]:
    """Stanford Cars from the original archives, extracted into ``manual_dir``:
    ``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat``
    and ``cars_test_annos_withlabels.mat``. Train is split 80/20 into train/val (CoOp's
    ``split_trainval``, seed 0) unless ``split_zhou_StanfordCars.json`` is in ``manual_dir``."""
    meta = _loadmat(_find(manual_dir, "devkit/cars_meta.mat", "cars_meta.mat"))
    names = [cars_name(str(n)) for n in meta["class_names"]]
    split: Split = {}
    for s, folder, annos in (
        ("train", "cars_train", ("devkit/cars_train_annos.mat", "cars_train_annos.mat")),
        (
            "test",
            "cars_test",
            ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"),
        ),
    ):
        mat = _loadmat(_find(manual_dir, *annos))["annotations"]
        split[s] = [
            Example(f"{folder}/{str(a['fname'])}", int(a["class"]) - 1, names[int(a["class"]) - 1])
            for a in mat
        ]
    json_path = os.path.join(manual_dir, "split_zhou_StanfordCars.json")
    if os.path.exists(json_path):
        split = load_split_file(json_path)
    else:
        split["train"], split["val"] = split_trainval(split["train"])
    return manual_dir, split, names


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to read one dataset the CoOp way.

    Attributes:
      name: CoOp's dataset NAME (also the key of ``templates.COOP_TEMPLATES``).
      num_classes: number of classes in CoOp's label space.
      template: CoOp's zero-shot template.
      tfds: TFDS builder and version (``"food101:2.1.0"``), or None if read from raw files.
      tfds_splits: CoOp split -> TFDS splits to use when no split file is given.
      auto_split: how to get train/val/test with no split file: ``"native"`` (``tfds_splits``
        as given), ``"trainval"`` (CoOp's 80/20 of the given train, official test) or
        ``"random"`` (CoOp's 50/20/30 of the union).
      key: TFDS record -> CoOp relative path.
      labels: TFDS label names -> (CoOp names, TFDS label -> CoOp label); None keeps TFDS's.
      lister: reads raw files from ``manual_dir`` (for datasets TFDS lacks or breaks).
      split_file: CoOp's split file name, for messages.
      manual: what to download by hand and where to put it.
      aliases: other accepted names (lowercase).
      test_only: the ImageNet variants (no train/val; no base/new).
      custom: ``("folder" | "csv", path)`` for user datasets.
      generator: builds the dataset in memory instead of reading files (the toy world).
    """

    name: str
    num_classes: int
    template: str = "a photo of a {}."
    tfds: str | None = None
    tfds_splits: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    auto_split: str = "native"
    key: KeyRule | None = None
    labels: LabelRule | None = None
    lister: Lister | None = None
    split_file: str | None = None
    manual: str | None = None
    aliases: tuple[str, ...] = ()
    test_only: bool = False
    custom: tuple[str, str] | None = None
    generator: Callable[[DatasetSpec], LoadedDataset] | None = None

    @property
    def prepared_name(self) -> str:
        """The TFDS name of the array_record dataset ``prepare`` writes."""
        if self.tfds:
            return self.tfds.split(":")[0].split("/")[0]
        return "jp_" + re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Adds (or replaces) a catalog entry; returns it."""
    DATASETS[spec.name] = spec
    return spec


def names() -> list[str]:
    """All catalog names."""
    return list(DATASETS)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def get_dataset(name: str) -> DatasetSpec:
    """Looks up a catalog entry by name or alias (case/underscore-insensitive), or builds one for
    ``"folder:PATH"`` / ``"csv:PATH"``.

    Raises:
      KeyError: a one-line message listing the valid names.
    """
    for prefix in ("folder:", "csv:"):
        if name.startswith(prefix):
            path = os.path.abspath(os.path.expanduser(name[len(prefix) :]))
            base = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "custom"
            return DatasetSpec(name=base, num_classes=0, custom=(prefix[:-1], path))
    wanted = _slug(name)
    for spec in DATASETS.values():
        if wanted in {_slug(spec.name), *(_slug(a) for a in spec.aliases)}:
            return spec
    raise KeyError(
        f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, or folder:PATH / csv:PATH"
    )


# DomainNet (POUF's target sets): read from TFDS ``domainnet/<domain>`` by the POUF runner,
# named ``DomainNet/<domain>`` (or ``domainnet_<domain>``, ``domainnet:<domain>``; a domain by
# its first letter too). Not catalog entries: only POUF adapts on them.
# The protocol's dataset sets (CoOp's 11 datasets; ImageNet and its shifted variants), in the
# papers' table order: cross-dataset transfer's targets, `jaxprompt reproduce --datasets`.
COOP11 = (
    "ImageNet",
    "Caltech101",
    "OxfordPets",
    "StanfordCars",
    "OxfordFlowers",
    "Food101",
    "FGVCAircraft",
    "SUN397",
    "DescribableTextures",
    "EuroSAT",
    "UCF101",
)
IMAGENET_VARIANTS = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_DOMAINNET_PREFIXES = ("domainnet/", "domainnet_", "domainnet:")


def domainnet_domain(name: str) -> str | None:
    """The DomainNet domain that ``name`` names (``"DomainNet/clipart"``, ``"domainnet_c"``
    -> ``"clipart"``), or None when ``name`` is not a DomainNet name.

    Raises:
      KeyError: a DomainNet name with an unknown domain (a one-line message listing them).
    """
    low = name.lower()
    for prefix in _DOMAINNET_PREFIXES:
        if low.startswith(prefix):
            domain = low[len(prefix) :]
            full = {d[0]: d for d in DOMAINNET_DOMAINS}.get(domain, domain)
            if full not in DOMAINNET_DOMAINS:
                raise KeyError(
                    f"unknown DomainNet domain {name[len(prefix) :]!r}; choose one of "
                    f"{', '.join(DOMAINNET_DOMAINS)}"
                )
            return full
    return None


def canonical_name(name: str) -> str | None:
    """The catalog name of a dataset given by name or any alias, in any case and punctuation
    (``"dtd"`` and ``"Describable-Textures"`` -> ``"DescribableTextures"``): the one resolution
    every per-dataset setting goes through. None for ``folder:``/``csv:`` datasets.

    Raises:
      KeyError: an unknown name (a one-line message listing the valid names).
    """
    if name.startswith(("folder:", "csv:")):
        return None
    return get_dataset(name).name


def _t(name: str) -> str:
    return templates.COOP_TEMPLATES[name]


_IMAGENET_MANUAL = (
    "ImageNet (ILSVRC2012) needs a manual download: put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar into MANUAL_DIR (by default ~/tensorflow_datasets/downloads/manual), "
    "then run `jaxprompt prepare --dataset ImageNet --manual_dir MANUAL_DIR` (needs TensorFlow)."
)
_CARS_MANUAL = (
    "Stanford Cars: the Stanford URLs are dead (TFDS cars196 cannot download). Extract the "
    "original cars_train.tgz, cars_test.tgz and car_devkit.tgz into MANUAL_DIR and add "
    "cars_test_annos_withlabels.mat, so MANUAL_DIR holds cars_train/, cars_test/, devkit/ and "
    "cars_test_annos_withlabels.mat (optionally split_zhou_StanfordCars.json); then "
    "`jaxprompt prepare --dataset StanfordCars --manual_dir MANUAL_DIR`. Mirrors with renamed "
    "files will not match the .mat annotations."
)

for _spec in (
    DatasetSpec(
        "ImageNet",
        1000,
        _t("ImageNet"),
        tfds="imagenet2012:5.1.0",
        tfds_splits={"train": ("train",), "test": ("validation",)},
        key=_label_dir("file_name"),
        labels=_imagenet_rule,
        manual=_IMAGENET_MANUAL,
        aliases=("imagenet1k", "imagenet2012", "ilsvrc2012"),
    ),
    DatasetSpec(
        "Caltech101",
        100,
        _t("Caltech101"),
        tfds="caltech101:3.0.2",
        tfds_splits={"all": ("train", "test")},
        auto_split="random",
        key=_label_dir("image/file_name", caltech_folder),
        labels=_caltech_rule,
        split_file="split_zhou_Caltech101.json",
        aliases=("caltech", "caltech-101"),
    ),
    DatasetSpec(
        "OxfordPets",
        37,
        _t("OxfordPets"),
        tfds="oxford_iiit_pet:4.0.0",
        tfds_splits={"train": ("train",), "test": ("test",)},
        auto_split="trainval",
        key=_field("file_name"),
        labels=_identity_rule(str.lower),
        split_file="split_zhou_OxfordPets.json",
        aliases=("oxford_iiit_pet", "pets"),
    ),
    DatasetSpec(
        "StanfordCars",
        196,
        _t("StanfordCars"),
        tfds="cars196:2.1.0",
        tfds_splits={"train": ("train",), "test": ("test",)},
        auto_split="trainval",
        key=_cars_key,
        labels=_identity_rule(cars_name),
        lister=list_stanford_cars,
        split_file="split_zhou_StanfordCars.json",
        manual=_CARS_MANUAL,
        aliases=("cars", "cars196", "stanford_cars"),
    ),
    DatasetSpec(
        "OxfordFlowers",
        102,
        _t("OxfordFlowers"),
        tfds="oxford_flowers102:2.1.1",
        tfds_splits={"all": ("train", "validation", "test")},
        auto_split="random",
        key=_field("file_name"),
        labels=_identity_rule(lambda s: s.rstrip("?")),
        split_file="split_zhou_OxfordFlowers.json",
        aliases=("flowers", "flowers102", "oxford_flowers102", "oxford_flowers"),
    ),
    DatasetSpec(
        "Food101",
        101,
        _t("Food101"),
        tfds="food101:2.1.0",  # 2.0.0 has no `id`
        tfds_splits={"all": ("train", "validation")},
        auto_split="random",
        key=_field("id", lambda s: f"{s}.jpg"),
        labels=_food_rule,
        split_file="split_zhou_Food101.json",
        aliases=("food", "food-101"),
    ),
    DatasetSpec(
        "FGVCAircraft",
        100,
        _t("FGVCAircraft"),
        lister=list_fgvc_aircraft,
        manual=(
            "FGVC-Aircraft is not in TFDS: extract fgvc-aircraft-2013b.tar.gz into MANUAL_DIR "
            "(MANUAL_DIR/fgvc-aircraft-2013b/data/images, variants.txt, images_variant_*.txt)."
        ),
        aliases=("aircraft", "fgvc_aircraft", "fgvc"),
    ),
    DatasetSpec(
        "SUN397",
        397,
        _t("SUN397"),
        tfds="sun397/standard-part1-120k:4.0.0",
        tfds_splits={"train": ("train",), "test": ("test",)},
        auto_split="trainval",
        key=_field("file_name", lambda s: s.lstrip("/")),
        labels=_identity_rule(sun397_name),
        split_file="split_zhou_SUN397.json",
        aliases=("sun",),
    ),
    DatasetSpec(
        "DescribableTextures",
        47,
        _t("DescribableTextures"),
        tfds="dtd:3.0.1",
        tfds_splits={"all": ("train", "validation", "test")},
        auto_split="random",
        key=_field("file_name"),
        labels=_identity_rule(),
        split_file="split_zhou_DescribableTextures.json",
        aliases=("dtd", "textures"),
    ),
    DatasetSpec(
        "EuroSAT",
        10,
        _t("EuroSAT"),
        tfds="eurosat/rgb:2.0.0",
        tfds_splits={"all": ("train",)},
        auto_split="random",
        key=_label_dir("filename"),
        labels=_identity_rule(lambda s: EUROSAT_NAMES.get(s, s)),
        split_file="split_zhou_EuroSAT.json",
        aliases=("eurosat_rgb",),
    ),
    DatasetSpec(
        "UCF101",
        101,
        _t("UCF101"),
        lister=list_ucf101,
        split_file="split_zhou_UCF101.json",
        manual=(
            "UCF101 mid-frames are not in TFDS (its ucf101 is video): unzip CoOp's "
            "UCF-101-midframes.zip into MANUAL_DIR and put split_zhou_UCF101.json beside it."
        ),
        aliases=("ucf", "ucf-101"),
    ),
    DatasetSpec(
        "ImageNetV2",
        1000,
        _t("ImageNetV2"),
        tfds="imagenet_v2/matched-frequency:3.0.0",
        tfds_splits={"test": ("test",)},
        key=_field("file_name"),
        labels=_imagenet_rule,
        aliases=("imagenet_v2", "imagenetv2_matched_frequency"),
        test_only=True,
    ),
    DatasetSpec(
        "ImageNetSketch",
        1000,
        _t("ImageNetSketch"),
        tfds="imagenet_sketch:1.0.0",
        tfds_splits={"test": ("test",)},
        key=_field("file_name"),
        labels=_imagenet_rule,
        aliases=("imagenet_sketch", "sketch"),
        test_only=True,
    ),
    DatasetSpec(
        "ImageNetA",
        200,
        _t("ImageNetA"),
        tfds="imagenet_a:0.1.0",
        tfds_splits={"test": ("test",)},
        key=_label_dir("file_name"),
        labels=_subset_rule(IMAGENET_A_INDICES),
        aliases=("imagenet_a", "imagenet-adversarial"),
        test_only=True,
    ),
    DatasetSpec(
        "ImageNetR",
        200,
        _t("ImageNetR"),
        tfds="imagenet_r:0.2.0",
        tfds_splits={"test": ("test",)},
        key=_field("file_name"),
        labels=_subset_rule(IMAGENET_R_INDICES),
        aliases=("imagenet_r", "imagenet-rendition"),
        test_only=True,
    ),
):
    register(_spec)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedDataset:
    """A dataset ready for the protocol and the pipeline.

    Attributes:
      spec: the catalog entry.
      split: full train/val/test ``Example`` lists (CoOp labels and names).
      classnames: class names in label order (names keep underscores).
      fetch: reads one example's image (encoded bytes or a uint8 array).
      report: how a split file matched the images, if one was given.
      source: where images are read from, for messages.
    """

    spec: DatasetSpec
    split: Split
    classnames: list[str]
    fetch: Callable[[Example], Any]
    report: MatchReport | None = None
    source: str = ""

    @property
    def template(self) -> str:
        """The zero-shot template."""
        return self.spec.template


def _names_from_split(split: Split) -> list[str]:
    names: dict[int, str] = {}
    for items in split.values():
        for x in items:
            names.setdefault(x.label, x.classname)
    return [names[i] for i in sorted(names)]


def _file_fetch(root: str) -> Callable[[Example], bytes]:
    def fetch(x: Example) -> bytes:
        with open(os.path.join(root, x.key), "rb") as f:
            return f.read()

    return fetch


def _default_data_dir(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _prepared_dir(spec: DatasetSpec, data_dir: str) -> str | None:
    """The directory of the newest version of a dataset written by our own builder, if any."""
    base = os.path.join(data_dir, spec.prepared_name)
    if not os.path.isdir(base):
        return None
    versions = sorted(
        (v for v in os.listdir(base) if os.path.exists(os.path.join(base, v, "dataset_info.json"))),
        key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit()),
    )
    return os.path.join(base, versions[-1]) if versions else None


INDEX_FILE = "jaxprompt_index.json"


def _scan(src: Any, start: int, stop: int) -> list[dict]:
    try:
        return src.__getitems__(list(range(start, stop)))  # one batched read
    except TypeError:  # tfds.testing.mock_data's data source has no working __getitems__
        return [src[i] for i in range(start, stop)]


def _tfds_index(builder: Any, spec: DatasetSpec, splits: Sequence[str]) -> dict[str, list]:
    """Maps every record to ``[key, CoOp label, record index]`` per TFDS split.

    The scan reads every record once (images are not decoded) and is cached in
    ``jaxprompt_index.json`` beside the data, so later loads are instant.
    """
    import tensorflow_datasets as tfds

    data_dir = os.fspath(builder.data_dir)
    cache = os.path.join(data_dir, INDEX_FILE)
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    features = builder.info.features
    label_names = list(features["label"].names) if "label" in features else []
    _, to_coop = (spec.labels or _identity_rule())(label_names)
    index: dict[str, list] = {}
    for s in splits:
        try:
            src = builder.as_data_source(split=s, decoders={"image": tfds.decode.SkipDecoding()})
            _scan(src, 0, min(1, len(src)))
        except Exception:  # noqa: BLE001 - tfds.testing.mock_data cannot skip decoding
            src = builder.as_data_source(split=s)
        rows = []
        for start in range(0, len(src), 256):
            stop = min(start + 256, len(src))
            for i, rec in zip(range(start, stop), _scan(src, start, stop), strict=True):
                if "key" in rec:  # written by jaxprompt prepare: key and CoOp label stored
                    rows.append([_text(rec["key"]), int(rec["label"]), i])
                    continue
                label = to_coop.get(int(rec["label"]))
                if label is not None:  # e.g. Caltech's BACKGROUND_Google is dropped
                    rows.append([spec.key(rec, s, label_names), label, i])
        index[s] = rows
    # Cache only beside real prepared data (never into mock metadata or read-only dirs).
    if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        try:
            with open(cache + ".tmp", "w") as f:
                json.dump(index, f)
            os.replace(cache + ".tmp", cache)
        except OSError as e:
            log.warning("could not cache %s: %s", cache, e)
    return index


def _load_builder(
    spec: DatasetSpec, builder: Any, splits: Sequence[str], raw_bytes: bool
) -> tuple[dict[str, list[Example]], list[str], Callable]:
    """Examples, class names and a fetch function for a TFDS builder (real or mocked)."""
    import tensorflow_datasets as tfds

    index = _tfds_index(builder, spec, splits)
    label_names = list(builder.info.features["label"].names)
    names = spec.labels(label_names)[0] if spec.labels is not None else label_names
    # Our own datasets store the original bytes, decoded later with PIL (grey/CMYK/alpha safe);
    # TFDS builders store images re-encoded with the declared channels, so TFDS may decode them.
    decoders = {"image": tfds.decode.SkipDecoding()} if raw_bytes else None
    sources = {s: builder.as_data_source(split=s, decoders=decoders) for s in index}
    where: dict[str, tuple[str, int]] = {}
    by_split: dict[str, list[Example]] = {}
    for s, rows in index.items():
        by_split[s] = []
        for key, label, i in rows:
            where[key] = (s, i)
            by_split[s].append(Example(key, label, names[label]))

    def fetch(x: Example) -> Any:
        s, i = where[x.key]
        return sources[s][i]["image"]

    return by_split, names, fetch


def _open_tfds(spec: DatasetSpec, data_dir: str) -> Any | None:
    """The TFDS builder of a TFDS-backed entry if its data can be read (or is mocked)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec.tfds, data_dir=data_dir)
    except Exception:  # noqa: BLE001 - unknown version/config: treat as not prepared
        return None
    splits = [s for group in spec.tfds_splits.values() for s in group]
    try:
        builder.as_data_source(split=splits[0])
    except Exception:  # noqa: BLE001 - not prepared
        return None
    return builder


def _auto_split(spec: DatasetSpec, by_split: dict[str, list[Example]]) -> Split:
    """Train/val/test without a split file (see ``DatasetSpec.auto_split``)."""
    if spec.test_only:
        test = [x for s in spec.tfds_splits.get("test", tuple(by_split)) for x in by_split[s]]
        return {"train": [], "val": [], "test": test}
    take = lambda name: [x for s in spec.tfds_splits.get(name, ()) for x in by_split.get(s, [])]
    # Records come in shuffled order; sort by key so the rebuilt split does not depend on it.
    order = lambda xs: sorted(xs, key=lambda x: (x.label, x.key))
    if spec.auto_split == "random":
        return make_random_split(order(take("all")))
    if spec.auto_split == "trainval":
        train, val = split_trainval(order(take("train")))
        return {"train": train, "val": val, "test": order(take("test"))}
    return {s: order(take(s)) for s in ("train", "val", "test")}


def load_dataset(
    name: str | DatasetSpec,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    split_file: str | None = None,
    classnames: str | Sequence[str] | None = None,
) -> LoadedDataset:
    """Loads a dataset's examples, class names and image reader.

    Args:
      name: catalog name/alias, ``"folder:PATH"``, ``"csv:PATH"``, or a ``DatasetSpec``.
      data_dir: TFDS data dir holding datasets written by ``prepare`` (default
        ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      manual_dir: raw files for entries with a lister (FGVCAircraft, UCF101, StanfordCars), read
        directly when no prepared copy exists.
      split_file: a CoOp ``split_zhou_*.json`` (or a split saved by ``save_split``); its
        train/val/test, labels and names are used, matched by relative path (see ``report``).
      classnames: class-names file or list, for ``csv:`` datasets.

    Returns:
      A ``LoadedDataset``.

    Raises:
      FileNotFoundError: the data is neither prepared nor available raw; the message says how to
        get it.
    """
    import tensorflow_datasets as tfds

    spec = get_dataset(name) if isinstance(name, str) else name
    if spec.generator is not None:
        return spec.generator(spec)
    data_dir = _default_data_dir(data_dir)
    prepared = _prepared_dir(spec, data_dir)
    builder = None if prepared or spec.tfds is None else _open_tfds(spec, data_dir)
    if prepared is not None:
        b = tfds.builder_from_directory(prepared)
        by_split, names, fetch = _load_builder(spec, b, list(b.info.splits), raw_bytes=True)
        split, source = {s: by_split.get(s, []) for s in ("train", "val", "test")}, prepared
    elif builder is not None:
        splits = [s for group in spec.tfds_splits.values() for s in group]
        by_split, names, fetch = _load_builder(spec, builder, splits, raw_bytes=False)
        split, source = _auto_split(spec, by_split), os.fspath(builder.data_dir)
    elif spec.custom is not None:
        kind, path = spec.custom
        if kind == "folder":
            split, names = folder_lib.scan_image_folder(path)
            root = path
        else:
            split, names = folder_lib.read_csv(path, classnames=classnames)
            root = os.path.dirname(path)
        fetch, source = _file_fetch(root), path
    elif spec.lister is not None and manual_dir is not None:
        root, split, names = spec.lister(manual_dir)
        fetch, source = _file_fetch(root), root
    else:
        how = spec.manual or f"run `jaxprompt prepare --dataset {spec.name} --data_dir {data_dir}`"
        raise FileNotFoundError(f"{spec.name} is not prepared under {data_dir}. {how}")
    report = None
    if split_file is None:
        split = canonical_order(split)
    else:
        split, report = match_split(
            load_split_file(split_file), [x.key for xs in split.values() for x in xs]
        )
        names = _names_from_split(split)
        if not report.ok:
            log.warning(
                "%s: split file %s did not fully match:\n%s",
                spec.name,
                split_file,
                report.summary(),
            )
    return LoadedDataset(spec, split, list(names), fetch, report, source)


def as_uint8(image: Any) -> np.ndarray:
    """Helper for users: any fetched image as a uint8 RGB array."""
    from jaxprompt.data.pipeline import decode_rgb

    return decode_rgb(image)


def apply_protocol(
    dataset: LoadedDataset,
    *,
    shots: int,
    seed: int,
    subset: str = "all",
    workdir: str | None = None,
) -> tuple[Split, list[str]]:
    """Few-shot sampling then base/new selection, recorded in the run directory.

    The sampled split is written to ``<workdir>/data/shot_<K>-seed_<S>.json`` (CoOp rows plus the
    dataset name and fingerprint). If that file already exists it is reused, so a resumed or
    repeated run trains on exactly the same examples, and a shared file reproduces a run.

    Args:
      dataset: from ``load_dataset``.
      shots: K (``<= 0`` for all training data).
      seed: run seed.
      subset: ``"all"``, ``"base"`` or ``"new"``.
      workdir: run directory, or None to skip recording.

    Returns:
      ``(split, classnames)``: the relabelled split and the class names in its label order.
    """
    from jaxprompt.data import protocol

    record = None
    if workdir is not None:
        record = os.path.join(workdir, "data", protocol.fewshot_filename(shots, seed))
    if record is not None and os.path.exists(record):
        split = protocol.load_split_file(record)
    else:
        split = protocol.sample_few_shot(dataset.split, shots=shots, seed=seed)
        if record is not None:
            protocol.save_split(record, split, dataset=dataset.spec.name, shots=shots, seed=seed)
    if dataset.spec.test_only or not split["train"]:
        if subset != "all":
            raise ValueError(f"{dataset.spec.name} has no train split; base/new needs one")
        return split, list(dataset.classnames)
    split = protocol.subsample_classes(split, subset)
    return split, protocol.classnames(split["train"])
