"""jaxprompt.gpa: PromptSRC's Gaussian prompt aggregation (promptsrc.md section 5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import gpa

# Normalised weights copied from the spec's table (promptsrc.md section 5), 4 decimals.
# {(mean, std, num_epochs): {epoch (1-indexed): weight}}
SPEC_TABLE = {
    (15.0, 1.0, 20): {  # base-to-novel
        12: 0.0044,
        13: 0.0540,
        14: 0.2420,
        15: 0.3989,
        16: 0.2420,
        17: 0.0540,
        18: 0.0044,
    },
    (6.0, 10.0, 20): {1: 0.0554, 6: 0.0628, 10: 0.0580, 15: 0.0419, 20: 0.0236},  # cross-dataset
    (30.0, 30.0, 50): {1: 0.0141, 28: 0.0225, 30: 0.0225, 32: 0.0225, 50: 0.0180},  # few-shot a
    (45.0, 5.0, 50): {45: 0.0923, 40: 0.0560, 50: 0.0560, 35: 0.0125, 30: 0.0010},  # few-shot b
}


def np_weights(mean, std, n):
    """The spec's formula: Gaussian pdf at epochs 1..N, divided by its sum."""
    e = np.arange(1, n + 1, dtype=np.float64)
    pdf = np.exp(-((e - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi))
    return pdf / pdf.sum()


@pytest.mark.parametrize("config", list(SPEC_TABLE))
def test_weights_match_spec_table(config):
    mean, std, n = config
    w = gpa.gaussian_weights(mean=mean, std=std, num_epochs=n)
    assert isinstance(w, np.ndarray) and w.shape == (n,)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
    for epoch, value in SPEC_TABLE[config].items():
        assert abs(w[epoch - 1] - value) <= 5e-5 + 1e-9, (epoch, w[epoch - 1], value)
    np.testing.assert_allclose(w, np_weights(mean, std, n), rtol=1e-10, atol=1e-300)


def test_weights_are_one_indexed_and_peak_at_mean():
    w = gpa.gaussian_weights(mean=15.0, std=1.0, num_epochs=20)
    assert int(np.argmax(w)) + 1 == 15
    w = gpa.gaussian_weights(mean=6.0, std=10.0, num_epochs=20)
    assert int(np.argmax(w)) + 1 == 6
    # Epoch-0-based evaluation would make e12 and e18 differ; 1-indexed they are symmetric.
    w = gpa.gaussian_weights(mean=15.0, std=1.0, num_epochs=20)
    np.testing.assert_allclose(w[11], w[17], rtol=1e-12)
    # Epochs 1..N all present, none for epoch 0.
    w = gpa.gaussian_weights(mean=1.0, std=1.0, num_epochs=3)
    np.testing.assert_allclose(w, np_weights(1.0, 1.0, 3), rtol=1e-12)
    assert w[0] > w[1] > w[2]


def test_weights_std_is_standard_deviation_not_variance():
    w = gpa.gaussian_weights(mean=10.0, std=2.0, num_epochs=20)
    np.testing.assert_allclose(w, np_weights(10.0, 2.0, 20), rtol=1e-10)
    assert not np.allclose(w, np_weights(10.0, math.sqrt(2.0), 20), rtol=1e-3)


def test_weights_far_mean_no_underflow_and_bad_args():
    w = gpa.gaussian_weights(mean=500.0, std=1.0, num_epochs=10)  # every raw pdf underflows
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(), 1.0)
    assert w[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        gpa.gaussian_weights(mean=1.0, std=0.0, num_epochs=5)
    with pytest.raises(ValueError):
        gpa.gaussian_weights(mean=1.0, std=1.0, num_epochs=0)


def _snapshots(n, key=0):
    """A small prompt pytree per epoch (different values each epoch)."""
    rng = np.random.default_rng(key)
    return [
        {
            "ctx": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
            "deep_text": jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("config", [(15.0, 1.0, 20), (6.0, 10.0, 20), (3.0, 2.0, 5)])
def test_aggregation_equals_numpy_weighted_sum(config):
    mean, std, n = config
    snaps = _snapshots(n)
    agg = gpa.gaussian_aggregation(mean=mean, std=std, num_epochs=n)
    update = jax.jit(agg.update)
    state = agg.init(snaps[0])
    for epoch, prompt in enumerate(snaps, start=1):
        state = update(state, prompt, epoch)
    out = agg.result(state)
    w = np_weights(mean, std, n)
    for name in ("ctx", "deep_text"):
        want = sum(w[e] * np.asarray(snaps[e][name], np.float64) for e in range(n))
        assert out[name].dtype == jnp.float32
        assert out[name].shape == snaps[0][name].shape
        np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6)


def test_aggregation_of_constant_prompt_is_identity():
    prompt = {"ctx": jnp.arange(12.0).reshape(3, 4)}
    agg = gpa.gaussian_aggregation(mean=15.0, std=1.0, num_epochs=20)
    state = agg.init(prompt)
    for epoch in range(1, 21):
        state = agg.update(state, prompt, epoch)
    np.testing.assert_allclose(agg.result(state)["ctx"], prompt["ctx"], rtol=1e-6, atol=1e-6)


def test_update_uses_one_indexed_epoch_weight():
    prompt = {"ctx": jnp.ones((2, 3))}
    agg = gpa.gaussian_aggregation(mean=15.0, std=1.0, num_epochs=20)
    state = agg.update(agg.init(prompt), prompt, 15)
    # Spec: epoch 15 has weight .3989 (an off-by-one would give .2420).
    np.testing.assert_allclose(agg.result(state)["ctx"], 0.3989, atol=5e-5)
    state = agg.update(agg.init(prompt), prompt, jnp.int32(14))
    np.testing.assert_allclose(agg.result(state)["ctx"], 0.2420, atol=5e-5)


def test_update_is_pure_traced_epoch_and_scan():
    n = 6
    snaps = _snapshots(n, key=3)
    agg = gpa.gaussian_aggregation(mean=3.0, std=2.0, num_epochs=n)
    state0 = agg.init(snaps[0])
    zeros = jax.tree.map(np.asarray, state0)
    _ = agg.update(state0, snaps[0], 1)
    jax.tree.map(np.testing.assert_array_equal, state0, zeros)  # input state untouched
    np.testing.assert_array_equal(agg.result(state0)["ctx"], np.zeros((4, 8)))

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *snaps)

    def body(state, inputs):
        epoch, prompt = inputs
        return agg.update(state, prompt, epoch), None

    state, _ = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(
        state0, (jnp.arange(1, n + 1), stacked)
    )
    w = np_weights(3.0, 2.0, n)
    want = sum(w[e] * np.asarray(snaps[e]["ctx"], np.float64) for e in range(n))
    np.testing.assert_allclose(agg.result(state)["ctx"], want, rtol=1e-5, atol=1e-6)


def test_out_of_range_epoch():
    prompt = {"ctx": jnp.ones(3)}
    agg = gpa.gaussian_aggregation(mean=2.0, std=1.0, num_epochs=4)
    state = agg.init(prompt)
    for bad in (0, 5):
        with pytest.raises(ValueError):
            agg.update(state, prompt, bad)
    # Traced out-of-range epochs contribute nothing instead of reusing a clamped weight.
    upd = jax.jit(agg.update)
    for bad in (0, 5, -1):
        out = agg.result(upd(state, prompt, jnp.int32(bad)))
        np.testing.assert_array_equal(out["ctx"], np.zeros(3))


def test_low_precision_prompt_accumulates_in_float32():
    prompt = {"ctx": jnp.full((2, 2), 1.0 + 2.0**-7, jnp.bfloat16)}
    agg = gpa.gaussian_aggregation(mean=2.0, std=1.0, num_epochs=3)
    state = agg.init(prompt)
    assert state.total["ctx"].dtype == jnp.float32
    for epoch in (1, 2, 3):
        state = agg.update(state, prompt, epoch)
    out = agg.result(state)["ctx"]
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 1.0 + 2.0**-7, rtol=1e-6)
