"""Tests for jaxprompt.data: protocol, catalog, readers, pipeline and on-device augmentation.

Everything is generated here (tiny image folders, CSVs, split files, array_record datasets) or
mocked with ``tfds.testing.mock_data``; no network, nothing outside the repo.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxprompt import data
from jaxprompt.data import augment as augment_lib
from jaxprompt.data import catalog, pipeline, protocol
from jaxprompt.data.protocol import Example

CLASSES = ("cat", "dog", "eel")


def _image(rng: np.random.Generator, h: int, w: int, mode: str) -> Image.Image:
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "L":
        return img.convert("L")
    if mode == "P":
        return img.convert("RGB").convert("P")
    return img if mode == "RGBA" else img.convert("RGB")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """cat/dog/eel with 7 images each: odd sizes, grey, palette and alpha images mixed in."""
    root = tmp_path_factory.mktemp("imgs") / "toyfolder"
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P", "RGB", "RGB", "RGB"]
    for c in CLASSES:
        os.makedirs(root / c)
        for i, mode in enumerate(modes):
            h, w = int(rng.integers(17, 90)), int(rng.integers(17, 90))
            ext = "jpg" if mode in ("RGB", "L") else "png"
            _image(rng, h, w, mode).save(root / c / f"{c}_{i:02d}.{ext}")
    return str(root)


def _examples(counts: dict[int, int], names: str = "abcdefghij") -> list[Example]:
    return [
        Example(f"{names[y]}/{i:03d}.jpg", y, names[y]) for y, n in counts.items() for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------
# Protocol
# ------------------------------------------------------------------------------------------------


def _coop_reference(train, val, k, seed):
    """CoOp's generate_fewshot_dataset, written out with the global `random` module."""
    random.seed(seed)
    out = []
    for items in (train, val):
        kk = k if items is train else min(k, 4)
        groups: dict[int, list] = {}
        for x in items:
            groups.setdefault(x[1], []).append(x)
        sampled = []
        for g in groups.values():
            sampled += random.sample(g, kk) if len(g) >= kk else g
        out.append(sampled)
    return out


@pytest.mark.parametrize("shots", protocol.SHOTS)
@pytest.mark.parametrize("seed", protocol.SEEDS)
def test_few_shot_is_coops_algorithm_and_balanced(shots, seed):
    # Blocks not in label order (as in the Flowers/Cars JSONs) and one class with few images.
    train = _examples({3: 20, 0: 18, 2: 5, 1: 30})
    val = _examples({3: 6, 0: 2, 2: 9, 1: 4})
    got = protocol.sample_few_shot({"train": train, "val": val, "test": []}, shots=shots, seed=seed)
    ref_train, ref_val = _coop_reference(train, val, shots, seed)
    assert got["train"] == ref_train and got["val"] == ref_val
    counts = {y: sum(x.label == y for x in got["train"]) for y in range(4)}
    assert counts == {y: min(shots, n) for y, n in {3: 20, 0: 18, 2: 5, 1: 30}.items()}
    vcounts = {y: sum(x.label == y for x in got["val"]) for y in range(4)}
    assert vcounts == {y: min(shots, 4, n) for y, n in {3: 6, 0: 2, 2: 9, 1: 4}.items()}
    assert len({x.key for x in got["train"]}) == len(got["train"])  # no duplicates


def test_few_shot_label_order_and_seed_matter():
    train = _examples({1: 30, 0: 30})
    a = protocol.sample_few_shot({"train": train}, shots=4, seed=1)["train"]
    # First-appearance order (1 then 0) draws differently from sorted order.
    resorted = sorted(train, key=lambda x: x.label)
    b = protocol.sample_few_shot({"train": resorted}, shots=4, seed=1)["train"]
    assert {x.key for x in a} != {x.key for x in b}
    c = protocol.sample_few_shot({"train": train}, shots=4, seed=2)["train"]
    assert a != c
    assert a == protocol.sample_few_shot({"train": train}, shots=4, seed=1)["train"]


def test_few_shot_independent_of_record_order():
    items = _examples({0: 12, 1: 15, 2: 9})
    shuffled = list(items)
    random.Random(7).shuffle(shuffled)
    split_a = protocol.canonical_order({"train": items, "val": [], "test": []})
    split_b = protocol.canonical_order({"train": shuffled, "val": [], "test": []})
    a = protocol.sample_few_shot(split_a, shots=4, seed=3)
    b = protocol.sample_few_shot(split_b, shots=4, seed=3)
    assert a == b


@pytest.mark.parametrize("n", [2, 5, 10, 37, 101])
def test_base_new_disjoint_and_relabelled(n):
    train = [Example(f"c{y}/0.jpg", y, f"class{y}") for y in range(n)]
    test = [Example(f"c{y}/1.jpg", y, f"class{y}") for y in range(n)]
    split = {"train": train, "val": [], "test": test}
    base = protocol.subsample_classes(split, "base")
    new = protocol.subsample_classes(split, "new")
    m = math.ceil(n / 2)
    assert [x.label for x in base["test"]] == list(range(m))
    assert [x.label for x in new["test"]] == list(range(n - m))
    base_names, new_names = protocol.classnames(base["train"]), protocol.classnames(new["train"])
    assert base_names == [f"class{y}" for y in range(m)]
    assert new_names == [f"class{y}" for y in range(m, n)]
    assert not set(base_names) & set(new_names)
    assert protocol.subsample_classes(split, "all") == split
    with pytest.raises(ValueError):
        protocol.base_new_labels(range(4), "novel")


def test_split_file_roundtrip_and_fingerprint(tmp_path):
    split = {"train": _examples({0: 3, 1: 2}), "val": [], "test": _examples({1: 1})}
    fp = protocol.save_split(tmp_path / "s.json", split, dataset="x", shots=2, seed=1)
    assert protocol.load_split_file(tmp_path / "s.json") == split
    rows = {k: [[x.key, x.label, x.classname] for x in v] for k, v in split.items()}
    assert fp == protocol.fingerprint(rows) and len(fp) == 16


def test_split_file_import_reports_unmatched(folder, tmp_path):
    ds = data.load_dataset(f"folder:{folder}", data_dir=str(tmp_path / "none"))
    keys = sorted(x.key for xs in ds.split.values() for x in xs)
    lab = {c: i for i, c in enumerate(CLASSES)}
    rows = [[k, lab[k.split("/")[0]], k.split("/")[0]] for k in keys]
    js = {
        "train": rows[:8] + [["cat/missing_01.jpg", 0, "cat"]],
        "val": [[rows[8][0].upper(), rows[8][1], rows[8][2]]],  # found case-insensitively
        "test": rows[9:15] + [["dog/gone.jpg", 1, "dog"]],
    }
    path = tmp_path / "split_zhou_Toy.json"
    path.write_text(json.dumps(js))
    ds2 = data.load_dataset(
        f"folder:{folder}", data_dir=str(tmp_path / "none"), split_file=str(path)
    )
    rep = ds2.report
    assert not rep.ok
    assert rep.missing == {"train": ["cat/missing_01.jpg"], "val": [], "test": ["dog/gone.jpg"]}
    assert rep.unused == sorted(set(keys) - set(keys[:15]))
    assert rep.renamed == {rows[8][0].upper(): rows[8][0]}
    assert [x.key for x in ds2.split["train"]] == [r[0] for r in rows[:8]]  # file order kept
    assert "missing 2" in rep.summary()


# ------------------------------------------------------------------------------------------------
# Catalog
# ------------------------------------------------------------------------------------------------

# Copied verbatim from the protocol spec, section 9 (TPT's thousand_k_to_200 / imagenet_r_mask).
_SPEC_A = (
    "6,11,13,15,17,22,23,27,30,37,39,42,47,50,57,70,71,76,79,89,90,94,96,97,99,105,107,108,110,"
    "113,124,125,130,132,143,144,150,151,207,234,235,254,277,283,287,291,295,298,301,306,307,308,"
    "309,310,311,313,314,315,317,319,323,324,326,327,330,334,335,336,347,361,363,372,378,386,397,"
    "400,401,402,404,407,411,416,417,420,425,428,430,437,438,445,456,457,461,462,470,472,483,486,"
    "488,492,496,514,516,528,530,539,542,543,549,552,557,561,562,569,572,573,575,579,589,606,607,"
    "609,614,626,627,640,641,642,643,658,668,677,682,684,687,701,704,719,736,746,749,752,758,763,"
    "765,768,773,774,776,779,780,786,792,797,802,803,804,813,815,820,823,831,833,835,839,845,847,"
    "850,859,862,870,879,880,888,890,897,900,907,913,924,932,933,934,937,943,945,947,951,954,956,"
    "957,959,971,972,980,981,984,986,987,988"
)
_SPEC_R = (
    "1,2,4,6,8,9,11,13,22,23,26,29,31,39,47,63,71,76,79,84,90,94,96,97,99,100,105,107,113,122,"
    "125,130,132,144,145,147,148,150,151,155,160,161,162,163,171,172,178,187,195,199,203,207,208,"
    "219,231,232,234,235,242,245,247,250,251,254,259,260,263,265,267,269,276,277,281,288,289,291,"
    "292,293,296,299,301,308,309,310,311,314,315,319,323,327,330,334,335,337,338,340,341,344,347,"
    "353,355,361,362,365,366,367,368,372,388,390,393,397,401,407,413,414,425,428,430,435,437,441,"
    "447,448,457,462,463,469,470,471,472,476,483,487,515,546,555,558,570,579,583,587,593,594,596,"
    "609,613,617,621,629,637,657,658,701,717,724,763,768,774,776,779,780,787,805,812,815,820,824,"
    "833,847,852,866,875,883,889,895,907,928,931,932,933,934,936,937,943,945,947,948,949,951,953,"
    "954,957,963,965,967,980,981,983,988"
)


def test_imagenet_a_r_indices_match_spec():
    a = tuple(int(v) for v in _SPEC_A.split(","))
    r = tuple(int(v) for v in _SPEC_R.split(","))
    assert data.IMAGENET_A_INDICES == a and data.IMAGENET_R_INDICES == r
    assert len(a) == len(r) == 200 and list(a) == sorted(set(a)) and list(r) == sorted(set(r))
    assert len(set(a) & set(r)) == 86
    names, mapping = data.get_dataset("ImageNetA").labels([])
    assert mapping[6] == 0 and mapping[988] == 199 and 0 not in mapping and len(names) == 200
    assert names[0] == data.imagenet_classnames()[6]


def test_imagenet_classnames_asset():
    names = data.imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert names.count("missile") == 2 and names.count("sunglasses") == 2  # as in CLIP's list


def test_catalog_names_templates_and_unknown():
    coop = [n for n, spec in data.DATASETS.items() if spec.generator is None]
    assert len(coop) == 15  # the 11 CoOp datasets and 4 ImageNet variants
    assert {n for n in data.DATASETS if n.startswith("toy_")} == {
        "toy_textures", "toy_textures_sketch", "toy_textures_night", "toy_textures_cartoon",
        "toy_colours",
    }  # fmt: skip
    assert data.get_dataset("dtd").name == "DescribableTextures"
    assert data.get_dataset("oxford_pets").template == "a photo of a {}, a type of pet."
    assert data.get_dataset("EUROSAT").template == "a centered satellite photo of {}."
    with pytest.raises(KeyError) as e:
        data.get_dataset("mnist")
    msg = str(e.value)
    assert "\n" not in msg and "OxfordPets" in msg and "folder:PATH" in msg


def test_class_name_cleaning_rules():
    cal = [ln.strip() for ln in (
        "accordion airplanes background_google faces faces_easy leopards motorbikes wild_cat"
    ).split()]
    names, mapping = data.get_dataset("Caltech101").labels(cal)
    assert names == ["face", "leopard", "motorbike", "accordion", "airplane", "wild_cat"]
    assert mapping[cal.index("faces")] == 0 and cal.index("background_google") not in mapping
    food, fmap = data.get_dataset("Food101").labels(["cheesecake", "cheese_plate", "apple_pie"])
    assert food == ["apple_pie", "cheese_plate", "cheesecake"] and fmap == {0: 2, 1: 1, 2: 0}
    assert catalog.cars_name("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"
    assert catalog.sun397_name("/a/apartment_building/outdoor") == "outdoor apartment_building"
    assert catalog.sun397_name("/c/car_interior/backseat") == "backseat car_interior"
    assert catalog.ucf101_name("HandstandPushups") == "Handstand_Pushups"
    assert catalog.ucf101_name("YoYo") == "Yo_Yo"
    assert data.get_dataset("EuroSAT").labels(["SeaLake"])[0] == ["Sea or Lake"]
    assert data.get_dataset("Flowers").labels(["pink-yellow dahlia?"])[0] == ["pink-yellow dahlia"]


def test_register_adds_a_catalog_entry():
    spec = data.DatasetSpec("ToyWorldTest", 3, aliases=("toyworld_test",))
    try:
        data.register(spec)
        assert data.get_dataset("toyworld_test") is spec and "ToyWorldTest" in data.names()
    finally:
        data.DATASETS.pop("ToyWorldTest")


def test_tfds_mock_data_through_data_source():
    # mock_data serves tfds.data_source/as_data_source in tfds 4.9.10 (decoded numpy images).
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset("OxfordPets", data_dir="/nonexistent_jaxprompt_dir")
        assert ds.classnames[:2] == ["abyssinian", "american_bulldog"]
        assert len(ds.split["test"]) == 6 and len(ds.split["train"]) == 6
        img = data.decode_rgb(ds.fetch(ds.split["test"][0]))
        assert img.ndim == 3 and img.shape[-1] == 3
        it = data.eval_iterator(ds.split["test"], ds.fetch, batch_size=4, shard=(0, 1))
        batches = list(it)
        assert len(batches) == 2 and batches[1]["mask"].sum() == 2
        assert batches[0]["image"].shape == (4, 224, 224, 3)
        cars = data.load_dataset("StanfordCars", data_dir="/nonexistent_jaxprompt_dir")
        assert all(x.key.startswith("cars_test/") for x in cars.split["test"])
        a = data.load_dataset("ImageNetA", data_dir="/nonexistent_jaxprompt_dir")
        assert len(a.classnames) == 200 and all(0 <= x.label < 200 for x in a.split["test"])


# ------------------------------------------------------------------------------------------------
# Custom datasets: folder and CSV
# ------------------------------------------------------------------------------------------------


def test_image_folder_dataset(folder, tmp_path):
    ds = data.load_dataset(f"folder:{folder}", data_dir=str(tmp_path))
    assert ds.classnames == list(CLASSES) and ds.template == "a photo of a {}."
    counts = {s: len(v) for s, v in ds.split.items()}
    assert counts == {"train": 12, "val": 3, "test": 6}  # round(3.5)=4, round(1.4)=1 per class
    assert all(x.key.startswith(x.classname + "/") for xs in ds.split.values() for x in xs)


def test_csv_dataset(folder, tmp_path):
    lines = ["path,label,split"]
    for i, c in enumerate(CLASSES):
        for j in range(3):
            lines.append(f"{folder}/{c}/{c}_{j:02d}.{'jpg' if j < 2 else 'png'},{i},"
                         f"{'train' if j < 2 else 'test'}")
    csv_path = tmp_path / "toy.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    (tmp_path / "toy.classnames.txt").write_text("kitty\npuppy\nfish\n")
    ds = data.load_dataset(f"csv:{csv_path}", data_dir=str(tmp_path / "none"))
    assert ds.classnames == ["kitty", "puppy", "fish"]
    assert len(ds.split["train"]) == 6 and len(ds.split["test"]) == 3
    assert data.decode_rgb(ds.fetch(ds.split["test"][0])).shape[-1] == 3


# ------------------------------------------------------------------------------------------------
# Preprocessing and pipeline
# ------------------------------------------------------------------------------------------------


def _pil_reference(img: Image.Image, size: int = 224) -> np.ndarray:
    """torchvision Resize(224, bicubic) + CenterCrop(224) + ToTensor, written with PIL directly."""
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0


@pytest.mark.parametrize(
    "shape,mode", [((375, 500), "RGB"), ((501, 333), "RGB"), ((97, 61), "L"), ((225, 227), "RGBA"),
                   ((300, 224), "P"), ((224, 224), "RGB"), ((1000, 41), "RGB")],
)
def test_eval_preprocessing_matches_pil(shape, mode):
    img = _image(np.random.default_rng(sum(shape)), *shape, mode)
    buf = __import__("io").BytesIO()
    img.save(buf, format="PNG")
    ours = data.eval_transform(buf.getvalue())
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    back = ours * np.asarray(data.CLIP_STD) + np.asarray(data.CLIP_MEAN)
    np.testing.assert_allclose(back, _pil_reference(img), atol=1 / 255)


def test_train_iterator_resume_and_sharding(folder, tmp_path):
    ds = data.load_dataset(f"folder:{folder}", data_dir=str(tmp_path))
    train = ds.split["train"]
    kw = dict(batch_size=4, seed=5, image_size=64, num_threads=2)
    it = data.train_iterator(train, ds.fetch, shard=(0, 1), **kw)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    after = [next(it) for _ in range(4)]  # crosses an epoch boundary (12 examples / 4)
    it2 = data.train_iterator(train, ds.fetch, shard=(0, 1), **kw)
    it2.set_state(state)
    for a, b in zip(after, [next(it2) for _ in range(4)], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert first[0]["image"].shape == (4, 64, 64, 3) and first[0]["image"].dtype == np.uint8
    # Two hosts with half the batch see, together, exactly the one-host global batch.
    h0 = data.train_iterator(train, ds.fetch, shard=(0, 2), **{**kw, "batch_size": 2})
    h1 = data.train_iterator(train, ds.fetch, shard=(1, 2), **{**kw, "batch_size": 2})
    b0, b1 = next(h0), next(h1)
    glob = np.sort(first[0]["image"].reshape(4, -1).sum(1))
    np.testing.assert_array_equal(
        glob, np.sort(np.concatenate([b0["image"], b1["image"]]).reshape(4, -1).sum(1))
    )
    # Each epoch covers every example once.
    labels = np.concatenate([b["label"] for b in first])
    assert sorted(labels.tolist()) == sorted(x.label for x in train)


def test_eval_iterator_pads_and_shards(folder, tmp_path):
    ds = data.load_dataset(f"folder:{folder}", data_dir=str(tmp_path))
    test = ds.split["test"]  # 6 examples
    seen = []
    for host in range(2):
        it = data.eval_iterator(test, ds.fetch, batch_size=2, shard=(host, 2), num_threads=2)
        assert len(it) == 2
        for b in it:
            assert b["image"].shape == (2, 224, 224, 3)
            seen += b["label"][b["mask"]].tolist()
            assert (b["label"][~b["mask"]] == -1).all()
    assert sorted(seen) == sorted(x.label for x in test)


# ------------------------------------------------------------------------------------------------
# Train crops from the full-resolution image (issue 15) and Dassl's epochs
# ------------------------------------------------------------------------------------------------


def _rrc_box_reference(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params as its documentation describes it, written
    independently: same draws in the same order (area, log-ratio; then top, left)."""
    for _ in range(10):
        frac = rng.uniform(scale[0], scale[1])
        log_r = rng.uniform(np.log(ratio[0]), np.log(ratio[1]))
        w = round(float(np.sqrt(height * width * frac * np.exp(log_r))))
        h = round(float(np.sqrt(height * width * frac / np.exp(log_r))))
        if 1 <= w <= width and 1 <= h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    w, h = width, height
    if aspect < ratio[0]:
        h = round(width / ratio[0])
    elif aspect > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def _fine_image(height: int = 900, width: int = 1200) -> Image.Image:
    """High-resolution synthetic image with detail at the pixel scale (a 512 canvas blurs it)."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack(
        [
            (np.sin(xx * 1.3) + np.cos(yy * 0.7)) * 60 + 128,
            ((xx // 3 + yy // 2) % 2) * 255,
            rng.integers(0, 256, (height, width)),
        ],
        axis=-1,
    )
    return Image.fromarray(arr.astype(np.uint8))


def _reference_view(img, rng, size, method, pre=None, scale=(0.08, 1.0)):
    """The reference train transform with PIL calls only: optional square resize (tllib
    ResizeImage, PIL's default bicubic), crop then resize (torchvision resized_crop on PIL),
    flip with p = 0.5."""
    if pre is not None:
        img = img.resize((pre, pre), Image.BICUBIC)
    top, left, h, w = _rrc_box_reference(rng, img.height, img.width, scale)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[method]
    out = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), resample))
    return out[:, ::-1] if rng.random() < 0.5 else out


def _torchvision_functional():
    try:  # a CUDA-only torchvision wheel next to a CPU torch raises RuntimeError on import
        import torchvision.transforms.functional as tvf
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchvision not usable: {e}")
    return tvf


@pytest.mark.parametrize("shape", [(900, 1200), (375, 500), (64, 40), (1000, 10), (10, 1000)])
def test_crop_box_sampler_replays_reference_and_constraints(shape):
    height, width = shape
    for seed in range(300):
        box = pipeline.sample_crop_box(np.random.default_rng(seed), height=height, width=width)
        assert box == _rrc_box_reference(np.random.default_rng(seed), height, width)
        top, left, h, w = box
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        # Area >= 8 % (but for the fallback of the extreme shapes) and ratio in [3/4, 4/3], up
        # to the rounding of the sides to pixels.
        assert (h + 0.5) * (w + 0.5) >= 0.08 * height * width or min(shape) == 10
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
    if min(shape) == 10:  # no attempt ever fits: the centred crop with the ratio clamped
        side = round(10 / 0.75)
        expect = (493, 0, side, 10) if height > width else (0, 493, 10, side)
        box = pipeline.sample_crop_box(np.random.default_rng(0), height=height, width=width)
        assert box == expect


def test_crop_box_sampler_distribution():
    """Area fraction ~ U(0.08, 1) and log-ratio ~ U(log 3/4, log 4/3) where every attempt fits
    (a large square image, fractions below 0.56), corners uniform."""
    rng = np.random.default_rng(0)
    boxes = np.asarray(
        [pipeline.sample_crop_box(rng, height=4000, width=4000, scale=(0.08, 0.5))
         for _ in range(4000)]
    )  # fmt: skip
    top, left, h, w = boxes.T
    frac = h * w / 4000**2
    log_r = np.log(w / h)
    # Kolmogorov-Smirnov distance to the uniform laws (critical value at 4000 draws ~ 0.026).
    for x, lo, hi in ((frac, 0.08, 0.5), (log_r, np.log(3 / 4), np.log(4 / 3))):
        u = np.sort((x - lo) / (hi - lo))
        assert np.max(np.abs(u - (np.arange(1, u.size + 1) - 0.5) / u.size)) < 0.03
    u = np.sort(top / (4000 - h))  # uniform over the free range
    assert np.max(np.abs(u - (np.arange(1, u.size + 1) - 0.5) / u.size)) < 0.03


def test_crop_box_sampler_matches_torchvision_distribution():
    _torchvision_functional()  # skips without a usable torchvision
    import torch
    from torchvision.transforms import RandomResizedCrop

    img = _fine_image(300, 400)
    torch.manual_seed(0)
    ref = np.asarray([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                      for _ in range(4000)])  # fmt: skip
    rng = np.random.default_rng(0)
    ours = np.asarray([pipeline.sample_crop_box(rng, height=300, width=400)
                       for _ in range(4000)])  # fmt: skip
    for col in range(4):
        assert abs(np.mean(ours[:, col]) - np.mean(ref[:, col])) < 0.05 * np.mean(ref[:, col])


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_resized_crop_of_full_image_matches_pil_reference(method):
    img = _fine_image()
    rng = np.random.default_rng(1)
    worst = 0
    for _ in range(8):
        top, left, h, w = box = _rrc_box_reference(rng, img.height, img.width)
        ours = np.asarray(pipeline.resized_crop(img, box=box, size=224, method=method))
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[method]
        ref = np.asarray(img.crop((left, top, left + w, top + h)).resize((224, 224), resample))
        worst = max(worst, int(np.abs(ours.astype(int) - ref).max()))
    assert worst <= 1  # within 1/255 (measured: 0, PIL does the same work)
    # The previous pipeline (512 canvas, crop on device) is far off on such an image.
    canvas, _ = data.to_canvas(img, 512)
    s = 512 / img.width
    old = np.asarray(augment_lib.crop_and_resize(
        canvas, np.asarray([top * s, left * s, h * s, w * s], np.float32), 224, method
    ))  # fmt: skip
    assert np.abs(old - ref).mean() > 2.0


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_resized_crop_matches_torchvision(method):
    tvf = _torchvision_functional()
    from torchvision.transforms import InterpolationMode

    img = _fine_image()
    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[method]
    for box in ((17, 33, 97, 131), (0, 0, 900, 1200), (400, 611, 300, 211)):
        ours = np.asarray(pipeline.resized_crop(img, box=box, size=224, method=method))
        ref = np.asarray(tvf.resized_crop(img, *box, [224, 224], interpolation=mode))
        assert np.abs(ours.astype(int) - ref).max() <= 1


@pytest.mark.parametrize("augment,size", [("coop", 224), ("pouf", 224), ("pouf", 32)])
def test_train_view_is_the_reference_transform(augment, size):
    img = _fine_image(450, 600)
    for seed in range(6):
        ours = pipeline.train_view(
            img, np.random.default_rng(seed), size=size, augment=augment
        )
        if augment == "pouf":  # tllib: ResizeImage(256) then RandomResizedCrop(224) bilinear
            pre, method = {224: 256, 32: 37}[size], "bilinear"
        else:
            pre, method = None, "bicubic"
        ref = _reference_view(img, np.random.default_rng(seed), size, method, pre)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - ref).max() <= 1


def _indexed(n: int):
    """n examples whose label is their index, and a fetch that draws a distinct 600x450 PNG."""
    examples = [Example(f"x/{i:03d}.png", i, "c") for i in range(n)]

    def fetch(x):
        arr = np.asarray(_fine_image(60, 80)).copy()
        arr[..., 0] = arr[..., 0] // 2 + x.label  # per-example content
        return np.asarray(Image.fromarray(arr).resize((600, 450), Image.NEAREST))

    return examples, fetch


def test_train_iterator_crops_are_the_reference_on_the_full_image():
    examples, fetch = _indexed(6)
    it = data.train_iterator(examples, fetch, batch_size=3, seed=4, image_size=48,
                             shard=(0, 1), num_threads=2)  # fmt: skip
    for step in range(4):  # two epochs of two batches
        b = next(it)
        for img, j in zip(b["image"], b["label"], strict=True):
            epoch = step // 2
            rng = pipeline.example_rng(4, stream=pipeline._CROP_STREAM, epoch=epoch, index=int(j))
            ref = _reference_view(Image.fromarray(fetch(examples[j])), rng, 48, "bicubic")
            assert np.abs(img.astype(int) - ref).max() <= 1


def test_train_iterator_has_dassl_epochs():
    n, batch = 14, 4  # 3 full batches an epoch, 2 examples dropped
    examples, fetch = _indexed(n)
    kw = dict(batch_size=batch, seed=9, image_size=16, num_threads=2)
    it = data.train_iterator(examples, fetch, shard=(0, 1), **kw)
    assert it.batches_per_epoch == n // batch == 3
    epochs = [[next(it)["label"].tolist() for _ in range(3)] for _ in range(4)]
    orders = [sum(e, []) for e in epochs]
    for order in orders:  # a permutation prefix: 12 distinct examples, none from the next epoch
        assert len(set(order)) == 12 and set(order) <= set(range(n))
    assert len({tuple(o) for o in orders}) == 4  # a fresh shuffle every epoch
    assert len({frozenset(range(n)) - set(o) for o in orders}) > 1  # different ones dropped
    # Resume mid-epoch: the same batches follow, pixels included.
    it = data.train_iterator(examples, fetch, shard=(0, 1), **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(5)]
    it2 = data.train_iterator(examples, fetch, shard=(0, 1), **kw)
    it2.set_state(state)
    for a, b in zip(want, [next(it2) for _ in range(5)], strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])
    assert [w["label"].tolist() for w in want] == sum(epochs, [])[5:10]
    # Two hosts: host i takes its share of each global batch, the same epochs.
    hosts = [data.train_iterator(examples, fetch, shard=(i, 2), **{**kw, "batch_size": 2})
             for i in range(2)]  # fmt: skip
    assert hosts[0].batches_per_epoch == 3
    for step in range(6):
        parts = [next(h) for h in hosts]
        # Host i holds elements i, i + 2 of the global batch.
        joined = {k: np.stack([p[k] for p in parts], axis=1) for k in ("label", "image")}
        assert joined["label"].ravel().tolist() == epochs[step // 3][step % 3]
    np.testing.assert_array_equal(joined["image"].reshape(want[0]["image"].shape),
                                  want[0]["image"])  # step 5, pixels too


def test_train_iterator_rejects_unknown_augment_and_short_data():
    examples, fetch = _indexed(3)
    with pytest.raises(ValueError, match="augmentation"):
        data.train_iterator(examples, fetch, batch_size=2, seed=0, augment="simclr", shard=(0, 1))
    with pytest.raises(ValueError, match="no full global batch"):
        data.train_iterator(examples, fetch, batch_size=2, seed=0, shard=(0, 2))


def test_eval_iterator_tpt_views_from_full_image():
    examples, fetch = _indexed(5)
    kw = dict(batch_size=2, image_size=32, views=3, seed=2, num_threads=2)
    seen = {}
    for host in range(2):
        for b in data.eval_iterator(examples, fetch, shard=(host, 2), **kw):
            assert b["views"].shape == (2, 3, 32, 32, 3) and b["views"].dtype == np.uint8
            for v, j, m in zip(b["views"], b["label"], b["mask"], strict=True):
                if m:
                    seen[int(j)] = v
    assert sorted(seen) == list(range(5))
    for j, v in seen.items():  # bilinear RRC + flip of the full image, keyed by (seed, index)
        rng = pipeline.example_rng(2, stream=pipeline._VIEW_STREAM, epoch=0, index=j)
        img = Image.fromarray(fetch(examples[j]))
        ref = np.stack([_reference_view(img, rng, 32, "bilinear") for _ in range(3)])
        assert np.abs(v.astype(int) - ref).max() <= 1
    view0 = np.zeros((32, 32, 3), np.float32)
    out = jax.jit(lambda k: augment_lib.tpt_views_from_crops(k, view0, seen[0]))(
        jax.random.key(0)
    )
    assert out.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(out[1:], augment_lib.normalize_on_device(seen[0]), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# On-device augmentation
# ------------------------------------------------------------------------------------------------


def test_rrc_box_within_image_and_scale():
    sizes = np.asarray([[100, 300], [50, 50], [400, 30]], np.int32)
    keys = jax.random.split(jax.random.key(0), 64)
    boxes = jax.jit(jax.vmap(jax.vmap(data.augment.rrc_box, (0, None)), (None, 0)))(keys, sizes)
    for s, b in zip(sizes, np.asarray(boxes), strict=True):
        top, left, h, w = b.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= int(s[0])).all() and (left + w <= int(s[1])).all()
        assert (h > 0).all() and (w > 0).all()


def test_train_augment_and_tpt_views_are_jittable_and_keyed():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    batch = {"image": images, "size": np.asarray([[64, 40], [30, 64]], np.int32),
             "label": np.asarray([0, 1], np.int32)}
    aug = jax.jit(data.train_augment)
    out = aug(jax.random.key(0), batch)
    assert out["image"].shape == (2, 224, 224, 3) and out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["image"], aug(jax.random.key(0), batch)["image"])
    assert not np.array_equal(out["image"], aug(jax.random.key(1), batch)["image"])
    lo = (0 - np.asarray(data.CLIP_MEAN)) / np.asarray(data.CLIP_STD)
    hi = (1 - np.asarray(data.CLIP_MEAN)) / np.asarray(data.CLIP_STD)
    img = np.asarray(out["image"])
    assert (img >= lo - 1e-5).all() and (img <= hi + 1e-5).all()


@pytest.mark.slow
def test_tpt_views_with_augmix():
    images = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    batch = {"size": np.asarray([[64, 40]], np.int32)}
    view0 = np.zeros((224, 224, 3), np.float32) + 0.5
    fn = jax.jit(lambda k: data.tpt_views(k, view0, images[0], batch["size"][0], n_views=3,
                                          use_augmix=True))
    views = fn(jax.random.key(3))
    assert views.shape == (4, 224, 224, 3)
    np.testing.assert_array_equal(views[0], view0)  # view 0 is the eval view, untouched
    assert np.isfinite(np.asarray(views)).all()


def test_augmix_ops_match_pil():
    from PIL import ImageOps

    rng = np.random.default_rng(1)
    img = rng.integers(20, 200, (32, 32, 3), dtype=np.uint8)
    x = jax.numpy.asarray(img, jax.numpy.float32)
    pil = Image.fromarray(img)
    np.testing.assert_array_equal(data.augment.equalize(x), np.asarray(ImageOps.equalize(pil)))
    poster = np.asarray(ImageOps.posterize(pil, 4))
    np.testing.assert_array_equal(data.augment.posterize(x, 4), poster)
    np.testing.assert_allclose(data.augment.autocontrast(x), np.asarray(ImageOps.autocontrast(pil)),
                               atol=1)


# ------------------------------------------------------------------------------------------------
# prepare + TF-free reading, end to end
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_folder_then_read_without_tensorflow(folder, tmp_path):
    data_dir = tmp_path / "tfds"
    assert data.prepare_main(["--dataset", f"folder:{folder}", "--data_dir", str(data_dir)]) == 0
    raw = data.load_dataset(f"folder:{folder}", data_dir=str(tmp_path / "none"))
    # A fresh process reads, samples and iterates; TensorFlow must never get imported.
    code = f"""
import sys, json
from jaxprompt import data
ds = data.load_dataset('folder:{folder}', data_dir='{data_dir}')
assert ds.source.startswith('{data_dir}'), ds.source
split, names = data.apply_protocol(ds, shots=2, seed=1, subset='base', workdir='{tmp_path}/run')
it = data.train_iterator(split['train'], ds.fetch, batch_size=2, seed=0, shard=(0, 1),
                          image_size=64)
b = next(it)
ev = next(data.eval_iterator(split['test'], ds.fetch, batch_size=2, shard=(0, 1)))
assert 'tensorflow' not in sys.modules
print(json.dumps({{"train": [x.key for x in split['train']], "names": names,
                  "shape": list(b['image'].shape), "eval": list(ev['image'].shape)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Same examples whether read from the raw folder or from the shuffled array_record copy.
    ref, ref_names = data.apply_protocol(raw, shots=2, seed=1, subset="base")
    assert got["train"] == [x.key for x in ref["train"]]
    assert got["names"] == ref_names == ["cat", "dog"]
    assert got["shape"] == [2, 64, 64, 3] and got["eval"] == [2, 224, 224, 3]
    recorded = json.loads((tmp_path / "run" / "data" / "shot_2-seed_1.json").read_text())
    assert recorded["shots"] == 2 and len(recorded["train"]) == 6
