"""OpenAI's ResNet CLIPs (issue 19, part 2): the modified-ResNet image tower on OpenAI-format
checkpoints made by this test, loaded through ``load_clip``.

The reference is a PyTorch forward written here from the architecture's description (CLIP paper
section 2.4 and the layout of OpenAI's released state dicts): a stem of three 3x3 convolutions
with BatchNorm and ReLU and a 2x2 average pool; bottleneck blocks whose stride is an average
pool after the 3x3 convolution, with an average-pooled 1x1 projection shortcut; an attention
pool whose single query is the mean of the final feature map. BatchNorm runs in eval mode from
the running statistics (``F.batch_norm(training=False)``, not jaxprompt's folding); the
attention uses torch's own ``multi_head_attention_forward``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import testing

torch = pytest.importorskip("torch")
F = torch.nn.functional

ATOL = 1e-5
# The tiny RN of jaxprompt.testing: stem width 8 (so 256 channels into a 4-head attention pool),
# stages of 1, 2, 1, 1 bottlenecks (stage 2 has a block without a shortcut projection),
# 64-pixel images (a 2 x 2 final map), a 2-layer text tower of width 64 on the CLIP vocabulary.
TINY = testing.RESNET_PRESETS["rn-tiny"]
WIDTH, LAYERS, IMAGE, EMBED = TINY["width"], TINY["layers"], TINY["image_size"], TINY["embed_dim"]


def vit_tensors(rng) -> dict[str, np.ndarray]:
    """A one-layer ViT image tower (patch 8 on 32 pixels) in OpenAI's names, written here."""
    d = 64
    out = {
        "visual.conv1.weight": rng.normal(0, 0.05, (d, 3, 8, 8)),
        "visual.class_embedding": rng.normal(0, 0.1, d),
        "visual.positional_embedding": rng.normal(0, 0.1, (17, d)),
        "visual.ln_pre.weight": np.ones(d),
        "visual.ln_pre.bias": np.zeros(d),
        "visual.ln_post.weight": np.ones(d),
        "visual.ln_post.bias": np.zeros(d),
        "visual.proj": rng.normal(0, d**-0.5, (d, EMBED)),
    }
    p = "visual.transformer.resblocks.0."
    for name, shape in (
        ("attn.in_proj_weight", (3 * d, d)), ("attn.in_proj_bias", (3 * d,)),
        ("attn.out_proj.weight", (d, d)), ("attn.out_proj.bias", (d,)),
        ("mlp.c_fc.weight", (4 * d, d)), ("mlp.c_fc.bias", (4 * d,)),
        ("mlp.c_proj.weight", (d, 4 * d)), ("mlp.c_proj.bias", (d,)),
    ):  # fmt: skip
        out[p + name] = rng.normal(0, 0.05, shape)
    for ln in ("ln_1", "ln_2"):
        out[f"{p}{ln}.weight"], out[f"{p}{ln}.bias"] = np.ones(d), np.zeros(d)
    return {k: v.astype(np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# The reference forward, in PyTorch, NCHW
# ------------------------------------------------------------------------------------------------


def _t(sd, k):
    return torch.tensor(sd[k])


def _ref_bn(sd, x, p):
    return F.batch_norm(
        x, _t(sd, p + ".running_mean"), _t(sd, p + ".running_var"),
        _t(sd, p + ".weight"), _t(sd, p + ".bias"), training=False, eps=1e-5,
    )  # fmt: skip


def _ref_bottleneck(sd, x, p, stride):
    out = F.relu(_ref_bn(sd, F.conv2d(x, _t(sd, p + "conv1.weight")), p + "bn1"))
    out = F.relu(_ref_bn(sd, F.conv2d(out, _t(sd, p + "conv2.weight"), padding=1), p + "bn2"))
    if stride > 1:
        out = F.avg_pool2d(out, stride)
    out = _ref_bn(sd, F.conv2d(out, _t(sd, p + "conv3.weight")), p + "bn3")
    if p + "downsample.0.weight" in sd:
        idt = F.avg_pool2d(x, stride) if stride > 1 else x
        x = _ref_bn(sd, F.conv2d(idt, _t(sd, p + "downsample.0.weight")), p + "downsample.1")
    return F.relu(out + x)


def reference_image_features(sd, images_nhwc: np.ndarray) -> np.ndarray:
    """OpenAI's ModifiedResNet forward, written from its description (module docstring)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items() if k.startswith("visual.")}
    x = torch.tensor(images_nhwc.transpose(0, 3, 1, 2), dtype=torch.float64)
    with torch.no_grad():
        for i, stride in ((1, 2), (2, 1), (3, 1)):
            x = F.conv2d(x, _t(sd, f"visual.conv{i}.weight"), stride=stride, padding=1)
            x = F.relu(_ref_bn(sd, x, f"visual.bn{i}"))
        x = F.avg_pool2d(x, 2)
        for s, n in enumerate(LAYERS, start=1):
            for j in range(n):
                stride = 2 if s > 1 and j == 0 else 1
                x = _ref_bottleneck(sd, x, f"visual.layer{s}.{j}.", stride)
        seq = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        seq = torch.cat([seq.mean(dim=0, keepdim=True), seq], dim=0)
        seq = seq + _t(sd, "visual.attnpool.positional_embedding")[:, None]
        c = seq.shape[-1]
        a = "visual.attnpool."
        out, _ = F.multi_head_attention_forward(
            query=seq[:1], key=seq, value=seq, embed_dim_to_check=c, num_heads=WIDTH * 32 // 64,
            q_proj_weight=_t(sd, a + "q_proj.weight"), k_proj_weight=_t(sd, a + "k_proj.weight"),
            v_proj_weight=_t(sd, a + "v_proj.weight"), in_proj_weight=None,
            in_proj_bias=torch.cat([_t(sd, a + f"{n}_proj.bias") for n in "qkv"]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=_t(sd, a + "c_proj.weight"), out_proj_bias=_t(sd, a + "c_proj.bias"),
            use_separate_proj_weight=True, training=False, need_weights=False,
        )  # fmt: skip
    return out[0].numpy()


# ------------------------------------------------------------------------------------------------
# Fixtures: RN and ViT checkpoints sharing one text tower
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    rn = testing.random_openai_resnet("rn-tiny", seed=0)
    text = {k: v for k, v in rn.items() if not k.startswith("visual.")}
    vit = {**text, **vit_tensors(np.random.default_rng(1))}
    d = tmp_path_factory.mktemp("rn")
    # RN50.pt: the file name a user has; here a TorchScript archive, as OpenAI released them.
    paths = {"state_dict": d / "RN-tiny.pt", "torchscript": d / "RN50.pt"}
    torch.save({k: torch.tensor(v) for k, v in rn.items()}, paths["state_dict"])
    testing.save_torchscript(rn, paths["torchscript"])
    torch.save({k: torch.tensor(v) for k, v in vit.items()}, d / "ViT-tiny.pt")
    return {
        "rn": rn, **{k: str(v) for k, v in paths.items()}, "vit": str(d / "ViT-tiny.pt"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def rn_clip(checkpoints):
    return jp.load_clip(checkpoints["state_dict"])


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_spec_describes_the_resnet(rn_clip):
    s = rn_clip.spec
    assert (s.image_tower, s.resnet_layers, s.resnet_heads) == ("resnet", LAYERS, 4)
    assert (s.image_size, s.patch_size, s.vision_width, s.embed_dim) == (IMAGE, 32, 256, EMBED)
    assert s.vision_layers == sum(LAYERS) and s.text_layers == 2
    assert "visual_projection" not in rn_clip.params


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_image_features_equal_the_reference_forward(kind, checkpoints):
    clip = jp.load_clip(checkpoints[kind])
    images = _images(3)
    want = reference_image_features(checkpoints["rn"], images)
    got = np.asarray(clip_lib.encode_image(clip, images))
    assert got.shape == (3, EMBED) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_a_wrong_weight_is_caught_by_the_reference(checkpoints, rn_clip):
    """The comparison can fail: perturb one running variance deep in the tower."""
    sd = dict(checkpoints["rn"])
    sd["visual.layer3.0.bn2.running_var"] = sd["visual.layer3.0.bn2.running_var"] * 1.5
    images = _images(2)
    want = reference_image_features(sd, images)
    got = np.asarray(clip_lib.encode_image(rn_clip, images))
    assert np.abs(got - want).max() > 1e-3


def test_text_features_equal_the_vit_paths_text_tower(checkpoints, rn_clip):
    vit = jp.load_clip(checkpoints["vit"])
    assert vit.spec.image_tower == "vit"
    texts = ["a photo of a golden retriever.", "a photo of a tench.", "a texture of dots."]
    ids, eot = clip_lib.tokenize(rn_clip, texts)
    ids_v, eot_v = clip_lib.tokenize(vit, texts)
    np.testing.assert_array_equal(ids, ids_v)
    got = clip_lib.encode_token_ids(rn_clip, ids, eot)
    want = clip_lib.encode_token_ids(vit, ids_v, eot_v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_zeroshot_logits_equal_the_reference(checkpoints, rn_clip):
    """OpenAI's zero-shot: 100 x cosine between image and "a photo of a {}." features."""
    names = ["golden retriever", "tabby cat", "tench"]
    task = jp.make_task(rn_clip, names)
    method = jp.methods.get("zeroshot")
    prompt = method.init(__import__("jax").random.PRNGKey(0), rn_clip, task)
    images = _images(2, seed=3)
    logits = np.asarray(method.logits(prompt, rn_clip, task, images))
    ids, eot = clip_lib.tokenize(rn_clip, [f"a photo of a {n}." for n in names])
    t = np.asarray(clip_lib.encode_token_ids(rn_clip, ids, eot), np.float64)
    i = reference_image_features(checkpoints["rn"], images)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    i /= np.linalg.norm(i, axis=-1, keepdims=True)
    np.testing.assert_allclose(logits, 100.0 * i @ t.T, atol=1e-3)


def test_bfloat16_follows_float32(checkpoints, rn_clip):
    bf = jp.load_clip(checkpoints["state_dict"], dtype="bfloat16")
    images = _images(2)
    a = np.asarray(clip_lib.encode_image(rn_clip, images))
    b = np.asarray(clip_lib.encode_image(bf, images))
    assert b.dtype == np.float32
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99, cos


def test_gradients_reach_images_through_the_frozen_tower(rn_clip):
    """Inference-mode BatchNorm is an affine map: gradients flow, nothing is updated."""
    import jax

    images = _images(1)

    def f(x, remat):
        return clip_lib.encode_image(rn_clip, x, remat=remat).sum()

    g = jax.grad(f)(images, False)
    g_remat = jax.grad(f)(images, True)
    assert float(np.abs(g).max()) > 0
    np.testing.assert_allclose(g, g_remat, atol=1e-6)


def test_vision_prompt_methods_refuse_a_resnet_in_one_line(rn_clip):
    task = jp.make_task(rn_clip, ["cat", "dog"])
    for name in ("ivlp", "maple", "promptsrc"):
        method = jp.methods.get(name, depth=1)
        with pytest.raises(ValueError) as e:
            method.init(__import__("jax").random.PRNGKey(0), rn_clip, task)
        msg = str(e.value)
        assert "\n" not in msg and "ViT-B/16" in msg and "ResNet" in msg, msg
    with pytest.raises(ValueError, match="ViT"):
        clip_lib.encode_image(rn_clip, _images(1), prompts=np.zeros((2, 256), np.float32))


def test_wrong_image_size_is_a_clear_error(rn_clip):
    with pytest.raises(ValueError, match=f"{IMAGE}, {IMAGE}, 3"):
        clip_lib.encode_image(rn_clip, np.zeros((1, 32, 32, 3), np.float32))


def test_a_truncated_resnet_checkpoint_is_a_one_line_error(tmp_path, checkpoints):
    sd = {k: v for k, v in checkpoints["rn"].items() if "attnpool.k_proj" not in k}
    path = tmp_path / "RN-broken.pt"
    torch.save({k: torch.tensor(v) for k, v in sd.items()}, path)
    with pytest.raises(clip_lib.CheckpointLoadError) as e:
        jp.load_clip(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "visual.attnpool.k_proj.weight" in msg, msg


def test_text_prompt_methods_train_on_a_resnet(rn_clip):
    """CoOp, CoCoOp, Bayesian prompts and POUF: a finite loss and a gradient on every prompt
    entry."""
    import jax

    task = jp.make_task(rn_clip, ["cat", "dog", "tench"])
    batch = {"image": _images(2, seed=5), "label": np.array([0, 2], np.int32)}
    for name, kw in (
        ("coop", dict(n_ctx=4)),
        ("cocoop", dict(n_ctx=4)),
        ("bayes", dict(n_ctx=4, mc_samples=2)),
        ("pouf", {}),  # unsupervised: the labels are not read
    ):
        method = jp.methods.get(name, **kw)
        prompt = method.init(jax.random.PRNGKey(0), rn_clip, task)

        def loss(p, method=method):
            return method.loss(p, rn_clip, task, batch, jax.random.PRNGKey(1))[0]

        value, grads = jax.value_and_grad(loss)(prompt)
        assert np.isfinite(float(value)), name
        # Per top-level entry: CoCoOp's 2-unit meta-net hidden layer (embed 32 / 16) may be
        # dead on some images, so a single leaf can have a zero gradient.
        for key, sub in grads.items():
            total = sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(sub))
            assert total > 0, (name, key)


def test_tpt_episode_tunes_a_coop_prompt_on_a_resnet(rn_clip):
    import jax
    import optax

    from jaxprompt.methods.tpt import episode

    task = jp.make_task(rn_clip, ["cat", "dog", "tench"])
    base = jp.methods.coop(n_ctx=4, init_words="a photo of a")
    prompt = base.init(jax.random.PRNGKey(0), rn_clip, task)
    views = _images(8, seed=7)
    before = np.asarray(base.logits(prompt, rn_clip, task, views[:1]))
    after = np.asarray(
        episode(base, optax.adamw(5e-3), prompt, rn_clip, task, views, steps=1, keep=0.25)
    )
    assert after.shape == (3,) or after.shape == (1, 3)
    assert np.abs(after.reshape(-1) - before.reshape(-1)).max() > 1e-4


# ------------------------------------------------------------------------------------------------
# The command line, as a user runs it: the console script, outside the checkout
# ------------------------------------------------------------------------------------------------


def _jaxprompt(*args, cwd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import RUN_FAST

    exe = Path(sys.executable).with_name("jaxprompt")
    env = {**os.environ, "XLA_FLAGS": RUN_FAST}  # one device, as a user's; TPT's views execute
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_coop_trains_and_tpt_adapts_on_an_rn50_checkpoint(checkpoints, tmp_path):
    """Issue 19's done-when command (CoOp trained on an "RN50.pt" through the console script),
    then TPT + CoOp from that run. At `runlocal=true` (the config's short local run): what is
    tested is the ResNet checkpoint through load, train, save and adapt, which the schedule's
    length does not touch (800 steps of it took 112 s of the suite's time)."""
    import json

    rn50 = checkpoints["torchscript"]
    train = _jaxprompt(
        "train", "--config", "base2new:coop,dataset=toy_textures,runlocal=true",
        f"--config.clip.name={rn50}", "--workdir", "runs/rn50_coop", cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    res = json.loads((tmp_path / "runs/rn50_coop/results.json").read_text())
    assert set(res["accuracy"]) >= {"base", "new", "hm"} and res["model"] == rn50
    assert res["steps"] > 0
    adapt = _jaxprompt(
        "adapt", "--config", "adapt:tpt_coop,dataset=toy_textures,runlocal=true",
        f"--config.clip.name={rn50}", "--config.init_from=runs/rn50_coop",
        "--workdir", "runs/rn50_tpt", cwd=tmp_path,
    )  # fmt: skip
    assert adapt.returncode == 0, adapt.stderr[-2000:]
    res = json.loads((tmp_path / "runs/rn50_tpt/results.json").read_text())
    assert {"zero_shot", "tpt"} <= set(res["accuracy"]), res


@pytest.mark.slow
def test_a_vision_prompt_method_on_a_resnet_fails_before_writing(checkpoints, tmp_path):
    out = _jaxprompt(
        "train", "--config", "base2new:ivlp,dataset=toy_textures,runlocal=true",
        f"--config.clip.name={checkpoints['torchscript']}", "--workdir", "runs/x", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxprompt: error: ") and "ViT-B/16" in last, out.stderr[-1000:]
    assert not (tmp_path / "runs").exists()


def test_fingerprint_tells_resnets_apart(checkpoints, rn_clip):
    import dataclasses
    import json

    from jaxprompt import share

    vit = jp.load_clip(checkpoints["vit"])
    fp = share.backbone_fingerprint(rn_clip)
    assert fp["vocab"] == share.backbone_fingerprint(vit)["vocab"]
    assert fp["arch"] != share.backbone_fingerprint(vit)["arch"]
    config = json.loads(rn_clip.spec.config_json)
    config["vision_config"]["resnet_layers"] = [3, 4, 23, 3]  # RN101's stages
    other = rn_clip.replace(spec=dataclasses.replace(rn_clip.spec, config_json=json.dumps(config)))
    assert share.backbone_fingerprint(other)["arch"] != fp["arch"]
    with pytest.raises(share.BackboneMismatchError):
        share.check_backbone({"backbone": {"name": "RN50", "fingerprint": fp}}, other)


def test_a_state_dict_in_memory_loads_like_the_file(checkpoints, rn_clip):
    clip = clip_lib.from_openai_state_dict(checkpoints["rn"], name="RN50")
    assert clip.spec.name == "RN50" and clip.spec.image_tower == "resnet"
    images = _images(1)
    np.testing.assert_array_equal(
        np.asarray(clip_lib.encode_image(clip, images)),
        np.asarray(clip_lib.encode_image(rn_clip, images)),
    )
    with pytest.raises(clip_lib.CheckpointLoadError, match="lacks tensor"):
        clip_lib.from_openai_state_dict(
            {k: v for k, v in checkpoints["rn"].items() if k != "visual.bn1.running_var"}
        )


def test_rn50_by_name_loads_the_file_in_the_clip_directory(checkpoints, rn_clip, monkeypatch):
    import os

    monkeypatch.setenv("JAXPROMPT_CLIP_DIR", os.path.dirname(checkpoints["torchscript"]))
    clip = jp.load_clip("rn50")
    assert clip.spec.name == "rn50" and clip.spec.image_tower == "resnet"
    images = _images(1)
    np.testing.assert_array_equal(
        np.asarray(clip_lib.encode_image(clip, images)),
        np.asarray(clip_lib.encode_image(rn_clip, images)),
    )


def test_a_coop_step_with_the_resnet_split_over_devices_equals_one_device(rn_clip):
    """8 simulated devices, data 2 x model 4: the conv kernels and the attention pool are split
    over "model" by the trainer's sharding rule; loss and gradients equal one device."""
    import jax

    from jaxprompt import sharding

    # conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax loads.
    assert len(jax.devices()) >= 8, "the 8 simulated devices of conftest.py are missing"
    mesh = sharding.make_mesh(data=2, model=4)
    task = jp.make_task(rn_clip, ["cat", "dog", "tench"])
    method = jp.methods.coop(n_ctx=4)
    prompt = method.init(jax.random.PRNGKey(0), rn_clip, task)
    batch = {"image": _images(4, seed=9), "label": np.array([0, 1, 2, 1], np.int32)}

    def loss(p, c, b):
        return method.loss(p, c, task, b, jax.random.PRNGKey(1))[0]

    want = jax.jit(jax.value_and_grad(loss))(prompt, rn_clip, batch)
    clip = sharding.shard_clip(rn_clip, mesh)
    split = [
        s for s in jax.tree.leaves(sharding.clip_shardings(rn_clip, mesh)) if "model" in s.spec
    ]
    assert split  # some ResNet weights really are split
    got = jax.jit(jax.value_and_grad(loss))(prompt, clip, sharding.put_batch(batch, mesh))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    # Split reductions sum in another order: compare relative to the gradient's scale (~20).
    g, w = np.asarray(got[1]["ctx"]), np.asarray(want[1]["ctx"])
    assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), np.abs(g - w).max()


def test_half_and_bfloat16_weights_load(checkpoints, rn_clip):
    """OpenAI's archives hold float16 weights; a user's save may be bfloat16."""
    import ml_dtypes

    images = _images(2)
    want = np.asarray(clip_lib.encode_image(rn_clip, images))
    for dt in (np.float16, ml_dtypes.bfloat16):
        sd = {k: (v.astype(dt) if v.dtype.kind == "f" else v) for k, v in checkpoints["rn"].items()}
        got = np.asarray(clip_lib.encode_image(clip_lib.from_openai_state_dict(sd), images))
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() > 0.99, (dt, cos)


def test_batchnorm_on_nearly_dead_channels_equals_torch_eval_mode():
    """Folded BatchNorm against ``F.batch_norm(training=False)`` where it is fragile.

    Channels with running variance 1e-6..1e-3 (released ResNets have them): there ``eps`` is
    most of ``var + eps``, so an ``eps`` outside the square root (``sqrt(var) + eps``) or a
    missing one changes the output up to 3x. Activations sit at the running mean, some of them
    large (5..20), as a nearly dead channel's do: ``x * scale + (beta - mean * scale)`` would
    cancel two numbers of size ~1e3 and miss by ~4e-4 in float32, while ``(x - mean) * scale +
    beta`` rounds only the O(1) result (a few 1e-7), hence the 1e-5 tolerance on outputs of a
    few units. The reference runs in float64 on the same float32 inputs.
    """
    from jaxprompt import resnet

    rng = np.random.default_rng(3)
    c = 32
    quiet = np.arange(c) % 2 == 0
    var = np.where(quiet, 10.0 ** rng.uniform(-6, -3, c), rng.uniform(0.5, 2.0, c))
    mean = rng.choice([-1.0, 1.0], c) * rng.uniform(5.0, 20.0, c)
    gamma, beta = 1 + rng.normal(0, 0.2, c), rng.normal(0, 0.2, c)
    gamma, beta, mean, var = (a.astype(np.float32) for a in (gamma, beta, mean, var))
    x = (mean + np.sqrt(var) * rng.normal(size=(2, 3, 3, c))).astype(np.float32)
    want = F.batch_norm(
        torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2),
        *(torch.tensor(a, dtype=torch.float64) for a in (mean, var, gamma, beta)),
        training=False, eps=resnet.BN_EPS,
    ).permute(0, 2, 3, 1).numpy()  # fmt: skip
    got = np.asarray(resnet._bn(jnp.asarray(x), resnet.fold_batchnorm(gamma, beta, mean, var)))
    assert np.abs(want[..., quiet]).max() > 1.0  # the quiet channels' outputs are not ~0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The tower's fixture has such channels too, so the full forward above checks them as well.
    rn = testing.random_openai_resnet("rn-tiny", seed=0)
    variances = np.concatenate([v for k, v in rn.items() if k.endswith("running_var")])
    means = np.concatenate([v for k, v in rn.items() if k.endswith("running_mean")])
    assert variances.min() < 1e-5 and (variances < 1e-3).mean() > 0.05
    assert np.abs(means).max() > 5.0
