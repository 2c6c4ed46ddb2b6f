"""Loading Hugging Face CLIP checkpoints with our own code: every weights format, PyTorch
``CLIPModel`` directories as the reference, the hub cache, one-line errors, fingerprints."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_WORDS

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import hf_checkpoint, share, testing

TEXTS = ["a photo of a cat.", "red fish", "a golden retriever in the tree"]


def _leaves(params) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same random tiny CLIP saved in each weights format (``.bin`` needs torch)."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    params = None
    for weights in ("flax", "safetensors", "bin"):
        if weights == "bin" and not _has_torch():
            continue
        d = str(root / weights)
        config = testing.clip_config(testing.save_word_tokenizer(d, TINY_WORDS))
        params = params or testing.random_clip_params(config, seed=3, init="pytorch")
        testing.save_clip_weights(d, config, params, weights=weights)
        out[weights] = d
    return out


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def test_every_weights_format_loads_to_the_same_params(saved):
    ref = jp.load_clip(saved["flax"])
    for weights, d in saved.items():
        clip = jp.load_clip(d)
        _assert_same_params(clip.params, ref.params)
        assert clip.spec == ref.spec.__class__(**{**vars(ref.spec), "name": d}), weights


def test_safetensors_is_preferred_over_the_other_formats(saved, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(saved["safetensors"], d)
    other = testing.save_random_clip(tmp_path / "other", words=TINY_WORDS, seed=4)
    shutil.copy(os.path.join(other, "flax_model.msgpack"), d)
    assert hf_checkpoint.find_weights(d).endswith("model.safetensors")
    _assert_same_params(jp.load_clip(d).params, jp.load_clip(saved["safetensors"]).params)


def test_bfloat16_safetensors_load(saved, tmp_path):
    import ml_dtypes
    import safetensors.numpy

    d = tmp_path / "bf16"
    shutil.copytree(saved["safetensors"], d)
    f = d / "model.safetensors"
    sd = safetensors.numpy.load_file(f)
    safetensors.numpy.save_file(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, f, metadata={"format": "pt"}
    )
    clip = jp.load_clip(d)
    ref = jp.load_clip(saved["safetensors"])
    for k, v in _leaves(clip.params).items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, _leaves(ref.params)[k], rtol=1e-2, atol=1e-6, err_msg=k)


def test_flat_msgpack_names_are_the_flax_paths(saved):
    flat = hf_checkpoint.read_weights(os.path.join(saved["flax"], "flax_model.msgpack"))
    assert "text_model/encoder/layers/0/self_attn/q_proj/kernel" in flat
    assert flat["vision_model/embeddings/patch_embedding/kernel"].shape == (8, 8, 3, 32)


def test_shipped_toy_clip_still_loads():
    from jaxprompt.side import toyclip

    d = toyclip.toy_clip_dir()
    clip = jp.load_clip(d)
    import flax.serialization

    with open(os.path.join(d, "flax_model.msgpack"), "rb") as f:
        raw = flax.serialization.msgpack_restore(f.read())
    _assert_same_params(clip.params, raw)


# --------------------------------------------------------------------------- transformers' CLIP


def _torch_model(tmp_path, *, seed: int = 0):
    """A PyTorch ``CLIPModel`` with every weight perturbed, and its directory's tokenizer."""
    torch = pytest.importorskip("torch")
    import transformers

    d = tmp_path / "pt"
    vocab = testing.save_word_tokenizer(d, TINY_WORDS)
    config = transformers.CLIPConfig(**testing.clip_config(vocab, vision_width=48))
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1/0: make every weight matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, d


def _features(model, clip, images):
    import torch

    def tensor(out):  # transformers 5 returns a model output; 4.x the projected tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    ids, eot = clip_lib.tokenize(clip, TEXTS)
    with torch.no_grad():
        text = tensor(model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long)))
        image = tensor(
            model.get_image_features(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
        )
    ours_text = clip_lib.encode_token_ids(clip, jnp.asarray(ids), jnp.asarray(eot))
    ours_image = clip_lib.encode_image(clip, jnp.asarray(images))
    return (text.numpy(), image.numpy()), (np.asarray(ours_text), np.asarray(ours_image))


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_transformers_clipmodel_directory_matches_its_features(tmp_path, weights):
    import torch

    model, d = _torch_model(tmp_path)
    model.save_pretrained(d, safe_serialization=weights == "safetensors")
    if weights == "bin" and not os.path.exists(d / "pytorch_model.bin"):
        # transformers 5 writes safetensors whatever it is told; a .bin is then what
        # torch.save of the state dict gives (what transformers 4 wrote).
        os.remove(d / "model.safetensors")
        torch.save(model.state_dict(), d / "pytorch_model.bin")
    assert (
        os.path.basename(hf_checkpoint.find_weights(d))
        == {
            "safetensors": "model.safetensors",
            "bin": "pytorch_model.bin",
        }[weights]
    )
    clip = jp.load_clip(d)
    assert clip.spec.vision_width == 48
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    (ref_text, ref_image), (text, image) = _features(model, clip, images)
    np.testing.assert_allclose(text, ref_text, atol=1e-5)
    np.testing.assert_allclose(image, ref_image, atol=1e-5)
    np.testing.assert_allclose(
        float(clip.params["logit_scale"]), float(model.logit_scale.detach()), rtol=1e-6
    )


def test_our_safetensors_directory_loads_in_transformers(saved):
    torch = pytest.importorskip("torch")
    import transformers

    model, info = transformers.CLIPModel.from_pretrained(
        saved["safetensors"], output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    clip = jp.load_clip(saved["safetensors"])
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    (ref_text, ref_image), (text, image) = _features(model.eval(), clip, images)
    np.testing.assert_allclose(text, ref_text, atol=1e-5)
    np.testing.assert_allclose(image, ref_image, atol=1e-5)
    del torch


# --------------------------------------------------------------------------- the hub cache


def test_hub_id_loads_from_the_local_cache_offline(saved, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someorg--tiny-clip"
    shutil.copytree(saved["safetensors"], repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    clip = jp.load_clip("someorg/tiny-clip")
    assert clip.spec.name == "someorg/tiny-clip"
    _assert_same_params(clip.params, jp.load_clip(saved["safetensors"]).params)
    with pytest.raises(jp.ClipLoadError, match="local directory") as e:
        jp.load_clip("someorg/not-cached")
    _one_line(e)


# --------------------------------------------------------------------------- one-line errors


def _truncate(path, keep: float = 0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.mark.parametrize("weights", ["safetensors", "bin", "flax"])
def test_truncated_weights_are_a_one_line_error(saved, tmp_path, weights):
    if weights not in saved:
        pytest.skip("writing .bin needs torch")
    d = tmp_path / weights
    shutil.copytree(saved[weights], d)
    file = hf_checkpoint.find_weights(d)
    _truncate(file)
    with pytest.raises(clip_lib.CheckpointLoadError) as e:
        jp.load_clip(d)
    msg = _one_line(e)
    assert file in msg and ("truncated" in msg or "corrupt" in msg), msg


def test_a_missing_tensor_is_a_one_line_error(saved, tmp_path):
    import safetensors.numpy

    d = tmp_path / "missing"
    shutil.copytree(saved["safetensors"], d)
    f = d / "model.safetensors"
    sd = safetensors.numpy.load_file(f)
    del sd["text_model.final_layer_norm.weight"]
    safetensors.numpy.save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(clip_lib.CheckpointLoadError) as e:
        jp.load_clip(d)
    msg = _one_line(e)
    assert str(f) in msg and "lacks 1 " in msg and "text_model.final_layer_norm.weight" in msg


def test_a_config_of_another_size_is_a_one_line_error(saved, tmp_path):
    import json

    d = tmp_path / "other_size"
    shutil.copytree(saved["safetensors"], d)
    config = json.loads((d / "config.json").read_text())
    config["vision_config"]["patch_size"] = 16
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(clip_lib.CheckpointLoadError) as e:
        jp.load_clip(d)
    msg = _one_line(e)
    assert "vision_model.embeddings.patch_embedding.weight has shape (32, 3, 8, 8)" in msg, msg
    assert "(32, 3, 16, 16)" in msg and "config.json" in msg


def test_no_config_is_a_one_line_error(saved, tmp_path):
    d = tmp_path / "noconfig"
    shutil.copytree(saved["safetensors"], d)
    os.remove(d / "config.json")
    with pytest.raises(jp.ClipLoadError, match="has no config.json") as e:
        jp.load_clip(d)
    _one_line(e)


def test_to_flax_converts_layouts_and_ignores_buffers():
    sd = {
        "a.weight": np.arange(6.0).reshape(2, 3),  # Linear [out, in]
        "a.bias": np.zeros(2),
        "c.weight": np.arange(24.0).reshape(4, 3, 1, 2),  # Conv2d [out, in, kh, kw]
        "n.weight": np.ones(3),
        "e.weight": np.ones((5, 3)),
        "x.position_ids": np.arange(5),
        "s": np.array(2.0),
    }
    expected = {
        "a/kernel": (3, 2), "a/bias": (2,), "c/kernel": (1, 2, 3, 4), "n/scale": (3,),
        "e/embedding": (5, 3), "s": (),
    }  # fmt: skip
    out = hf_checkpoint.to_flax(sd, expected, source="sd")
    np.testing.assert_array_equal(out["a"]["kernel"], sd["a.weight"].T)
    np.testing.assert_array_equal(out["c"]["kernel"], sd["c.weight"].transpose(2, 3, 1, 0))
    assert out["s"].shape == () and "x" not in out
    back = hf_checkpoint.to_torch(out)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k])


# --------------------------------------------------------------------------- fingerprints


def test_same_size_other_vocabulary_is_another_backbone(tmp_path):
    """Two CLIPs of one architecture and the same weights whose vocabularies differ only in
    which words they hold (same count): a prompt learned on one is refused for the other."""
    a = testing.save_random_clip(tmp_path / "a", words=["cat", "dog", "bird"], seed=0)
    b = testing.save_random_clip(tmp_path / "b", words=["cow", "pig", "hen"], seed=0)
    clip_a, clip_b = jp.load_clip(a), jp.load_clip(b)
    assert clip_a.spec.config_json == clip_b.spec.config_json  # same vocab_size, same arch
    _assert_same_params(clip_a.params, clip_b.params)
    fa, fb = share.backbone_fingerprint(clip_a), share.backbone_fingerprint(clip_b)
    assert fa["arch"] == fb["arch"] and fa["vocab"] != fb["vocab"]
    meta = share.prompt_meta(
        method="coop", method_config={}, backbone_name=a, fingerprint=fa, classnames=["cat"]
    )
    path = share.save_prompt(tmp_path / "p.safetensors", {"ctx": np.zeros((4, 32))}, meta)
    jp.load_prompt(path, clip=clip_a)  # its own backbone: accepted
    with pytest.raises(share.BackboneMismatchError, match="different vocab") as e:
        jp.load_prompt(path, clip=clip_b)
    _one_line(e)
