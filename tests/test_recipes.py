"""Recipe details around the losses, as the official code runs them (issue 29): the training
set's batching, checked through the CLI on the toy world with the tiny CLIP."""

import json
import os

from jaxprompt import cli


def _train(tiny_clip_dir, workdir, *extra):
    args = [
        "jaxprompt", "train", "--config", "base2new:coop,runlocal=true",
        f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=2", *extra,
        "--workdir", str(workdir),
    ]  # fmt: skip
    return cli.main(args)


def _train_steps(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["step"] for r in rows if "loss" in r], [r["step"] for r in rows if "eval/base" in r]


def test_a_set_smaller_than_the_batch_is_one_batch_an_epoch_as_in_dassl(tiny_clip_dir, tmp_path):
    # 1 shot x 8 base classes = 8 examples, batch 32: Dassl keeps the partial batch (its
    # drop_last needs a whole batch), so each epoch is one step on all 8.
    wd = tmp_path / "small"
    assert _train(tiny_clip_dir, wd, "--config.data.shots=1", "--config.data.batch_size=32",
                  "--config.optim.epochs=3", "--config.log_every=1") == 0  # fmt: skip
    record = json.load(open(wd / "results.json"))
    assert record["batch_size"] == 8 and record["steps"] == 3
    assert _train_steps(wd)[0] == [1, 2, 3]


def test_a_small_set_that_cannot_split_over_the_devices_is_one_line(
    tiny_clip_dir, tmp_path, capsys
):
    # toy_colours has 8 classes, so base-to-novel trains on 4: one shot each is a batch of 4,
    # which 8 data-parallel devices cannot split.
    wd = tmp_path / "nosplit"
    args = [
        "jaxprompt", "train", "--config", "base2new:coop,runlocal=true,dataset=toy_colours",
        f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=2",
        "--config.data.shots=1", "--config.data.batch_size=32", "--workdir", str(wd),
    ]  # fmt: skip
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not wd.exists()
    assert err[-1] == (
        "jaxprompt: error: the 4 training examples are one batch (fewer than "
        "data.batch_size=32), which does not split over 8 data-parallel devices: use more "
        "shots, or fewer data-parallel devices (--config.mesh.model=K puts K of them on the "
        "model axis)"
    )


def test_partial_batches_are_dropped_and_epochs_end_on_whole_batches(tiny_clip_dir, tmp_path):
    # 16 examples at batch 6 on 2 data-parallel devices (x 4 on the model axis): floor(16 / 6)
    # = 2 steps an epoch (rounding up would give 3), so 2 epochs are 4 steps, evaluated at the
    # epoch ends 2 and 4.
    wd = tmp_path / "partial"
    assert _train(tiny_clip_dir, wd, "--config.data.batch_size=6", "--config.mesh.data=2",
                  "--config.mesh.model=4",
                  "--config.optim.epochs=2", "--config.eval_every_epochs=1",
                  "--config.log_every=1") == 0  # fmt: skip
    train_steps, eval_steps = _train_steps(wd)
    assert train_steps == [1, 2, 3, 4] and eval_steps == [2, 4]
    record = json.load(open(wd / "results.json"))
    assert record["batch_size"] == 6 and record["steps"] == 4


def test_online_tpt_sees_a_seeded_shuffle_of_the_test_split(tiny_clip_dir, tmp_path):
    import numpy as np

    from jaxprompt import data
    from jaxprompt.app import tpt

    stored = list(data.load_dataset("toy_textures").split["test"])
    labels = [x.label for x in stored[:200]]
    assert labels == sorted(labels)  # stored class by class: the order the carry must not see

    def expected(seed):
        return [stored[i].key for i in np.random.default_rng(seed).permutation(len(stored))]

    assert [x.key for x in tpt.stream(stored, online=True, seed=5)] == expected(5)
    assert tpt.stream(stored, online=True, seed=-1) == stored  # the stored order, on request
    assert tpt.stream(stored, online=False, seed=5) == stored  # episodic: order is irrelevant

    heads = {}
    for seed in (0, 7):
        wd = tmp_path / f"s{seed}"
        code = cli.main([
            "jaxprompt", "adapt", "--config",
            "adapt:tpt,dataset=toy_textures,runlocal=true,online=true",
            f"--config.clip.name={tiny_clip_dir}", "--config.data.limit=8",
            f"--config.data.stream_seed={seed}", "--workdir", str(wd),
        ])  # fmt: skip
        assert code == 0
        record = json.load(open(wd / "results.json"))
        assert record["stream_seed"] == seed and record["n"] == 8
        heads[seed] = record["stream_head"]
        assert heads[seed] == expected(seed)[:8]
    assert heads[0] != heads[7]
    assert len({k.split("/")[2] for k in heads[0]}) > 1  # several classes in the first batch


def test_training_crops_use_the_configured_scale(tiny_clip_dir, tmp_path, monkeypatch):
    # The toy presets crop 50-100% of the image (rrc_scale); a chain that dropped the setting
    # would fall back to torchvision's default 8-100% and still train.
    from jaxprompt.data import pipeline

    seen = []
    real = pipeline.sample_crop_box

    def recording(rng, **kw):
        seen.append(tuple(kw["scale"]))
        return real(rng, **kw)

    monkeypatch.setattr(pipeline, "sample_crop_box", recording)
    assert _train(tiny_clip_dir, tmp_path / "crops") == 0
    config = json.load(open(tmp_path / "crops" / "config.json"))
    assert tuple(config["data"]["rrc_scale"]) == (0.5, 1.0)
    assert seen and set(seen) == {(0.5, 1.0)}
