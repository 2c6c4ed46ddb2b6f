"""Checkpoint tests: round trips, retention, corrupt fallback, mismatch error, export."""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import checkpoint, sharding, train


def make_state(n_ctx: int = 3, step: int = 7) -> train.TrainState:
    """A TrainState with a nested prompt (CoCoOp-like) and a momentum optimizer state."""
    r = np.random.RandomState(n_ctx)
    prompt = {
        "ctx": jnp.asarray(r.randn(n_ctx, 8), jnp.float32),
        "meta_net": {
            "linear1": {
                "kernel": jnp.asarray(r.randn(8, 2), jnp.float32),
                "bias": jnp.asarray(r.randn(2), jnp.float32),
            },
        },
    }
    tx = train.make_optimizer(0.1)
    opt_state = tx.init(prompt)
    # Non-trivial momentum buffers, so the round trip checks real values.
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, prompt), opt_state, prompt)
    return train.TrainState(jnp.int32(step), prompt, opt_state)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tree_of_files(path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its bytes (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


META = {
    "method": "coop",
    "method_config": {"n_ctx": 3},
    "config": {"resolved": "run config"},
    "model": "tiny",
    "classnames": ["a", "b"],
}


def test_save_restore_identity(tmp_path):
    state = make_state()
    assert checkpoint.latest_step(tmp_path) is None
    step = checkpoint.save(tmp_path, state, meta=META, data_state={"i": 12, "epoch": [1, 2]})
    assert step == 7 and checkpoint.latest_step(tmp_path) == 7
    like = make_state(step=0)
    restored, meta, data_state = checkpoint.restore(tmp_path, like)
    assert_trees_equal(restored, state)
    assert isinstance(restored, train.TrainState)
    assert meta["method"] == "coop" and meta["method_config"] == {"n_ctx": 3}
    assert meta["config"] == {"resolved": "run config"} and meta["step"] == 7
    assert data_state == {"i": 12, "epoch": [1, 2]}


def test_restore_onto_a_mesh_and_extra_and_bytes_data_state(tmp_path):
    mesh = sharding.make_mesh()
    state = make_state()
    extra = {"total": {"ctx": jnp.full((3, 8), 2.0)}}
    checkpoint.save(tmp_path, state, meta=META, data_state=b"\x00grain\xff", extra=extra)
    like = sharding.replicate(make_state(step=0), mesh)
    restored, _, data_state, got_extra = checkpoint.restore(
        tmp_path, like, extra_like={"total": {"ctx": jnp.zeros((3, 8))}}
    )
    assert data_state == b"\x00grain\xff"
    assert_trees_equal(restored, state)
    assert_trees_equal(got_extra, extra)
    assert restored.prompt["ctx"].sharding == sharding.replicated(mesh)
    assert len(restored.prompt["ctx"].sharding.device_set) == 8


def test_keep_n_latest_and_never_overwrite(tmp_path):
    with checkpoint.Checkpointer(tmp_path, keep=2) as ck:
        for s in range(1, 5):
            ck.save(s, make_state(step=s), meta=META)
        ck.wait()
        assert ck.steps() == [3, 4]
        before = tree_of_files(checkpoint.checkpoint_dir(tmp_path) / "4")
        # Same step again, different content: skipped, the files stay as they were.
        assert ck.save(4, make_state(n_ctx=3, step=99), meta={"other": 1}) is False
    assert tree_of_files(checkpoint.checkpoint_dir(tmp_path) / "4") == before


def test_load_prompt_and_export_without_config(tmp_path):
    state = make_state()
    checkpoint.save(tmp_path, state, meta=META)
    prompt, meta = checkpoint.load_prompt(tmp_path)
    assert_trees_equal(prompt, jax.tree.map(np.asarray, state.prompt))
    assert meta["classnames"] == ["a", "b"]

    path = checkpoint.export(tmp_path, tmp_path / "prompt.npz")
    assert os.path.isfile(path) and not os.path.exists(str(path) + ".tmp")
    prompt2, meta2 = checkpoint.load_exported(path)
    assert_trees_equal(prompt2, prompt)
    assert meta2 == meta


def test_empty_prompt_round_trip(tmp_path):
    tx = train.make_optimizer(0.1)
    state = train.TrainState(jnp.int32(3), {}, tx.init({}))
    checkpoint.save(tmp_path, state, meta={"method": "zeroshot"})
    restored, _, _ = checkpoint.restore(tmp_path, train.TrainState(jnp.int32(0), {}, tx.init({})))
    assert restored.prompt == {} and int(restored.step) == 3
    assert checkpoint.load_prompt(tmp_path)[0] == {}


@pytest.mark.parametrize("damage", ["truncate_state", "remove_meta"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, damage):
    for s in (1, 2):
        checkpoint.save(tmp_path, make_state(step=s), meta=META)
    latest = checkpoint.checkpoint_dir(tmp_path) / "2"
    if damage == "truncate_state":
        # Truncate every data file of the array item: a half-written checkpoint.
        for root, _, files in os.walk(latest / "state"):
            for f in files:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
    else:
        for f in os.listdir(latest / "meta"):
            os.remove(latest / "meta" / f)
    files_before = tree_of_files(tmp_path)
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="checkpoints/2 is unreadable"):
        restored, meta, _ = checkpoint.restore(tmp_path, make_state(step=0))
    assert int(restored.step) == 1 and meta["step"] == 1
    assert tree_of_files(tmp_path) == files_before  # nothing deleted or rewritten


def test_mismatch_is_one_line_and_touches_nothing(tmp_path):
    checkpoint.save(tmp_path, make_state(n_ctx=3), meta=META)
    files_before = tree_of_files(tmp_path)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        checkpoint.restore(tmp_path, make_state(n_ctx=5))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in msg
    assert "prompt.ctx is (3, 8) in the checkpoint but (5, 8) expected" in msg
    assert "'coop' with {\"n_ctx\": 3}" in msg and "Fix:" in msg
    assert tree_of_files(tmp_path) == files_before

    # A missing group is named too.
    like = make_state()
    like = like._replace(
        prompt={**like.prompt, "vision_ctx": jnp.zeros((2, 8))},
        opt_state=train.make_optimizer(0.1).init({**like.prompt, "vision_ctx": jnp.zeros((2, 8))}),
    )
    with pytest.raises(checkpoint.CheckpointMismatchError, match="prompt.vision_ctx is missing"):
        checkpoint.restore(tmp_path, like)
    assert tree_of_files(tmp_path) == files_before


def test_flatten_unflatten_dict():
    tree = {"a": {"b": np.ones(2), "c": np.zeros(())}, "d": np.arange(3)}
    flat = checkpoint.flatten(tree, "prompt")
    assert sorted(flat) == ["prompt.a.b", "prompt.a.c", "prompt.d"]
    back = checkpoint.unflatten_dict(flat, "prompt")
    assert_trees_equal(back, tree)


def test_meta_with_a_wrapped_method_is_json(tmp_path):
    """POUF/TPT configs hold a base method: meta stores its name and kwargs instead."""
    from jaxprompt.methods.base import PromptMethod

    inner = PromptMethod(init=None, logits=None, loss=None, name="coop", config={"n_ctx": 4})
    meta = {"method": "pouf", "method_config": {"base": inner, "w_info": 0.3}}
    checkpoint.save(tmp_path, make_state(), meta=meta)
    _, got = checkpoint.load_prompt(tmp_path)
    assert got["method_config"] == {
        "base": {"method": "coop", "method_config": {"n_ctx": 4}},
        "w_info": 0.3,
    }


def test_zero_size_leaves_round_trip(tmp_path):
    """Depth-1 IVLP/PromptSRC prompts have deep prompts of shape [0, n, D], which orbax cannot
    store: they are left out on save and rebuilt from the shapes on restore (incl. the
    aggregator's running sum, saved as `extra`)."""
    prompt = {
        "ctx": jnp.arange(8.0).reshape(2, 4),
        "deep_text": jnp.zeros((0, 2, 4), jnp.float32),
    }
    tx = train.make_optimizer(0.1)
    state = train.TrainState(jnp.int32(3), prompt, tx.init(prompt))
    checkpoint.save(tmp_path, state, meta=META, extra={"total": prompt})
    like = train.TrainState(
        jnp.int32(0), jax.tree.map(jnp.zeros_like, prompt), tx.init(prompt)
    )
    restored, _, _, extra = checkpoint.restore(
        tmp_path, like, extra_like={"total": jax.tree.map(jnp.zeros_like, prompt)}
    )
    assert_trees_equal(restored, state)
    assert restored.prompt["deep_text"].shape == (0, 2, 4)
    assert_trees_equal(extra, {"total": prompt})
    # A checkpoint without the leaf still fails for a like that expects real values there.
    bigger = {"ctx": prompt["ctx"], "deep_text": jnp.zeros((1, 2, 4), jnp.float32)}
    with pytest.raises(checkpoint.CheckpointMismatchError, match="deep_text"):
        checkpoint.restore(
            tmp_path, train.TrainState(jnp.int32(0), bigger, tx.init(bigger))
        )
