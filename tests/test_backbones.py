"""Backbones by OpenAI's names (issue 19, part 3): ``RN50``, ``ViT-B/16``, ... resolved to the
checkpoint file in ``$JAXPROMPT_CLIP_DIR`` or ``~/.cache/clip``, the ViTs falling back to their
hub ids; the configs' ``backbone=`` argument; and one load and one run through the real path.

The expected file names and hub ids are typed here from OpenAI's ``clip`` package (its
``_MODELS`` URLs end in these names) and the hub's model pages, independently of
``jaxprompt/backbones.py``.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxprompt as jp
from jaxprompt import backbones
from jaxprompt import clip as clip_lib
from jaxprompt.app import flags

# Config files by path: by protocol name they come from wherever the package is installed.
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

FILES = {
    "RN50": "RN50.pt",
    "RN101": "RN101.pt",
    "RN50x4": "RN50x4.pt",
    "RN50x16": "RN50x16.pt",
    "RN50x64": "RN50x64.pt",
    "ViT-B/32": "ViT-B-32.pt",
    "ViT-B/16": "ViT-B-16.pt",
    "ViT-L/14": "ViT-L-14.pt",
    "ViT-L/14@336px": "ViT-L-14-336px.pt",
}
HUB = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """An empty home (so a real ~/.cache/clip cannot interfere) and an unset env directory;
    returns (env dir, OpenAI cache dir), both created, neither active until the test says so."""
    home = tmp_path / "home"
    cache = home / ".cache" / "clip"
    env = tmp_path / "env"
    cache.mkdir(parents=True)
    env.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(backbones.ENV_DIR, raising=False)
    return env, cache


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_the_names_are_openais_with_their_file_names():
    assert backbones.NAMES == tuple(FILES)
    assert {n: backbones.file_name(n) for n in backbones.NAMES} == FILES
    assert backbones.HUB_IDS == HUB


@pytest.mark.parametrize(
    "typed,want",
    [
        ("RN50", "RN50"), ("rn50", "RN50"), ("rn50x16", "RN50x16"), ("vit-b/16", "ViT-B/16"),
        ("VIT-B/32", "ViT-B/32"), ("ViT-B-16", "ViT-B/16"), ("vit-l-14-336px", "ViT-L/14@336px"),
        ("vit-l/14@336px", "ViT-L/14@336px"), ("openai/clip-vit-base-patch16", None),
        ("RN51", None), ("toy", None), ("ViT-B/16.pt", None),
    ],
)  # fmt: skip
def test_canonical_accepts_any_case_and_the_file_spelling(typed, want):
    assert backbones.canonical(typed) == want


def test_the_env_directory_wins_over_the_openai_cache(dirs, monkeypatch):
    env, cache = dirs
    (cache / "RN50.pt").write_bytes(b"cache")
    assert backbones.resolve("RN50") == str(cache / "RN50.pt")  # env unset: the cache
    monkeypatch.setenv(backbones.ENV_DIR, str(env))
    assert backbones.resolve("RN50") == str(cache / "RN50.pt")  # not in env: still the cache
    (env / "RN50.pt").write_bytes(b"env")
    assert backbones.resolve("rn50") == str(env / "RN50.pt")
    assert backbones.search_dirs() == [str(env), str(cache)]


def test_the_env_directory_is_user_expanded(dirs, monkeypatch):
    env, cache = dirs
    mine = cache.parent.parent / "weights"  # under the (patched) home
    mine.mkdir()
    (mine / "ViT-L-14-336px.pt").write_bytes(b"x")
    monkeypatch.setenv(backbones.ENV_DIR, "~/weights")
    assert backbones.resolve("ViT-L/14@336px") == str(mine / "ViT-L-14-336px.pt")


def test_a_vit_without_a_file_falls_back_to_its_hub_id(dirs, monkeypatch):
    env, cache = dirs
    monkeypatch.setenv(backbones.ENV_DIR, str(env))
    for name, hub_id in HUB.items():
        assert backbones.resolve(name) == hub_id
        assert backbones.resolve(name.lower()) == hub_id
    (cache / "ViT-B-32.pt").write_bytes(b"x")
    assert backbones.resolve("ViT-B/32") == str(cache / "ViT-B-32.pt")  # a file beats the hub


@pytest.mark.parametrize("name", ["RN50", "rn101", "RN50x64"])
def test_a_resnet_without_its_file_is_a_one_line_error_naming_the_fix(name, dirs, monkeypatch):
    env, cache = dirs
    monkeypatch.setenv(backbones.ENV_DIR, str(env))
    with pytest.raises(backbones.CheckpointNotFoundError) as e:
        backbones.resolve(name)
    msg = _one_line(e)
    want = backbones.canonical(name)
    assert msg.startswith(f"{want} needs OpenAI's checkpoint file {FILES[want]}")
    assert str(env) in msg and str(cache) in msg and "~/.cache/clip" in msg
    assert "JAXPROMPT_CLIP_DIR" in msg and "--config.clip.name" in msg
    # load_clip says the same, before touching transformers or the hub.
    with pytest.raises(clip_lib.ClipLoadError) as e2:
        jp.load_clip(name)
    assert _one_line(e2) == msg


def test_anything_else_passes_through_unchanged(dirs, tmp_path):
    f = tmp_path / "my_clip.pt"
    f.write_bytes(b"x")
    for name in ("openai/clip-vit-base-patch16", str(tmp_path), str(f), "./toy", "./RN50", "RN5"):
        assert backbones.resolve(name) == name
    assert backbones.resolve(f) == str(f)  # an os.PathLike comes back as a string


def test_toy_is_the_shipped_toy_clip(tmp_path, monkeypatch):
    from importlib import resources

    shipped = resources.files("jaxprompt").joinpath("assets/toy_clip")
    assert backbones.resolve("toy") == str(shipped)
    monkeypatch.setenv("JAXPROMPT_CACHE", str(tmp_path))
    assert backbones.toy_cache_dir() == str(tmp_path / "toy_clip")


def test_hub_base_model_maps_openai_names_to_their_hub_copy():
    from jaxprompt.app.share import hub_base_model

    assert hub_base_model("ViT-B/16") == "openai/clip-vit-base-patch16"
    assert hub_base_model("vit-l/14@336px") == "openai/clip-vit-large-patch14-336"
    assert hub_base_model("RN50") is None  # no Hugging Face copy of the ResNets
    assert hub_base_model("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def _config(spec: str, *overrides: str):
    spec = os.path.join(CONFIGS, spec.replace(":", ".py:", 1))
    config, _ = flags.parse_run_flags(
        ["jaxprompt", "--config", spec, *overrides, "--workdir", "-"], need_config=True
    )
    return config


@pytest.mark.parametrize(
    "spec",
    [
        "fewshot:coop,dataset=ImageNet", "base2new:coop,dataset=dtd",
        "xdomain:coop,dataset=ImageNet", "adapt:tpt,dataset=ImageNetA",
        "adapt:tpt_coop,dataset=ImageNetA", "adapt:pouf,dataset=toy_textures_sketch",
    ],
)  # fmt: skip
def test_backbone_argument_sets_the_clip_name(spec):
    default = "toy" if "toy" in spec else "openai/clip-vit-base-patch16"
    assert _config(spec).clip.name == default
    assert _config(spec + ",backbone=RN50").clip.name == "RN50"
    assert _config(spec + ",backbone=ViT-L/14@336px").clip.name == "ViT-L/14@336px"
    assert _config(spec, "--config.clip.name=RN101").clip.name == "RN101"
    # The flag is applied after the argument, so it wins.
    assert _config(spec + ",backbone=RN50", "--config.clip.name=RN101").clip.name == "RN101"


def test_a_real_backbone_on_a_toy_dataset_keeps_the_vit_b16_prompt_shapes():
    # Prompt depths and vision-token counts scale down for the toy CLIP only.
    toy = _config("base2new:promptsrc,dataset=toy_textures").method.kw
    real = _config("base2new:promptsrc,dataset=toy_textures,backbone=ViT-B/16").method.kw
    assert (toy.depth, toy.n_ctx_vision) == (3, 1)
    assert (real.depth, real.n_ctx_vision) == (9, 4)


def test_rn50_reproduce_presets_are_the_papers_recipes():
    # TPT (tpt.md 1-3): 4 tokens from "a photo of a", 64 views, top 10%, one AdamW step, 5e-3.
    tpt = _config("adapt:tpt,dataset=ImageNetA,backbone=RN50")
    assert tpt.method.base == "coop" and tpt.method.base_kwargs.init_words == "a photo of a"
    assert tpt.method.base_kwargs.n_ctx == 4 and tpt.method.views == 64
    assert (tpt.method.keep, tpt.method.steps) == (0.1, 1)
    assert tpt.method.optimizer.learning_rate == 5e-3
    # CoOp few-shot: 16 tokens, SGD 0.002, batch 32, 200 epochs at 16 shots.
    coop = _config("fewshot:coop,dataset=ImageNet,backbone=RN50")
    assert coop.clip.name == "RN50" and coop.method.kw.n_ctx == 16
    assert (coop.optim.lr, coop.data.batch_size, coop.optim.epochs) == (0.002, 32, 200)


# ------------------------------------------------------------------------------------------------
# Through the real path: a tiny OpenAI-format ViT saved as ViT-B-16.pt
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b16_dir(tmp_path_factory):
    """A directory holding a tiny random CLIP saved as OpenAI's ``ViT-B-16.pt`` (a torch.save
    state dict with OpenAI's parameter names)."""
    import torch
    from test_openai_checkpoint import _tiny_pt_model, hf_to_openai

    sd = {k: v.detach().numpy().copy() for k, v in _tiny_pt_model().state_dict().items()}
    oa = hf_to_openai({k: v for k, v in sd.items() if not k.endswith("position_ids")})
    d = tmp_path_factory.mktemp("clip_dir")
    torch.save({k: torch.tensor(v) for k, v in oa.items()}, d / "ViT-B-16.pt")
    return d


@pytest.mark.slow
def test_load_clip_by_name_reads_the_file_in_the_env_directory(vit_b16_dir, monkeypatch):
    monkeypatch.setenv(backbones.ENV_DIR, str(vit_b16_dir))
    clip = jp.load_clip("ViT-B/16")
    assert clip.spec.name == "ViT-B/16"  # the name as given, not the file it was found in
    assert jp.load_clip("vit-b/16").spec.name == "vit-b/16"
    direct = jp.load_clip(str(vit_b16_dir / "ViT-B-16.pt"))
    texts = ["a photo of a cat.", "a photo of a golden retriever."]
    ids, eot = clip_lib.tokenize(clip, texts)
    np.testing.assert_array_equal(
        clip_lib.encode_token_ids(clip, jnp.asarray(ids), jnp.asarray(eot)),
        clip_lib.encode_token_ids(direct, jnp.asarray(ids), jnp.asarray(eot)),
    )
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        clip_lib.encode_image(clip, images), clip_lib.encode_image(direct, images)
    )


@pytest.mark.slow
def test_a_run_by_backbone_name_records_the_name(vit_b16_dir, monkeypatch, tmp_path):
    from jaxprompt import cli

    monkeypatch.setenv(backbones.ENV_DIR, str(vit_b16_dir))
    wd = tmp_path / "zs"
    spec = os.path.join(CONFIGS, "fewshot.py:zeroshot,dataset=toy_textures,runlocal=true")
    spec += ",backbone=ViT-B/16"
    assert cli.main(["jaxprompt", "train", "--config", spec, "--workdir", str(wd)]) == 0
    res = json.load(open(wd / "results.json"))
    assert res["model"] == "ViT-B/16" and 0 <= res["accuracy"]["test"] <= 100
    assert json.load(open(wd / "config.json"))["clip"]["name"] == "ViT-B/16"
    assert os.listdir(vit_b16_dir) == ["ViT-B-16.pt"]  # nothing written beside the weights


def test_a_run_on_a_missing_resnet_is_one_line_exit_2_and_writes_nothing(dirs, tmp_path, capsys):
    from jaxprompt import cli

    wd = tmp_path / "rn50"
    spec = os.path.join(CONFIGS, "fewshot.py:coop,dataset=toy_textures,runlocal=true,backbone=RN50")
    assert cli.main(["jaxprompt", "train", "--config", spec, "--workdir", str(wd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jaxprompt: error: RN50 needs OpenAI's checkpoint file RN50.pt")
    assert not wd.exists()
