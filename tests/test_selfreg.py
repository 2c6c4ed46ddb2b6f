"""Self-regulation as a wrapper (jaxprompt.methods.selfreg), its presets, and KgCoOp.

* On IVLP the wrapper is today's PromptSRC: its loss terms and gradients equal a frozen copy
  of the pre-refactor ``promptsrc`` loss kept below, and its GPA is the same aggregator.
* For each wrapped base (CoOp, CoCoOp, IVLP, MaPLe, Bayesian prompts) every added term equals a
  NumPy computation whose frozen features come from transformers' PyTorch ``get_text_features`` /
  ``get_image_features`` and whose prompted features come from the base's own public
  functions, not from the wrapper's code.
* KgCoOp's ``1 - mean cos`` term against NumPy; the teacher is a constant of the loss.
* The teacher cache is keyed on what the teacher reads: another template or other weights of
  the same shapes get their own teacher, the same ones (or the same weights loaded again) the
  cached one; ``Clip.weights_id`` is the weights' content.
* One CLI run of a "+src" preset on the toy world: results.json written, the GPA aggregate is
  the evaluated prompt.
"""

import dataclasses
import importlib
import json
import os

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLASSNAMES
from test_promptsrc import sharpened

import jaxprompt as jp
from jaxprompt import checkpoint, gpa, losses, templates
from jaxprompt import clip as clip_lib
from jaxprompt.methods.selfreg import self_regulated
from jaxprompt.methods.zeroshot import template_features

# The modules (jaxprompt.methods re-exports functions under the same names).
bayes_lib = importlib.import_module("jaxprompt.methods.bayes")
maple_lib = importlib.import_module("jaxprompt.methods.maple")
selfreg = importlib.import_module("jaxprompt.methods.selfreg")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = ("a photo of a {}.", "a drawing of the {}.")  # a short teacher: fast to encode
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return sharpened(tiny_clip)


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _moved(prompt, seed=1, scale=0.3):
    """The prompt moved off its initialisation, so every term is clearly non-zero."""
    leaves, tree = jax.tree.flatten(prompt)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


@pytest.fixture(scope="module")
def frozen(tiny_clip_dir, clip, batch):
    """Frozen features through transformers' PyTorch CLIPModel: the teacher (mean of
    unnormalised template features, normalised after) and the image features."""
    model = hf_reference.torch_clip(clip)

    def teacher(templates):
        raw = []
        for t in templates:
            ids, _ = clip_lib.tokenize(clip, [t.format(c) for c in CLASSNAMES], pad_to=77)
            raw.append(hf_reference.text_features(model, ids))
        return _norm(np.mean(raw, axis=0))

    f = _norm(hf_reference.image_features(model, batch["image"]))
    scale = float(np.exp(np.asarray(clip.params["logit_scale"], np.float64)))
    return {"teacher": teacher, "image": f, "scale": scale}


# --------------------------------------------------------------------------- promptsrc == wrapper


def _old_promptsrc_loss(ivlp_m, templates, prompt, clip, task, batch):
    """FROZEN copy of the pre-refactor ``promptsrc`` loss (jaxprompt @fbc5a2d), kept here as
    written then so the refactor can be checked against it; do not update it."""
    images, labels = batch["image"], batch["label"]
    scale = clip_lib.logit_scale(clip)
    g_p = clip_lib.normalize(ivlp_m.encode_classes(prompt, clip, task))
    deep = prompt["deep_vision"] if prompt["deep_vision"].shape[0] else None
    f_p = clip_lib.normalize(
        clip_lib.encode_image(clip, images, prompts=prompt["vision_ctx"], deep=deep)
    )
    z_p = scale * f_p @ g_p.T
    f = jax.lax.stop_gradient(clip_lib.normalize(clip_lib.encode_image(clip, images)))
    names = [n.replace("_", " ") for n in task.names]
    texts = [t.format(n) for t in templates for n in names]
    ids, eot = clip_lib.tokenize(clip, texts)
    k, c = len(templates), len(names)
    feats = template_features(clip, ids.reshape(k, c, -1), eot.reshape(k, c)).reshape(k, c, -1)
    g = jax.lax.stop_gradient(clip_lib.normalize(jnp.mean(feats, axis=0)))
    z = scale * f @ g.T
    ce = losses.cross_entropy(z_p, labels)
    kl = losses.kl_agreement(z, z_p)
    l1_text = losses.l1_agreement(g_p, g)
    l1_image = losses.l1_agreement(f_p, f)
    total = ce + 1.0 * kl + 25.0 * l1_text + 10.0 * l1_image
    return total, {"ce": ce, "kl": kl, "l1_text": l1_text, "l1_image": l1_image}


def test_wrapper_on_ivlp_equals_pre_refactor_promptsrc(clip, tiny_task, batch):
    psrc = jp.methods.get("promptsrc", depth=2, templates=list(TEMPLATES))
    generic = self_regulated(
        jp.methods.ivlp(depth=2), templates=TEMPLATES, gpa_mean=15.0, gpa_std=1.0
    )
    ivlp_m = jp.methods.ivlp(depth=2)
    prompt = _moved(psrc.init(jax.random.key(0), clip, tiny_task))
    key = jax.random.key(0)

    def old(p):
        return _old_promptsrc_loss(ivlp_m, TEMPLATES, p, clip, tiny_task, batch)

    def new(m):
        return lambda p: m.loss(p, clip, tiny_task, batch, key)

    (want, want_terms), want_grad = jax.jit(jax.value_and_grad(old, has_aux=True))(prompt)
    for m in (psrc, generic):
        (got, terms), grad = jax.jit(jax.value_and_grad(new(m), has_aux=True))(prompt)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for name in ("ce", "kl", "l1_text", "l1_image"):
            np.testing.assert_allclose(terms[name], want_terms[name], rtol=1e-6, atol=1e-9)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert generic.name == "selfreg" and psrc.name == "promptsrc"
    # GPA: the same aggregator as jaxprompt.gpa with PromptSRC's settings.
    want_w = gpa.gaussian_weights(mean=15.0, std=1.0, num_epochs=20)
    for m in (psrc, generic):
        agg = m.aggregator(20)
        state = agg.init({"x": jnp.zeros(())})
        for epoch in range(1, 21):
            state = agg.update(state, {"x": jnp.float32(epoch)}, epoch)
        np.testing.assert_allclose(agg.result(state)["x"], want_w @ np.arange(1, 21), rtol=1e-6)


# --------------------------------------------------------------------------- every base vs NumPy


def _prompted_features(name, method, prompt, clip, task, images, key, f_frozen):
    """(text [..., C, E], image [B, E] or None) from the base's own public functions."""
    if name in ("coop", "ivlp", "maple"):
        text = method.encode_classes(prompt, clip, task)
        if name == "ivlp":
            image = clip_lib.encode_image(
                clip, images, prompts=prompt["vision_ctx"], deep=prompt["deep_vision"]
            )
        elif name == "maple":
            vctx, vdeep = maple_lib.vision_prompts(prompt)
            image = clip_lib.encode_image(clip, images, prompts=vctx, deep=vdeep)
        else:
            image = None
        return text, image
    if name == "cocoop":  # one class set per image, from the image's frozen feature
        side = method.frozen_image
        per_image = [
            side.class_features(side.tuned(prompt, jnp.asarray(f, jnp.float32)), clip, task)
            for f in f_frozen
        ]
        return jnp.stack(per_image), None
    if name == "bayes":  # one class set per Monte Carlo sample, drawn from the loss's key
        eps = bayes_lib.draw_noise(key, method.config["mc_samples"], clip.spec.text_width)
        r = bayes_lib.residuals(prompt["mean"], prompt["logvar"], eps)
        text = jnp.stack(
            [clip_lib.prompted_text_features(clip, task, prompt["ctx"] + r_l[None]) for r_l in r]
        )
        return text, None
    raise AssertionError(name)


BASES = {
    "coop": lambda: jp.methods.coop(n_ctx=4),
    "cocoop": lambda: jp.methods.cocoop(n_ctx=4),
    "ivlp": lambda: jp.methods.ivlp(depth=2),
    "maple": lambda: jp.methods.maple(depth=2),
    "bayes": lambda: jp.methods.bayes(mc_samples=3),
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_each_term_equals_numpy(name, clip, tiny_task, batch, frozen):
    base_m = BASES[name]()
    method = self_regulated(base_m, templates=TEMPLATES)
    prompt = _moved(base_m.init(jax.random.key(0), clip, tiny_task))
    key = jax.random.key(7)
    total, metrics = jax.jit(method.loss)(prompt, clip, tiny_task, batch, key)

    g, f, scale = frozen["teacher"](TEMPLATES), frozen["image"], frozen["scale"]
    text, image = _prompted_features(name, base_m, prompt, clip, tiny_task, batch["image"], key, f)
    text = _norm(np.asarray(text, np.float64))
    z_p = np.asarray(base_m.logits(prompt, clip, tiny_task, batch["image"], key=key), np.float64)
    labels = batch["label"]
    b, c = z_p.shape
    log_ps, log_pt = _log_softmax(z_p), _log_softmax(scale * f @ g.T)
    want = {
        "ce": -np.mean(log_ps[np.arange(b), labels]),
        "kl": np.sum(np.exp(log_pt) * (log_pt - log_ps)) / (b * c),
        # Leading axes (images for CoCoOp, samples for Bayes) are averaged over.
        "l1_text": np.mean(np.abs(text - g)),
    }
    if image is not None:  # only bases that prompt the vision tower
        want["l1_image"] = np.mean(np.abs(_norm(np.asarray(image, np.float64)) - f))
    penalty = 0.0
    if name == "bayes":
        mu, lv = (np.asarray(prompt[k], np.float64) for k in ("mean", "logvar"))
        kl_post = np.mean(0.5 * (np.exp(lv) + mu**2 - 1 - lv))
        penalty = 1e-3 * kl_post
        np.testing.assert_allclose(metrics["posterior_kl"], kl_post, rtol=RTOL)
        assert text.shape[0] == 3  # [L, C, E]
    if name == "cocoop":
        assert text.shape[0] == b  # [B, C, E]
    assert ("l1_image" in metrics) == (name in ("ivlp", "maple")), sorted(metrics)
    for term, value in want.items():
        assert value > 1e-4, (term, value)  # each term clearly non-zero here
        np.testing.assert_allclose(metrics[term], value, rtol=RTOL, atol=ATOL, err_msg=term)
    expect = (
        want["ce"]
        + penalty
        + want["kl"]
        + 25.0 * want["l1_text"]
        + 10.0 * want.get("l1_image", 0.0)
    )
    np.testing.assert_allclose(total, expect, rtol=RTOL)


def test_gradients_flow_only_to_the_prompt(clip, tiny_task, batch):
    """Every prompt leaf gets a gradient; the teacher (and CLIP) are constants of the loss."""
    for base_m in (jp.methods.coop(n_ctx=4), jp.methods.maple(depth=2)):
        method = self_regulated(base_m, templates=TEMPLATES)
        prompt = _moved(base_m.init(jax.random.key(0), clip, tiny_task))
        teacher = jp.methods.selfreg.teacher_text_features(clip, tiny_task, TEMPLATES)

        def loss(p, g, method=method):
            return method.loss(p, clip, tiny_task, {**batch, "teacher_text": g}, None)[0]

        gp, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(prompt, teacher)
        assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(gp))
        assert float(jnp.abs(gt).max()) == 0.0  # no gradient reaches the frozen teacher


def test_wrapper_refuses_bases_without_features_and_bad_settings():
    tpt = jp.methods.get("tpt")
    with pytest.raises(ValueError, match="features"):
        self_regulated(tpt)
    with pytest.raises(ValueError, match="PromptMethod"):
        self_regulated("coop")
    with pytest.raises(ValueError, match="text_distance"):
        self_regulated(jp.methods.coop(n_ctx=4), text_distance="l2")
    with pytest.raises(ValueError, match="template"):
        self_regulated(jp.methods.coop(n_ctx=4), templates="nope")
    # Registry forms: a base by name, and the checkpoint-meta form.
    m = jp.methods.get("selfreg", base="coop", base_kwargs={"n_ctx": 4})
    assert m.name == "selfreg" and m.config["base"].name == "coop"
    meta = checkpoint._jsonable(dict(m.config))
    again = jp.methods.get("selfreg", **meta)
    assert again.config["base"].config == m.config["base"].config


def test_relative_gpa_follows_the_run_length():
    m = jp.methods.get("coop+src", base="coop", base_kwargs={"n_ctx": 4})
    want = gpa.gaussian_weights(mean=150.0, std=10.0, num_epochs=200)
    agg = m.aggregator(200)
    state = agg.init({"x": jnp.zeros(())})
    for epoch in range(1, 201):
        state = agg.update(state, {"x": jnp.float32(epoch)}, epoch)
    np.testing.assert_allclose(agg.result(state)["x"], want @ np.arange(1, 201), rtol=1e-5)
    assert jp.methods.get("selfreg", base="coop", gpa=False).aggregator is None


def test_relative_gpa_still_averages_on_short_runs():
    from jaxprompt.methods import selfreg

    assert selfreg.relative_gpa(20) == (15.0, 1.0)  # PromptSRC's own base-to-novel GPA
    assert selfreg.relative_gpa(200) == (150.0, 10.0)
    for epochs in (5, 10):  # maple+src's and cocoop+src's runs
        mean, std = selfreg.relative_gpa(epochs)
        assert (mean, std) == (0.75 * epochs, 1.0)
        w = gpa.gaussian_weights(mean=mean, std=std, num_epochs=epochs)
        assert w.max() < 0.45 and (w > 0.05).sum() >= 4  # several snapshots, none dominant
    # The protocol configs give the "+src" presets the same numbers.
    from jaxprompt.app import flags

    for preset, epochs in (("maple+src", 5), ("cocoop+src", 10), ("coop+src", 200)):
        config, _ = flags.parse_run_flags(
            ["x", "--config", f"base2new:{preset},dataset=DescribableTextures", "--workdir", "w"],
            need_config=True,
        )
        assert config.optim.epochs == epochs
        kw = config.method.kw
        assert (kw.gpa_mean, kw.gpa_std) == selfreg.relative_gpa(epochs), preset


# --------------------------------------------------------------------------- KgCoOp


def test_kgcoop_term_equals_numpy(clip, batch, frozen):
    template = "a photo of a {}."
    task = jp.make_task(clip, CLASSNAMES, template=template)
    method = jp.methods.get("kgcoop")
    assert method.name == "kgcoop" and method.config["weight"] == 8.0
    assert method.aggregator is None and method.prepare is not None
    coop_m = method.config["base"]
    assert coop_m.name == "coop" and coop_m.config["init_words"] == "a photo of a"
    prompt = _moved(method.init(jax.random.key(0), clip, task))
    total, metrics = jax.jit(method.loss)(prompt, clip, task, batch, jax.random.key(0))
    assert set(metrics) == {"ce", "cos_text", "accuracy"}  # no KL, no image term

    g = frozen["teacher"]((template,))  # the hand-crafted prompt's frozen features
    g_p = _norm(np.asarray(coop_m.encode_classes(prompt, clip, task), np.float64))
    cos_term = 1.0 - np.mean(np.sum(g_p * g, axis=-1))
    # The code's 1 - mean cos is half the paper's mean squared distance of unit vectors.
    np.testing.assert_allclose(cos_term, 0.5 * np.mean(np.sum((g_p - g) ** 2, -1)), rtol=1e-9)
    z_p = np.asarray(coop_m.logits(prompt, clip, task, batch["image"]), np.float64)
    ce = -np.mean(_log_softmax(z_p)[np.arange(len(z_p)), batch["label"]])
    assert cos_term > 1e-4
    np.testing.assert_allclose(metrics["cos_text"], cos_term, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(total, ce + 8.0 * cos_term, rtol=RTOL)
    # The trainer's prepared (cached-teacher) method gives the same loss.
    prepared = method.prepare(clip, task)
    assert prepared.name == "kgcoop" and prepared.config == method.config
    np.testing.assert_allclose(
        jax.jit(prepared.loss)(prompt, clip, task, batch, jax.random.key(0))[0], total, rtol=1e-6
    )
    # "dataset" needs the task's template.
    with pytest.raises(ValueError, match="template"):
        method.loss(prompt, clip, jp.make_task(clip, CLASSNAMES), batch, None)


def test_kgcoop_teacher_on_dtd_is_kgcoops_template_not_coops(clip, batch, frozen):
    # A DTD task carries CoOp's template "{} texture."; KgCoOp's table (its trainers/kgcoop.py)
    # has "a photo of a {}, a type of texture." there, and that is the teacher.
    coop_t = templates.COOP_TEMPLATES["DescribableTextures"]
    kg_t = "a photo of a {}, a type of texture."
    assert templates.KGCOOP_TEMPLATES["DescribableTextures"] == kg_t != coop_t
    assert {k: v for k, v in templates.KGCOOP_TEMPLATES.items() if v != kg_t} == {
        k: v for k, v in templates.COOP_TEMPLATES.items() if k != "DescribableTextures"
    }
    task = jp.make_task(clip, CLASSNAMES, template=coop_t)
    method = jp.methods.get("kgcoop")
    assert method.config["templates"] == "dataset:kgcoop"
    prompt = _moved(method.init(jax.random.key(0), clip, task))
    _, metrics = jax.jit(method.loss)(prompt, clip, task, batch, jax.random.key(0))
    g_p = _norm(np.asarray(method.config["base"].encode_classes(prompt, clip, task), np.float64))

    def term(template):
        return 1.0 - np.mean(np.sum(g_p * frozen["teacher"]((template,)), axis=-1))

    np.testing.assert_allclose(metrics["cos_text"], term(kg_t), rtol=RTOL, atol=ATOL)
    assert abs(term(kg_t) - term(coop_t)) > 100 * ATOL  # the two teachers are told apart
    # The registry's meta form rebuilds the same teacher choice.
    again = jp.methods.get("kgcoop", **checkpoint._jsonable(dict(method.config)))
    assert again.config["templates"] == "dataset:kgcoop"


# --------------------------------------------------------------------------- the teacher cache


def _perturbed(clip, scale=1.01):
    """Other weights of the same shapes (the token embedding scaled: every teacher moves)."""

    def f(path, x):
        return x * scale if "token_embedding" in jax.tree_util.keystr(path) else x

    return clip.replace(params=jax.tree_util.tree_map_with_path(f, clip.params))


def test_weights_id_is_the_weights_content(tiny_clip_dir, tiny_clip):
    wid = tiny_clip.weights_id
    assert isinstance(wid, str) and len(wid) == 16
    assert jp.load_clip(tiny_clip_dir).weights_id == wid  # the same weights loaded again
    assert clip_lib.weights_id(tiny_clip.params, tiny_clip.tokenizer) == wid
    # One bit of one parameter changes it (float32 nextafter: the smallest possible change).
    path = ("text_model", "final_layer_norm", "bias")
    leaf = np.asarray(tiny_clip.params[path[0]][path[1]][path[2]])
    bumped = leaf.copy()
    bumped[3] = np.nextafter(bumped[3], np.float32(1))
    params = jax.tree.map(lambda x: x, tiny_clip.params)
    params[path[0]][path[1]][path[2]] = jnp.asarray(bumped)
    one_bit = tiny_clip.replace(params=params)
    assert one_bit.weights_id not in (None, wid)
    assert tiny_clip.replace(params=tiny_clip.params).weights_id == wid  # replace recomputes
    # Under jit the weights are traced: the id is None, so nothing is cached on them.
    seen = []
    jax.jit(lambda c: seen.append(c.replace(params=c.params).weights_id) or 0.0)(tiny_clip)
    assert seen == [None]
    assert jax.device_put(tiny_clip).weights_id == wid  # tree maps keep it (same values)


def test_prepared_teacher_is_recomputed_when_template_or_weights_change(clip, batch):
    """A prepared KgCoOp (teacher cached for one CLIP and template) used with another template,
    other weights of the same shapes, or a CLIP without a weights_id gives the loss of an
    unprepared KgCoOp on those (the teacher computed again); with the same ones (or the same
    weights loaded again) it reads the cache. Before, the cache was keyed on the spec and the
    class names only and kept the stale teacher."""
    method = jp.methods.get("kgcoop")  # templates="dataset:kgcoop": reads task.template
    task_a = jp.make_task(clip, CLASSNAMES, template="a photo of a {}.")
    task_b = jp.make_task(clip, CLASSNAMES, template="a sketch of the {}.")
    other = _perturbed(clip)
    prompt = _moved(method.init(jax.random.key(0), clip, task_a))
    prepared = method.prepare(clip, task_a)
    key = jax.random.key(0)

    def total(m, c, t):
        return float(jax.jit(m.loss)(prompt, c, t, batch, key)[0])

    cases = ((clip, task_a), (clip, task_b), (other, task_a))
    plain = [total(method, c, t) for c, t in cases]
    for (c, t), want in zip(cases, plain, strict=True):
        np.testing.assert_allclose(total(prepared, c, t), want, rtol=1e-6)
    # The three differ by far more than that tolerance: a stale teacher would be seen.
    assert min(abs(plain[0] - plain[1]), abs(plain[0] - plain[2])) > 1e-3 * abs(plain[0])

    # Which calls read the cache: a probe loss that reports whether the batch carries it.
    probe = prepared._replace(loss=lambda p, c, t, b, k: selfreg.TEACHER_KEY in b)
    cached = selfreg.cache_teacher(probe, lambda c, t: jnp.zeros((len(t), 4)), clip, task_a)
    reloaded = clip.replace(params=jax.tree.map(jnp.array, clip.params))  # a fresh copy
    assert cached.loss(prompt, clip, task_a, batch, key) is True
    assert cached.loss(prompt, reloaded, task_a, batch, key) is True  # same content
    assert cached.loss(prompt, clip, task_b, batch, key) is False
    assert cached.loss(prompt, other, task_a, batch, key) is False
    no_id = dataclasses.replace(clip, weights_id=None)  # e.g. a Clip built by hand
    assert cached.loss(prompt, no_id, task_a, batch, key) is False
    assert (
        selfreg.cache_teacher(probe, None, no_id, task_a).loss(prompt, no_id, task_a, batch, key)
        is False
    )  # nothing to key a cache on: nothing computed, nothing cached


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_trains_and_evaluates_a_src_preset_with_gpa(tiny_clip_dir, tmp_path):
    """``coop+src`` base-to-novel on the toy world through the CLI, two epochs with a GPA
    centred on epoch 1: the evaluated (and saved) prompt is the epoch-1 snapshot, not the
    last training prompt."""
    from jaxprompt import cli

    workdir = str(tmp_path / "coop_src")
    code = cli.main(
        [
            "jaxprompt", "train",
            "--config", os.path.join(REPO, "configs", "base2new.py") + ":coop+src,runlocal=true",
            f"--config.clip.name={tiny_clip_dir}",
            "--config.method.kw.base_kwargs.n_ctx=4",
            "--config.method.kw.templates=single",
            "--config.optim.epochs=2",
            "--config.method.kw.gpa_mean=1.0",
            "--config.method.kw.gpa_std=0.01",
            "--workdir", workdir,
        ]
    )  # fmt: skip
    assert code == 0
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["method"] == "coop+src"
    assert set(res["accuracy"]) >= {"base", "new", "hm"}, res["accuracy"]
    cfg = json.load(open(os.path.join(workdir, "config.json")))
    assert cfg["method"]["name"] == "coop+src"
    # The final checkpoint carries the GPA aggregate as its evaluated prompt.
    steps = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(workdir)) if s.isdigit())
    assert len(steps) >= 2, steps
    final_eval, meta = checkpoint.load_prompt(workdir)
    assert meta["method"] == "coop+src"
    _, flat, _, _ = checkpoint._restore_raw(workdir, None)
    raw_final = checkpoint.unflatten_dict(flat, "prompt")
    epoch1, _ = checkpoint.load_prompt(workdir, step=steps[0])
    np.testing.assert_allclose(final_eval["ctx"], epoch1["ctx"], rtol=1e-5, atol=1e-7)
    assert np.abs(raw_final["ctx"] - epoch1["ctx"]).max() > 0  # training went on after it
