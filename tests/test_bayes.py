"""Bayesian prompt learning: the objective against NumPy, CoOp at zero variance, keys, batching.

The independent side of each check: per-sample logits come from CoOp (``jp.methods.coop``) run
on the shifted context ``ctx + r``, with ``r`` reparameterised in NumPy from the documented
noise draw (one ``jax.random.normal(key, [L, D])``, or ``[L, B, D]`` for the conditional
posterior); the conditional posterior's MLPs, the log-mean-exp aggregation, the predictive
and the KL are NumPy.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import losses, sharding
from jaxprompt.methods import base
from jaxprompt.methods.bayes import DEFAULT_EVAL_SEED, _sequence_mesh, draw_noise, sample_logits

L = 3  # Monte Carlo samples in these tests
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- NumPy side


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_log_mean_exp(x, axis):
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.mean(np.exp(x - m), axis, keepdims=True))).squeeze(axis)


def np_elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def np_mlp(p, x):
    for i, name in enumerate(("linear1", "linear2", "linear3")):
        x = x @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"], np.float64)
        if i < 2:
            x = np_elu(x)
    return x


def np_kl(mu, lv):
    """bayesian.md section 2: per-dimension closed form, MEAN over dimensions (and images)."""
    return np.mean(0.5 * (np.exp(lv) + mu**2 - 1.0 - lv))


def np_objective(s, labels, mu, lv, kl_weight=1e-3):
    """Section 2 exactly: -mean_b [logsumexp_l log p(y_b | x_b, r_l) - log L] + w * KL."""
    ll = np_log_softmax(s)[:, np.arange(len(labels)), labels]  # [L, B]
    task = -np.mean(np_log_mean_exp(ll, axis=0))
    kl = np_kl(mu, lv)
    return task + kl_weight * kl, task, kl


# ------------------------------------------------------------------------------- fixtures

# One jitted function per entry point, shared by the tests: compiles dominate the running time
# on the tiny model, and equal shapes hit the cache.
SAMPLE_LOGITS = jax.jit(sample_logits, static_argnames=("remat", "chunk", "shard_axis"))


def jit_logits(method):
    return jax.jit(lambda p, c, t, x, k: method.logits(p, c, t, x, key=k))


@pytest.fixture(scope="module")
def coop_logits():
    coop = jp.methods.coop(n_ctx=4, init_words="a photo of a")
    return jax.jit(lambda ctx, clip, task, x: coop.logits({"ctx": ctx}, clip, task, x))


@pytest.fixture(scope="module")
def uncond():
    return jp.methods.get("bayes", mc_samples=L)


@pytest.fixture(scope="module")
def cond():
    return jp.methods.get("bayes", mc_samples=L, conditional=True)


@pytest.fixture(scope="module")
def logits_fns(uncond, cond):
    return {"uncond": jit_logits(uncond), "cond": jit_logits(cond)}


@pytest.fixture(scope="module")
def loss_fns(uncond, cond):
    return {"uncond": jax.jit(uncond.loss), "cond": jax.jit(cond.loss)}


def _perturbed(p, seed, scale):
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(p))))
    return jax.tree.map(lambda v: v + scale * jax.random.normal(next(keys), v.shape), p)


@pytest.fixture(scope="module")
def uprompt(uncond, tiny_clip, tiny_task):
    p = uncond.init(jax.random.key(0), tiny_clip, tiny_task)
    # A non-zero mean so the KL's mu^2 term and the mean's place in r are both exercised.
    return {**p, "mean": 0.3 * jax.random.normal(jax.random.key(7), p["mean"].shape)}


@pytest.fixture(scope="module")
def cprompt(cond, tiny_clip, tiny_task):
    p = cond.init(jax.random.key(0), tiny_clip, tiny_task)
    # Larger MLP weights: the per-image posterior then visibly differs between images.
    return {**p, "mean_net": _perturbed(p["mean_net"], 1, 0.5)}


# ------------------------------------------------------------------------------- init


def test_init_unconditional(uncond, tiny_clip, tiny_task):
    p = uncond.init(jax.random.key(0), tiny_clip, tiny_task)
    dt = tiny_clip.spec.text_width
    assert jax.tree.map(jnp.shape, p) == {"ctx": (4, dt), "mean": (dt,), "logvar": (dt,)}
    np.testing.assert_array_equal(p["ctx"], base.word_embeddings(tiny_clip, "a photo of a"))
    np.testing.assert_array_equal(p["mean"], 0.0)
    # The log-variance starts at U[0, 1) (torch.rand), so sigma is in [1, 1.65).
    assert 0.0 <= float(p["logvar"].min()) and float(p["logvar"].max()) < 1.0
    assert float(p["logvar"].std()) > 0.1


def test_init_conditional(cond, tiny_clip, tiny_task):
    p = cond.init(jax.random.key(0), tiny_clip, tiny_task)
    e, dt = tiny_clip.spec.embed_dim, tiny_clip.spec.text_width
    h = e // 2
    net = {
        "linear1": {"kernel": (e, h), "bias": (h,)},
        "linear2": {"kernel": (h, h), "bias": (h,)},
        "linear3": {"kernel": (h, dt), "bias": (dt,)},
    }
    assert jax.tree.map(jnp.shape, p) == {"ctx": (4, dt), "mean_net": net, "logvar_net": net}
    # PyTorch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the two nets differ.
    for name, fan_in in (("linear1", e), ("linear2", h), ("linear3", h)):
        assert float(jnp.abs(p["mean_net"][name]["kernel"]).max()) <= 1 / np.sqrt(fan_in)
    assert not np.allclose(p["mean_net"]["linear1"]["kernel"], p["logvar_net"]["linear1"]["kernel"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="mc_samples"):
        jp.methods.get("bayes", mc_samples=0)
    with pytest.raises(ValueError, match="chunk"):
        jp.methods.get("bayes", chunk=-1)
    assert jp.methods.get("bayes").encode_classes is None  # sampling: no cached class side


# ------------------------------------------------------------------------------- zero variance


def test_zero_variance_is_coop(logits_fns, uprompt, tiny_clip, tiny_task, images, coop_logits):
    """logvar = -inf: every sample is the mean, and the logits are CoOp's for ctx + mean."""
    p = {**uprompt, "logvar": jnp.full_like(uprompt["logvar"], -jnp.inf)}
    want = np.asarray(coop_logits(p["ctx"] + p["mean"], tiny_clip, tiny_task, images))
    eps = draw_noise(jax.random.key(3), L, tiny_clip.spec.text_width)
    s = SAMPLE_LOGITS(p, tiny_clip, tiny_task, images, eps)
    for sl in np.asarray(s):
        np.testing.assert_allclose(sl, want, rtol=1e-5, atol=1e-5)
    # The method's score is the log of the averaged probabilities: log_softmax of CoOp's logits.
    got = logits_fns["uncond"](p, tiny_clip, tiny_task, images, jax.random.key(4))
    np.testing.assert_allclose(got, np_log_softmax(want.astype(np.float64)), atol=5e-5)
    # And with mean 0, exactly CoOp with the same context.
    p0 = {**p, "mean": jnp.zeros_like(p["mean"])}
    s0 = SAMPLE_LOGITS(p0, tiny_clip, tiny_task, images, eps)
    want0 = coop_logits(p["ctx"], tiny_clip, tiny_task, images)
    np.testing.assert_allclose(s0[0], want0, rtol=1e-5, atol=1e-5)


def test_zero_variance_conditional_is_coop(cprompt, tiny_clip, tiny_task, images, coop_logits):
    m = 0.2 * jax.random.normal(jax.random.key(8), (tiny_clip.spec.text_width,))
    p = jax.tree.map(lambda x: x, cprompt)
    # Constant heads: mean m for every image, log-variance -inf.
    p["mean_net"]["linear3"] = {"kernel": jnp.zeros_like(p["mean_net"]["linear3"]["kernel"]),
                                "bias": m}  # fmt: skip
    lv3 = p["logvar_net"]["linear3"]
    p["logvar_net"]["linear3"] = {"kernel": jnp.zeros_like(lv3["kernel"]),
                                  "bias": jnp.full_like(lv3["bias"], -jnp.inf)}  # fmt: skip
    eps = draw_noise(jax.random.key(3), L, tiny_clip.spec.text_width, len(images))
    s = SAMPLE_LOGITS(p, tiny_clip, tiny_task, images, eps)
    want = coop_logits(p["ctx"] + m, tiny_clip, tiny_task, images)
    for sl in np.asarray(s):
        np.testing.assert_allclose(sl, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- the objective


def _np_residuals(mu, lv, eps):
    return mu + eps * np.exp(0.5 * lv)


def test_unconditional_loss_matches_numpy(
    loss_fns, logits_fns, uprompt, tiny_clip, tiny_task, batch, coop_logits
):
    key = jax.random.key(11)
    loss, metrics = loss_fns["uncond"](uprompt, tiny_clip, tiny_task, batch, key)
    # Independent: noise by the documented draw, residuals in NumPy, per-sample logits by CoOp.
    eps = np.asarray(jax.random.normal(key, (L, tiny_clip.spec.text_width)), np.float64)
    mu, lv = np.asarray(uprompt["mean"], np.float64), np.asarray(uprompt["logvar"], np.float64)
    r = _np_residuals(mu, lv, eps)  # [L, D]
    ctx = np.asarray(uprompt["ctx"], np.float64)
    s = np.stack(
        [
            np.asarray(coop_logits(jnp.asarray(ctx + r_l, jnp.float32), tiny_clip, tiny_task,
                                   batch["image"]), np.float64)
            for r_l in r
        ]
    )  # fmt: skip  # [L, B, C]
    total, task, kl = np_objective(s, batch["label"], mu, lv)
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll"]), task, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    pred = np_log_mean_exp(np_log_softmax(s), axis=0).argmax(-1)
    assert float(metrics["accuracy"]) == np.mean(pred == batch["label"])
    # Log-mean-exp of likelihoods, not the mean log-likelihood: the two differ here.
    ll = np_log_softmax(s)[:, np.arange(4), batch["label"]]
    assert abs(-ll.mean() - task) > 1e-3
    # Test-time score: log of the average probability over the same samples.
    got = logits_fns["uncond"](uprompt, tiny_clip, tiny_task, batch["image"], key)
    np.testing.assert_allclose(got, np_log_mean_exp(np_log_softmax(s), axis=0), atol=1e-5)


def test_conditional_loss_matches_numpy(
    loss_fns, logits_fns, cprompt, tiny_clip, tiny_task, batch, coop_logits
):
    key = jax.random.key(12)
    x = batch["image"]
    loss, metrics = loss_fns["cond"](cprompt, tiny_clip, tiny_task, batch, key)
    b = len(x)
    img = np.asarray(clip_lib.normalize(clip_lib.encode_image(tiny_clip, x)), np.float64)
    mu, lv = np_mlp(cprompt["mean_net"], img), np_mlp(cprompt["logvar_net"], img)  # [B, D]
    eps = np.asarray(jax.random.normal(key, (L, b, tiny_clip.spec.text_width)), np.float64)
    r = _np_residuals(mu, lv, eps)  # [L, B, D]
    ctx = np.asarray(cprompt["ctx"], np.float64)
    s = np.zeros((L, b, len(tiny_task)))
    for j in range(L):
        for i in range(b):
            shifted = jnp.asarray(ctx + r[j, i], jnp.float32)
            s[j, i] = np.asarray(coop_logits(shifted, tiny_clip, tiny_task, x))[i]
    total, task, kl = np_objective(s, batch["label"], mu, lv)
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll"]), task, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    got = logits_fns["cond"](cprompt, tiny_clip, tiny_task, x, key)
    np.testing.assert_allclose(got, np_log_mean_exp(np_log_softmax(s), axis=0), atol=1e-5)


# ------------------------------------------------------------------------------- keys


def test_same_key_same_result_different_key_different(
    uncond, logits_fns, loss_fns, uprompt, tiny_clip, tiny_task, batch
):
    def f(p, k):
        return logits_fns["uncond"](p, tiny_clip, tiny_task, batch["image"], k)

    a, b, c = (np.asarray(f(uprompt, jax.random.key(i))) for i in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # No key: a fixed key (evaluation is reproducible), still sampling (not the mean alone).
    none = uncond.logits(uprompt, tiny_clip, tiny_task, batch["image"])
    fixed = f(uprompt, jax.random.key(DEFAULT_EVAL_SEED))
    np.testing.assert_allclose(none, fixed, rtol=1e-5, atol=1e-5)
    mean_only = {**uprompt, "logvar": jnp.full_like(uprompt["logvar"], -jnp.inf)}
    assert np.abs(np.asarray(none) - np.asarray(f(mean_only, jax.random.key(0)))).max() > 1e-3
    la, _ = loss_fns["uncond"](uprompt, tiny_clip, tiny_task, batch, jax.random.key(5))
    lb, _ = loss_fns["uncond"](uprompt, tiny_clip, tiny_task, batch, jax.random.key(5))
    lc, _ = loss_fns["uncond"](uprompt, tiny_clip, tiny_task, batch, jax.random.key(6))
    assert float(la) == float(lb) and float(la) != float(lc)


# ------------------------------------------------------------------------------- batching


def test_conditional_batch_equals_single_images(cprompt, tiny_clip, tiny_task, images):
    eps = draw_noise(jax.random.key(9), L, tiny_clip.spec.text_width, len(images))
    whole = np.asarray(SAMPLE_LOGITS(cprompt, tiny_clip, tiny_task, images, eps))  # [L, 4, C]
    for i in range(len(images)):
        one = np.asarray(SAMPLE_LOGITS(cprompt, tiny_clip, tiny_task, images[i : i + 1],
                                       eps[:, i : i + 1]))  # fmt: skip
        np.testing.assert_allclose(one[:, 0], whole[:, i], rtol=1e-5, atol=1e-5)
    # The images really get different posteriors (otherwise the check would be vacuous).
    assert np.abs(whole[:, 0] - whole[:, 1]).max() > 1e-3


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", ["uncond", "cond"])
def test_gradient_reaches_every_leaf(variant, request, tiny_clip, tiny_task, batch):
    method = request.getfixturevalue(variant)
    prompt = request.getfixturevalue("uprompt" if variant == "uncond" else "cprompt")
    grads = jax.jit(jax.grad(lambda p: method.loss(p, tiny_clip, tiny_task, batch,
                                                   jax.random.key(1))[0]))(prompt)  # fmt: skip
    assert jax.tree.structure(grads) == jax.tree.structure(prompt)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_kl_gradient_alone(uncond, uprompt, tiny_clip):
    """The KL term's gradient: d(w * KL)/d mu = w mu / D, d/d logvar = w (e^lv - 1) / (2 D)."""
    mu, lv = uprompt["mean"], uprompt["logvar"]
    d = mu.shape[0]
    g_mu, g_lv = jax.grad(lambda m, v: 1e-3 * losses.gaussian_kl(m, v), argnums=(0, 1))(mu, lv)
    np.testing.assert_allclose(g_mu, 1e-3 * mu / d, rtol=1e-5)
    np.testing.assert_allclose(g_lv, 1e-3 * (np.exp(lv) - 1) / (2 * d), rtol=1e-4, atol=1e-12)


# ------------------------------------------------------------------------------- base -> new


@pytest.mark.parametrize("variant", ["uncond", "cond"])
def test_logits_on_new_classes(variant, request, logits_fns, tiny_clip, new_task, images):
    prompt = request.getfixturevalue("uprompt" if variant == "uncond" else "cprompt")
    z = logits_fns[variant](prompt, tiny_clip, new_task, images, jax.random.key(2))
    assert z.shape == (len(images), len(new_task)) and z.dtype == jnp.float32
    # Log-probabilities: each row log-sums-exp to 0.
    np.testing.assert_allclose(jax.nn.logsumexp(z, axis=-1), 0.0, atol=1e-5)


# ------------------------------------------------------------------------------- cost controls


def test_chunked_text_pass_agrees(uprompt, tiny_clip, tiny_task, images):
    eps = draw_noise(jax.random.key(13), L, tiny_clip.spec.text_width)
    whole = SAMPLE_LOGITS(uprompt, tiny_clip, tiny_task, images, eps)
    # 4 does not divide L x C = 15: three lax.map steps and one padding row.
    chunked = SAMPLE_LOGITS(uprompt, tiny_clip, tiny_task, images, eps, chunk=4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_chunked_and_remat_gradients_agree(uprompt, cprompt, tiny_clip, tiny_task, batch):
    key = jax.random.key(13)
    for prompt, cond in ((uprompt, False), (cprompt, True)):
        plain = jp.methods.get("bayes", mc_samples=L, conditional=cond, remat=False)
        # 7 does not divide L x C = 15 (or B x L x C = 60): the padding path is exercised.
        chunked = jp.methods.get("bayes", mc_samples=L, conditional=cond, chunk=7)
        (la, _), ga = jax.jit(jax.value_and_grad(plain.loss, has_aux=True))(
            prompt, tiny_clip, tiny_task, batch, key
        )
        (lb, _), gb = jax.jit(jax.value_and_grad(chunked.loss, has_aux=True))(
            prompt, tiny_clip, tiny_task, batch, key
        )
        np.testing.assert_allclose(lb, la, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_text_sequences_split_over_the_data_axis(uncond, uprompt, tiny_clip, tiny_task, images):
    """Under jit on 8 devices the L x C sequences get a data-axis constraint; values unchanged."""
    mesh = sharding.make_mesh()
    x = sharding.put_batch(np.concatenate([images, images]), mesh)  # 8 images, one per device
    f = jax.jit(lambda p, x, k: uncond.logits(p, tiny_clip, tiny_task, x, key=k))
    key = jax.random.key(14)
    hlo = f.lower(uprompt, x, key).as_text()
    constraints = [line for line in hlo.splitlines() if "sharding_constraint" in line]
    assert any('{"data"}' in line for line in constraints), constraints
    # No mesh in sight (host arrays, eager): no constraint, nothing to fail.
    assert _sequence_mesh(images, "data") is None
    # Without the option, no constraint.
    off = jp.methods.get("bayes", mc_samples=L, shard_axis=None)
    g = jax.jit(lambda p, x, k: off.logits(p, tiny_clip, tiny_task, x, key=k))
    assert "sharding_constraint" not in g.lower(uprompt, x, key).as_text()


@pytest.mark.slow
def test_sharded_text_pass_values(uncond, logits_fns, uprompt, tiny_clip, tiny_task, images):
    mesh = sharding.make_mesh()
    x8 = np.concatenate([images, images])
    key = jax.random.key(14)
    got = logits_fns["uncond"](uprompt, tiny_clip, tiny_task, sharding.put_batch(x8, mesh), key)
    want = logits_fns["uncond"](uprompt, tiny_clip, tiny_task, x8, key)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- configs


def test_configs_apply_the_per_dataset_recipe():
    import sys

    sys.path.insert(0, os.path.join(REPO, "configs"))
    import base2new
    import common
    import xdomain

    c = base2new.get_config("bayes,dataset=dtd")
    assert c.method.kw.mc_samples == 40 and c.optim.epochs == 10
    assert c.data.batch_size == 1 and c.optim.lr == 0.002 and c.optim.weight_decay == 5e-4
    assert c.method.kw.kl_weight == 1e-3 and c.method.kw.conditional is False
    assert base2new.get_config("bayes,dataset=EuroSAT").optim.epochs == 60
    assert base2new.get_config("bayes,dataset=ucf101").method.kw.mc_samples == 5
    local = base2new.get_config("bayes,dataset=oxford_pets,runlocal=true")
    assert local.method.kw.mc_samples == 40 and local.optim.epochs == 1
    xd = xdomain.get_config("bayes,dataset=imagenet")
    assert (xd.method.kw.mc_samples, xd.optim.epochs) == (10, 10)
    assert len(common.BAYES_PER_DATASET) == 11
    # The preset builds the method as is (the CLI's path).
    m = jp.methods.get("bayes", **dict(c.method.kw))
    assert m.config["mc_samples"] == 40 and m.config["chunk"] is None


# ------------------------------------------------------------------------------- CLI


@pytest.mark.slow
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_cli_trains_base_and_evaluates_base_and_new(conditional, tiny_clip_dir, tmp_path):
    from jaxprompt import cli

    wd = str(tmp_path / "run")
    code = cli.main(
        [
            "jaxprompt", "train", "--config",
            f"{os.path.join(REPO, 'configs', 'base2new.py')}:bayes,runlocal=true",
            f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.mc_samples=2",
            # The recipe's batch 1 cannot split over the 8 simulated devices of the tests.
            "--config.data.batch_size=8",
            f"--config.method.kw.conditional={str(conditional).lower()}", "--workdir", wd,
        ]
    )  # fmt: skip
    assert code == 0
    res = json.load(open(os.path.join(wd, "results.json")))
    assert res["method"] == "bayes" and set(res["accuracy"]) == {"base", "new", "hm"}
    metrics = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train_lines = [m for m in metrics if "nll" in m]
    assert train_lines and all(np.isfinite(m["loss"]) for m in train_lines)
    assert {"nll", "kl", "accuracy"} <= set(train_lines[-1])
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert cfg["method"]["kw"]["conditional"] is conditional


def test_trainer_decay_is_coupled_on_the_posterior(uprompt):
    """The recipe's optimizer decays mean and logvar with the gradient (before momentum)."""
    from jaxprompt import train

    tx = train.make_optimizer(0.002, weight_decay=5e-4)
    zero = jax.tree.map(jnp.zeros_like, uprompt)
    updates, _ = tx.update(zero, tx.init(uprompt), uprompt)
    for k in ("mean", "logvar", "ctx"):
        np.testing.assert_allclose(updates[k], -0.002 * 5e-4 * uprompt[k], rtol=1e-6)
