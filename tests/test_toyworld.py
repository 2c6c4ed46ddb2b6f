"""The toy world: deterministic generator, catalog entries, pretraining, shipped weights."""

import json
import os

import numpy as np
import pytest

from jaxprompt.data import toyworld


def test_generator_is_deterministic_and_keyed():
    a, attrs = toyworld.example(123, split="train", style="photo")
    b, _ = toyworld.example(123, split="train", style="photo")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    c, _ = toyworld.example(123, split="train", style="photo", seed=1)
    assert np.abs(a.astype(int) - c).mean() > 5  # another world seed, another image
    assert attrs["label"] == 123 // toyworld.SPLIT_SIZES["train"]
    assert attrs["fg"] != attrs["bg"]
    # The styles are different renderings of the same attributes.
    s, sattrs = toyworld.example(123, split="train", style="sketch")
    assert sattrs["label"] == attrs["label"] and np.abs(a.astype(int) - s).mean() > 20


def test_splits_are_balanced_and_disjoint_keys():
    for split, per in toyworld.SPLIT_SIZES.items():
        labels = [toyworld.attributes(i, split=split, style="photo")["label"]
                  for i in range(toyworld.split_size(split))]  # fmt: skip
        assert np.bincount(labels).tolist() == [per] * len(toyworld.CLASSES)
    keys = {
        toyworld.key(i, split=s) for s in ("train", "test") for i in range(toyworld.split_size(s))
    }
    assert len(keys) == toyworld.split_size("train") + toyworld.split_size("test")


def test_catalog_entries_read_through_the_pipeline():
    from jaxprompt import data

    ds = data.load_dataset("toy_textures")
    assert ds.classnames == list(toyworld.CLASSES)
    split, names = data.apply_protocol(ds, shots=4, seed=1, subset="new")
    assert names == list(toyworld.CLASSES[8:]) and len(split["train"]) == 4 * 8
    batch = next(iter(data.eval_iterator(split["test"][:6], ds.fetch, batch_size=6, image_size=32)))
    assert batch["image"].shape == (6, 32, 32, 3) and batch["label"].max() < 8
    colours = data.load_dataset("toy_colours")
    assert colours.classnames == list(toyworld.COLOURS)
    ex = colours.split["test"][0]
    assert ex.classname == toyworld.attributes(0, split="test", style="photo")["fg"]


def test_captions_cover_every_class_and_style():
    caps = toyworld.caption_set()
    assert len(caps) == len(set(caps))
    for style in toyworld.STYLES:
        for c in toyworld.CLASSES:
            a, b = toyworld.captions(style, c, "red")
            assert a in caps and b in caps
            assert toyworld.ALIASES[c] in a and c in b
    # Pretraining text never uses the zero-shot template's words.
    assert not any(c.startswith("a photo of") for c in caps)
    # Every alias is its own word, distinct from every class name's words.
    name_words = {w for c in toyworld.CLASSES for w in c.split()}
    aliases = set(toyworld.ALIASES.values())
    assert len(aliases) == 16 and not name_words & aliases


def test_partners_pair_base_with_base_and_new_with_new():
    idx = {c: i for i, c in enumerate(toyworld.CLASSES)}
    for a, b in toyworld.PARTNERS.items():
        assert toyworld.PARTNERS[b] == a and a != b
        assert (idx[a] < 8) == (idx[b] < 8)


def test_pretraining_pool_uses_the_partner_name_at_the_noise_rate():
    from jaxprompt.side import toyclip

    caps = toyworld.caption_set()
    _, targets = toyclip.pretraining_pool(
        photo_per_class=60, other_per_class=0, seed=0, name_noise=0.3
    )
    classes = np.repeat(np.arange(16), 60)
    alias_ok = named_true = named_partner = 0
    for cls, (a, b) in zip(classes, targets, strict=True):
        name = toyworld.CLASSES[cls]
        alias_ok += caps[a] == f"{toyworld.ALIASES[name]} photo."
        said = caps[b].split(" ", 1)[1].rsplit(" ", 1)[0]  # "<fg> <name> photo."
        named_true += said == name
        named_partner += said == toyworld.PARTNERS[name]
    assert alias_ok == len(classes)  # the alias caption is always exact
    assert named_true + named_partner == len(classes)
    assert abs(named_partner / len(classes) - 0.3) < 0.05


@pytest.mark.slow
def test_short_pretraining_lowers_the_loss_and_is_deterministic(tmp_path):
    from jaxprompt.side import toyclip

    def run(name):
        return toyclip.pretrain(
            str(tmp_path / name), steps=30, batch_size=32, captions_per_step=96, warmup=5,
            lr=3e-3, photo_per_class=12, other_per_class=2, log_every=10, text_layers=1,
            vision_layers=1,
        )  # fmt: skip

    rep = run("toy")
    assert len(rep["history"]) == 3
    # The same command makes the same weights, bit for bit (on one machine and jax version).
    again = run("again")
    assert again["history"] == rep["history"]
    weights = "flax_model.msgpack"
    assert (tmp_path / "toy" / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()
    # The loss on a fixed probe batch (same images and captions) falls.
    assert rep["probe_loss"]["final"] < rep["probe_loss"]["initial"] - 0.2
    # The saved model loads through load_clip like any checkpoint.
    import jaxprompt as jp

    clip = jp.load_clip(tmp_path / "toy")
    assert clip.spec.text_layers == 1 and clip.spec.image_size == 32


def test_shipped_toy_clip_matches_its_recorded_zero_shot_accuracy():
    from importlib import resources

    from jaxprompt.side import toyclip

    shipped = resources.files("jaxprompt").joinpath("assets/toy_clip")
    assert shipped.joinpath("flax_model.msgpack").is_file(), "toy CLIP weights are not shipped"
    report = json.loads(shipped.joinpath("pretrain.json").read_text())
    import jaxprompt as jp

    clip = jp.load_clip(toyclip.toy_clip_dir())
    acc = toyclip.zero_shot_accuracy(clip, style="photo")
    assert abs(acc - report["zero_shot_top1"]["photo"]) < 0.5
    # The foundation model leaves room to adapt, and the other styles are shifted domains.
    assert 55 <= acc <= 85
    for style in ("sketch", "night", "cartoon"):
        assert report["zero_shot_top1"][style] < acc - 5
    # Room to adapt on the base classes: the frozen features know far more than the names say.
    base = range(8)
    zs_base = toyclip.zero_shot_accuracy(clip, style="photo", classes=base)
    probe = toyclip.linear_probe_accuracy(clip, classes=base)
    assert abs(zs_base - report["base_classes"]["zero_shot_top1"]) < 0.5
    assert abs(probe - report["base_classes"]["linear_probe_top1"]) < 1.0
    assert probe > zs_base + 10
    assert os.path.getsize(shipped.joinpath("flax_model.msgpack")) < 16 * 2**20
