"""jaxprompt.losses against independent NumPy (float64) computations of the specs' formulas."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import losses

RTOL = 1e-5
ATOL = 1e-6

# Jitted once per shape: much faster than eager op-by-op dispatch, and it is how the losses run
# in training. Eager execution is covered by test_all_losses_jit_equal_eager.
L = SimpleNamespace(
    cross_entropy=jax.jit(losses.cross_entropy),
    kl_agreement=jax.jit(losses.kl_agreement),
    l1_agreement=jax.jit(losses.l1_agreement),
    confident_indices=jax.jit(losses.confident_indices, static_argnames="keep"),
    select_confident=jax.jit(losses.select_confident, static_argnames="keep"),
    marginal_entropy=jax.jit(losses.marginal_entropy),
    transport_loss=jax.jit(losses.transport_loss),
    transport_loss_from_cosine=jax.jit(losses.transport_loss_from_cosine),
    mutual_information_loss=jax.jit(losses.mutual_information_loss),
    gaussian_kl=jax.jit(losses.gaussian_kl),
    log_mean_exp=jax.jit(losses.log_mean_exp, static_argnames="axis"),
    mc_log_likelihood=jax.jit(losses.mc_log_likelihood),
    mc_nll=jax.jit(losses.mc_nll),
    mc_log_predictive=jax.jit(losses.mc_log_predictive),
)


def jgrad(fn, argnums=0):
    return jax.jit(jax.grad(fn, argnums=argnums))


# ------------------------------------------------------------------------------------------------
# NumPy references, written from the spec formulas (float64, no jaxprompt code involved).
# ------------------------------------------------------------------------------------------------


def np_log_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def np_softmax(z, axis=-1):
    return np.exp(np_log_softmax(z, axis))


def np_logsumexp(x, axis):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.exp(x - m).sum(axis=axis))


def rand(seed, shape, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def f32(x):
    return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------------------------------------
# cross_entropy
# ------------------------------------------------------------------------------------------------


def np_ce(z, y):
    lp = np_log_softmax(z)
    return -lp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_cross_entropy_matches_numpy(scale):
    z = rand(0, (5, 7), scale)
    y = np.array([0, 6, 3, 3, 1])
    got = L.cross_entropy(f32(z), jnp.asarray(y))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, np_ce(np.float32(z), y), rtol=RTOL, atol=ATOL)
    assert np.isfinite(float(got))


def test_cross_entropy_one_class_is_zero_and_mean_not_sum():
    assert float(L.cross_entropy(np.ones((3, 1)), np.zeros(3, np.int32))) == 0.0
    # Uniform logits: mean CE is log C regardless of B (a sum would give B log C).
    np.testing.assert_allclose(
        L.cross_entropy(np.zeros((4, 5)), np.arange(4)), math.log(5), rtol=1e-6
    )


def test_cross_entropy_upcasts_bfloat16():
    z = rand(1, (4, 3), 10.0)
    y = np.array([2, 0, 1, 1])
    z_bf16 = jnp.asarray(z, jnp.bfloat16)
    got = L.cross_entropy(z_bf16, jnp.asarray(y))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_ce(np.asarray(z_bf16, np.float64), y), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# kl_agreement (PromptSRC section 4)
# ------------------------------------------------------------------------------------------------


def np_kl_agreement(teacher, student, t=1.0):
    lt = np_log_softmax(np.asarray(teacher) / t)
    ls = np_log_softmax(np.asarray(student) / t)
    b, c = lt.shape
    return t**2 * (np.exp(lt) * (lt - ls)).sum() / (b * c)


def test_kl_agreement_matches_sum_over_b_times_c():
    t = rand(2, (4, 6), 5.0)
    s = rand(3, (4, 6), 5.0)
    got = float(L.kl_agreement(f32(t), f32(s)))
    want = np_kl_agreement(t, s)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # A 'batchmean' implementation (sum / B) is C = 6 times larger and must not pass.
    batchmean = want * 6
    assert not np.isclose(got, batchmean, rtol=1e-2)


def test_kl_agreement_direction():
    t = rand(4, (3, 5), 3.0)
    s = rand(5, (3, 5), 3.0)
    forward = float(L.kl_agreement(f32(t), f32(s)))
    swapped = float(L.kl_agreement(f32(s), f32(t)))
    np.testing.assert_allclose(forward, np_kl_agreement(t, s), rtol=RTOL)
    np.testing.assert_allclose(swapped, np_kl_agreement(s, t), rtol=RTOL)
    assert abs(forward - swapped) > 1e-2 * max(forward, swapped)


def test_kl_agreement_zero_when_equal_and_shift_invariant():
    t = rand(6, (2, 4), 10.0)
    np.testing.assert_allclose(L.kl_agreement(f32(t), f32(t)), 0.0, atol=1e-6)
    np.testing.assert_allclose(L.kl_agreement(f32(t), f32(t + 7.0)), 0.0, atol=1e-6)


def test_kl_agreement_large_logits_stable():
    # CLIP-scale logits x100 with saturated teacher probabilities (exact zeros in float32).
    t = rand(7, (4, 8), 100.0)
    s = rand(8, (4, 8), 100.0)
    got = float(L.kl_agreement(f32(t), f32(s)))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, np_kl_agreement(t, s), rtol=1e-4)


def test_kl_agreement_temperature():
    t = rand(9, (3, 4), 4.0)
    s = rand(10, (3, 4), 4.0)
    got = L.kl_agreement(f32(t), f32(s), temperature=2.0)
    np.testing.assert_allclose(got, np_kl_agreement(t, s, 2.0), rtol=RTOL)


def test_kl_agreement_gradient_only_to_student():
    t = rand(11, (3, 5), 2.0)
    s = rand(12, (3, 5), 2.0)
    g_t, g_s = jgrad(losses.kl_agreement, argnums=(0, 1))(f32(t), f32(s))
    np.testing.assert_array_equal(g_t, np.zeros_like(t))
    # d/dz_S of sum_bc p_T (log p_T - log p_S) / (B C) = (p_S - p_T) / (B C) for T = 1.
    want = (np_softmax(s) - np_softmax(t)) / t.size
    np.testing.assert_allclose(g_s, want, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# l1_agreement (PromptSRC section 4)
# ------------------------------------------------------------------------------------------------


def test_l1_agreement_mean_over_all_elements():
    a = rand(13, (4, 16))
    b = rand(14, (4, 16))
    got = float(L.l1_agreement(f32(a), f32(b)))
    want = np.abs(a - b).sum() / a.size
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # Neither the per-row L1 norm averaged over rows nor the total sum.
    assert not np.isclose(got, np.abs(a - b).sum(axis=1).mean())
    assert not np.isclose(got, np.abs(a - b).sum())
    assert float(L.l1_agreement(f32(a), f32(a))) == 0.0


# ------------------------------------------------------------------------------------------------
# select_confident / confident_indices (TPT sections 2.3, 6)
# ------------------------------------------------------------------------------------------------


def np_entropy(z):
    lp = np_log_softmax(z)
    return -(np.exp(lp) * lp).sum(-1)


@pytest.mark.parametrize(
    "views,keep,k",
    [
        (64, 0.1, 6),  # TPT default: int(6.4)
        (64, 0.15, 9),  # 9.6: floor, not round (10)
        (10, 0.37, 3),  # 3.7: floor, not round (4) or ceil
        (10, 0.25, 2),  # 2.5
        (100, 0.29, 28),  # 100 * 0.29 == 28.999999999999996 in floats, int() gives 28
        (8, 1.0, 8),
    ],
)
def test_select_confident_k_rounding(views, keep, k):
    z = rand(15 + views, (views, 5), 3.0)
    out = L.select_confident(f32(z), keep)
    assert out.shape == (k, 5)
    idx = np.argsort(np_entropy(np.float32(z)), kind="stable")[:k]
    np.testing.assert_array_equal(L.confident_indices(f32(z), keep), idx)
    np.testing.assert_allclose(out, np.float32(z)[idx])


def test_select_confident_picks_lowest_entropy_in_order():
    z = rand(20, (64, 10), 5.0)
    z[3] *= 40.0  # very confident views
    z[41] *= 20.0
    ent = np_entropy(np.float32(z))
    want = np.argsort(ent)[:6]
    got = np.asarray(L.confident_indices(f32(z), 0.1))
    np.testing.assert_array_equal(got, want)
    assert got[0] == 3 and got[1] == 41
    assert np.all(np.diff(ent[got]) >= 0)
    # Every unselected view is at least as uncertain as every selected one.
    assert ent[got].max() <= np.delete(ent, got).min()


def test_select_confident_ties_keep_lower_index():
    z = np.zeros((10, 4))
    z[[2, 5, 7, 8], 0] = 9.0  # four identical confident views; k = int(10 * 0.3) = 3
    got = np.asarray(L.confident_indices(f32(z), 0.3))
    np.testing.assert_array_equal(got, [2, 5, 7])


def test_select_confident_view0_not_forced_and_single_class():
    z = rand(21, (16, 3), 4.0)
    z[0] = 0.0  # view 0 maximally uncertain: must not be selected
    assert 0 not in np.asarray(L.confident_indices(f32(z), 0.25))
    one = L.select_confident(np.ones((16, 1)), 0.25)
    assert one.shape == (4, 1)


def test_select_confident_bad_keep_raises():
    with pytest.raises(ValueError):
        L.select_confident(np.zeros((8, 3)), 0.1)  # int(0.8) = 0
    with pytest.raises(ValueError):
        L.select_confident(np.zeros((8, 3)), 1.5)


def test_select_confident_jit_static_keep_and_gradient():
    z = f32(rand(22, (32, 6), 3.0))
    fn = jax.jit(L.select_confident, static_argnames="keep")
    np.testing.assert_array_equal(fn(z, keep=0.1), L.select_confident(z, 0.1))
    g = jgrad(lambda x: L.select_confident(x, 0.1).sum())(z)
    rows = np.asarray(L.confident_indices(z, 0.1))
    assert np.all(np.asarray(g)[rows] == 1.0)
    assert np.asarray(g).sum() == rows.size * 6


# ------------------------------------------------------------------------------------------------
# marginal_entropy (TPT section 2.4)
# ------------------------------------------------------------------------------------------------


def np_marginal_entropy(z):
    # Entropy of the arithmetic mean of the per-view probabilities, in float64.
    p_bar = np_softmax(z).mean(axis=0)
    nz = p_bar > 0
    return -(p_bar[nz] * np.log(p_bar[nz])).sum()


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_marginal_entropy_matches_numpy(scale):
    z = rand(23, (6, 9), scale)
    got = L.marginal_entropy(f32(z))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_marginal_entropy(np.float32(z)), rtol=1e-5, atol=1e-6)


def test_marginal_entropy_averages_probabilities_not_logits_or_logprobs():
    z = np.array([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 1.0]])
    got = float(L.marginal_entropy(f32(z)))
    np.testing.assert_allclose(got, np_marginal_entropy(z), rtol=1e-6)
    mean_logits = np_entropy(z.mean(axis=0))
    mean_logprobs = np_entropy(np_log_softmax(z).mean(axis=0))
    mean_of_entropies = np_entropy(z).mean()
    for wrong in (mean_logits, mean_logprobs, mean_of_entropies):
        assert abs(got - wrong) > 1e-2


def test_marginal_entropy_large_logits_one_class_and_bounds():
    # Views saturated on different classes: mean prob exactly (0.5, 0.5, 0, 0) in float32.
    z = np.zeros((2, 4))
    z[0, 0] = z[1, 1] = 1e4
    got = L.marginal_entropy(f32(z))
    np.testing.assert_allclose(got, math.log(2), rtol=1e-6)
    g = jgrad(losses.marginal_entropy)(f32(z))
    assert np.all(np.isfinite(np.asarray(g)))
    # Extreme but finite logits.
    z2 = rand(24, (6, 5), 1e5)
    got2 = L.marginal_entropy(f32(z2))
    np.testing.assert_allclose(got2, np_marginal_entropy(np.float32(z2)), atol=1e-5)
    assert np.all(np.isfinite(np.asarray(jgrad(losses.marginal_entropy)(f32(z2)))))
    # One class: entropy 0. Identical uniform views: log C.
    assert float(L.marginal_entropy(np.ones((3, 1)))) == 0.0
    np.testing.assert_allclose(L.marginal_entropy(np.zeros((3, 7))), math.log(7), rtol=1e-6)


def test_marginal_entropy_masked_class_no_nan():
    # A class with -inf logits in every view has mean probability exactly 0 and log -inf; the
    # reference's clamp turns 0 * -inf into 0 instead of NaN (and gives a zero gradient).
    z = rand(26, (4, 5), 3.0)
    z[:, 2] = -np.inf
    got = L.marginal_entropy(f32(z))
    np.testing.assert_allclose(got, np_marginal_entropy(np.delete(z, 2, axis=1)), rtol=1e-5)
    g = np.asarray(jgrad(losses.marginal_entropy)(f32(z)))
    assert np.all(np.isfinite(g)) and np.all(g[:, 2] == 0.0)


def test_marginal_entropy_gradient_matches_finite_difference():
    z = rand(25, (4, 5), 2.0)
    g = np.asarray(jgrad(losses.marginal_entropy)(f32(z)), np.float64)
    eps = 1e-5
    fd = np.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            zp, zm = z.copy(), z.copy()
            zp[i, j] += eps
            zm[i, j] -= eps
            fd[i, j] = (np_marginal_entropy(zp) - np_marginal_entropy(zm)) / (2 * eps)
    np.testing.assert_allclose(g, fd, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# POUF transport and information maximisation (pouf.md sections 1.4-1.6, 2.2, 4, 5)
# ------------------------------------------------------------------------------------------------


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_ct(sim, scale):
    a = scale * sim
    cost = 1.0 - sim
    fwd = np_softmax(a, axis=1)
    bwd = np_softmax(a, axis=0)
    m, k = sim.shape
    return (cost * fwd).sum() / m + (cost * bwd).sum() / k


def test_transport_loss_matches_numpy_features_vs_prototypes():
    feats = rand(26, (12, 16))  # unnormalised: the loss normalises them
    protos = rand(27, (5, 16)) * 3.0
    sim = np_normalize(feats) @ np_normalize(protos).T
    for scale in (10.0, 100.0):
        got = L.transport_loss(f32(feats), f32(protos), scale=scale)
        np.testing.assert_allclose(got, np_ct(sim, scale), rtol=1e-5)
        got_cos = L.transport_loss_from_cosine(f32(sim), scale=scale)
        np.testing.assert_allclose(got_cos, np_ct(sim, scale), rtol=1e-5)


def test_transport_loss_spec_anchors():
    # Constant cosine s: both plans are uniform, loss = 2 (1 - s).
    for s in (-0.3, 0.0, 0.7):
        got = L.transport_loss_from_cosine(np.full((6, 4), s, np.float32), scale=100.0)
        np.testing.assert_allclose(got, 2 * (1 - s), rtol=1e-6)
    # Symmetry under transpose with the same scale.
    sim = np.tanh(rand(28, (7, 3)))
    a = L.transport_loss_from_cosine(f32(sim), scale=10.0)
    b = L.transport_loss_from_cosine(f32(sim.T), scale=10.0)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_transport_loss_direction_weights_and_marginals():
    sim = np.tanh(rand(29, (8, 5)))
    got = float(L.transport_loss_from_cosine(f32(sim), scale=10.0))
    a = 10.0 * sim
    cost = 1 - sim
    fwd_term = (cost * np_softmax(a, 1)).sum(1).mean()
    bwd_term = (cost * np_softmax(a, 0)).sum(0).mean()
    np.testing.assert_allclose(got, fwd_term + bwd_term, rtol=1e-5)
    assert not np.isclose(got, 0.5 * (fwd_term + bwd_term))  # no 0.5/0.5 split
    assert not np.isclose(got, fwd_term)  # backward (over-batch) plan present
    # The backward plan normalises over the batch (axis 0), not over classes again.
    assert not np.isclose(got, 2 * fwd_term)


def test_transport_loss_scale_only_in_plans_and_gradients():
    sim = np.tanh(rand(30, (6, 4)))
    # Scale 0: uniform plans, loss = mean cost over rows + mean cost over columns (cost unscaled).
    got0 = L.transport_loss_from_cosine(f32(sim), scale=0.0)
    np.testing.assert_allclose(got0, (1 - sim).mean() * 2, rtol=1e-6)
    feats = f32(rand(31, (6, 8)))
    protos = f32(rand(32, (4, 8)))
    log_scale = jnp.float32(math.log(100.0))
    loss_fn = lambda f, w, ls: L.transport_loss(f, w, scale=jnp.exp(ls))
    g_f, g_w, g_ls = jgrad(loss_fn, argnums=(0, 1, 2))(feats, protos, log_scale)
    assert np.abs(np.asarray(g_w)).sum() > 0  # prototypes (text side) receive gradients
    assert np.abs(np.asarray(g_f)).sum() > 0  # nothing is detached
    assert float(g_ls) != 0.0  # the learnable logit scale receives a gradient
    # Matches a finite difference in the log scale.
    eps = 1e-3
    sim_np = (
        np_normalize(np.asarray(feats, np.float64)) @ np_normalize(np.asarray(protos, np.float64)).T
    )
    fd = np_ct(sim_np, math.exp(math.log(100) + eps)) - np_ct(sim_np, math.exp(math.log(100) - eps))
    np.testing.assert_allclose(float(g_ls), fd / (2 * eps), rtol=1e-2, atol=1e-5)


def np_im(z, ce=1e-5, me=1e-6):
    p = np_softmax(z)
    h_cond = (-(p * np.log(p + ce)).sum(1)).mean()
    p_bar = p.mean(0)
    h_marg = -(p_bar * np.log(p_bar + me)).sum()
    return h_cond - h_marg


def test_mutual_information_loss_matches_numpy():
    z = rand(33, (10, 6), 5.0)
    got = L.mutual_information_loss(f32(z))
    np.testing.assert_allclose(got, np_im(np.float32(z)), rtol=1e-5, atol=1e-6)


def test_mutual_information_loss_spec_anchors():
    # Uniform logits: H_cond = H_marg = log K up to the epsilons.
    np.testing.assert_allclose(L.mutual_information_loss(np.zeros((4, 5))), 0.0, atol=1e-4)
    # Balanced confident predictions, B = K: about -log K.
    k = 5
    z = 1e3 * np.eye(k)
    np.testing.assert_allclose(L.mutual_information_loss(f32(z)), -math.log(k), atol=1e-4)
    np.testing.assert_allclose(L.mutual_information_loss(f32(z)), np_im(z), atol=1e-6)
    # All samples confidently on one class: the marginal entropy is 0 too.
    z1 = np.zeros((4, 3))
    z1[:, 0] = 1e3
    np.testing.assert_allclose(L.mutual_information_loss(f32(z1)), np_im(z1), atol=1e-6)


def test_mutual_information_loss_uses_the_two_epsilons():
    # Probabilities near 1e-5 make the epsilons visible: the reference's (1e-5, 1e-6) pair must
    # match, and swapping them (or using one epsilon for both) must not.
    p = np.array([[0.5, 0.5 - 2e-5, 2e-5], [0.6, 0.4 - 1e-5, 1e-5]])
    z = np.log(p)
    got = float(L.mutual_information_loss(f32(z)))
    want = np_im(z)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-7)
    for wrong in (np_im(z, 1e-6, 1e-5), np_im(z, 1e-5, 1e-5), np_im(z, 1e-6, 1e-6)):
        assert abs(want - wrong) > 5e-6
    # Custom epsilons are honoured.
    np.testing.assert_allclose(
        L.mutual_information_loss(f32(z), cond_eps=1e-6, marginal_eps=1e-5),
        np_im(z, 1e-6, 1e-5),
        atol=5e-7,
    )


# ------------------------------------------------------------------------------------------------
# Bayesian prompt learning (bayesian.md sections 1-2, 6)
# ------------------------------------------------------------------------------------------------


def np_gaussian_kl_per_dim(mu, lv):
    # KL(N(mu, s2) || N(0, 1)) = log(1/s) + (s2 + mu^2) / 2 - 1/2, written with s2 = exp(lv).
    s2 = np.exp(lv)
    return -0.5 * lv + 0.5 * (s2 + mu**2) - 0.5


def test_gaussian_kl_mean_over_dims():
    mu = rand(34, (1, 512), 0.3)
    lv = np.asarray(jax.random.uniform(jax.random.key(35), (1, 512)), np.float64)  # U[0, 1) init
    got = float(L.gaussian_kl(f32(mu), f32(lv)))
    per_dim = np_gaussian_kl_per_dim(mu, lv)
    np.testing.assert_allclose(got, per_dim.mean(), rtol=1e-5)
    assert not np.isclose(got, per_dim.sum(), rtol=1e-2)  # a summed KL must fail
    # Rank-1 input gives the same value.
    np.testing.assert_allclose(L.gaussian_kl(f32(mu[0]), f32(lv[0])), got, rtol=1e-6)


def test_gaussian_kl_conditional_batch_and_zero():
    mu = rand(36, (3, 8))
    lv = rand(37, (3, 8))
    np.testing.assert_allclose(
        L.gaussian_kl(f32(mu), f32(lv)), np_gaussian_kl_per_dim(mu, lv).mean(), rtol=1e-5
    )
    assert float(L.gaussian_kl(np.zeros(16), np.zeros(16))) == 0.0
    # Gradient: d/dmu = mu / D, d/dlv = 0.5 (exp(lv) - 1) / D.
    gm, gl = jgrad(losses.gaussian_kl, argnums=(0, 1))(f32(mu), f32(lv))
    np.testing.assert_allclose(gm, mu / mu.size, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gl, 0.5 * (np.exp(lv) - 1) / lv.size, rtol=1e-5, atol=1e-8)


def test_log_mean_exp():
    x = rand(38, (5, 4, 3), 3.0)
    for axis in (0, 1, -1, (0, 2)):
        got = L.log_mean_exp(f32(x), axis=axis)
        want = np.log(np.exp(np.float32(x).astype(np.float64)).mean(axis=axis))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    big = np.array([1000.0, 1001.0, -1000.0])
    want = 1000.0 + np.log((1 + np.e + np.exp(-2000.0)) / 3)
    np.testing.assert_allclose(L.log_mean_exp(f32(big), axis=0), want, rtol=1e-6)
    np.testing.assert_allclose(L.log_mean_exp(f32([-1e4, -1e4]), axis=0), -1e4, rtol=1e-7)


def np_mc_log_likelihood(logits, labels):
    # log( (1/L) sum_l softmax(s_l,b)[y_b] ), via a float64 log-sum-exp over samples.
    lp = np_log_softmax(logits)  # [L, B, C]
    ll = lp[:, np.arange(len(labels)), labels]  # [L, B]
    return np_logsumexp(ll, axis=0) - np.log(ll.shape[0])


def test_mc_log_likelihood_and_nll():
    s = rand(39, (10, 4, 6), 30.0)  # L = 10 samples, B = 4, C = 6, CLIP-like scale
    y = np.array([5, 0, 2, 2])
    got = L.mc_log_likelihood(f32(s), jnp.asarray(y))
    assert got.shape == (4,)
    want = np_mc_log_likelihood(np.float32(s), y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.mc_nll(f32(s), jnp.asarray(y)), -want.mean(), rtol=1e-5)
    # Not the textbook MC-ELBO (mean of log-likelihoods), nor CE of averaged logits.
    lp = np_log_softmax(np.float32(s))
    mean_ll = lp[:, np.arange(4), y].mean(0)
    avg_logit_ll = np_log_softmax(np.float32(s).mean(0))[np.arange(4), y]
    assert np.all(np.asarray(got) >= mean_ll - 1e-5)  # Jensen: log-mean-exp >= mean
    assert not np.allclose(got, mean_ll, atol=1e-2)
    assert not np.allclose(got, avg_logit_ll, atol=1e-2)


def test_mc_log_likelihood_single_sample_is_minus_ce():
    s = rand(40, (1, 5, 3), 4.0)
    y = np.array([0, 1, 2, 1, 0])
    got = L.mc_log_likelihood(f32(s), jnp.asarray(y))
    np.testing.assert_allclose(got, np_log_softmax(s[0])[np.arange(5), y], rtol=1e-5)
    np.testing.assert_allclose(L.mc_nll(f32(s), jnp.asarray(y)), np_ce(s[0], y), rtol=1e-5)


def test_mc_log_predictive():
    s = rand(41, (7, 3, 5), 20.0)
    got = L.mc_log_predictive(f32(s))
    assert got.shape == (3, 5)
    want = np.log(np_softmax(np.float32(s)).mean(axis=0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np_logsumexp(np.asarray(got, np.float64), axis=-1), 0.0, atol=1e-5)
    # Averaging probabilities can pick a different class than averaging logits.
    s2 = np.array([[[10.0, 0.0, 9.0]], [[-10.0, 0.0, 9.0]]])  # L = 2, B = 1, C = 3
    assert int(np.argmax(L.mc_log_predictive(f32(s2))[0])) == 2
    np.testing.assert_allclose(
        L.mc_log_predictive(f32(s2))[0], np.log(np_softmax(s2).mean(0))[0], rtol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# Eager execution agrees with jit.
# ------------------------------------------------------------------------------------------------


def test_losses_eager_equal_jit():
    # Everything else runs jitted; eager dispatch compiles op by op, so check a representative
    # subset that covers every primitive used (log_softmax, gathers, sorts, logsumexp, norms).
    z = f32(rand(42, (8, 5), 5.0))
    z2 = f32(rand(43, (8, 5), 5.0))
    y = jnp.array([0, 1, 2, 3, 4, 0, 1, 2])
    s = f32(rand(44, (3, 8, 5), 5.0))
    cases = [
        (losses.kl_agreement, L.kl_agreement, (z, z2)),
        (losses.marginal_entropy, L.marginal_entropy, (z,)),
        (lambda a: losses.select_confident(a, 0.5), lambda a: L.select_confident(a, 0.5), (z,)),
        (
            lambda a, b: losses.transport_loss(a, b, scale=100.0),
            lambda a, b: L.transport_loss(a, b, scale=100.0),
            (z, z2),
        ),
        (losses.mc_nll, L.mc_nll, (s, y)),
    ]
    for eager, jitted, args in cases:
        np.testing.assert_allclose(eager(*args), jitted(*args), rtol=1e-5, atol=1e-6)
