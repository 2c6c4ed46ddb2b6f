"""Shared fixtures: 8 simulated CPU devices and tiny random CLIPs loaded through load_clip."""

import os
import shutil
import tempfile

# Must happen before jax is imported anywhere: tests of sharded code run on 8 fake devices.
# Most of the suite's time is XLA compiling tiny programs (a test_methods subset: 83 s of its
# 118 s in backend compile, 605 programs). LLVM's optimisation of the generated CPU code is the
# bulk of that and buys nothing for programs this small, so the tests (and the `jaxprompt`
# processes they start, which inherit the variable) compile without it: the same subset took
# 125 s instead of 180 s. It changes no arithmetic: XLA's CPU code is not fast-math, so LLVM may
# not reorder float operations at any level.
# Subprocesses that must see one device, as a user's would, get FAST_COMPILE alone.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Level 0 leaves loops unvectorised, which costs where a process mostly executes rather than
# compiles: TPT through the tiny ResNet (16 views x 16 images) took 112 s of CPU at level 0 and
# 44 s with only the expensive passes off. Subprocesses of that kind get RUN_FAST instead.
RUN_FAST = "--xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# XLA's compiled programs are cached on disk for the session, and the `jaxprompt` processes the
# CLI tests start inherit the setting: much of the suite's time is compiling the same tiny-CLIP
# programs again, in another process or under another jit wrapper (a toy-world CoOp run: 40 s
# cold, 17 s with the cache warm, same results). A fresh directory per session, removed after.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxprompt-tests-xla-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Words the tiny tokenizer knows as whole tokens; anything else splits into characters.
TINY_WORDS = [
    "a photo of a",
    "X",
    "cat",
    "dog",
    "golden retriever",
    "car",
    "tree",
    "bird",
    "fish",
    "red",
    "green",
    "blue",
    "striped",
    "dotted",
    "zebra",
    "house",
    "the",
    "of",
    "itap",
]
CLASSNAMES = ["cat", "golden retriever", "dog house", "zebra", "red fish"]

# Comparing CLIP logits (100 x a cosine; |z| ~ 25-40 on the tiny random CLIP) from two float32
# computations that differ only in order (jitted against eager, batched against one by one,
# sharded against one device): each side carries rounding of about 1e-6 relative (measured up
# to 3e-5 absolute on a 2-core Xeon), so an absolute 1e-5 is only a few ulps of the logit and
# fails on some CPUs. Ten times the rounding, relative to the logit, is the tolerance.
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)
NEW_CLASSNAMES = ["tree", "bird", "blue car"]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP saved as Flax weights in Hugging Face format."""
    from jaxprompt import testing

    d = tmp_path_factory.mktemp("tiny_clip_flax")
    return testing.save_random_clip(d, words=TINY_WORDS, preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    import jaxprompt as jp

    return jp.load_clip(tiny_clip_dir)


@pytest.fixture(scope="session")
def tiny_task(tiny_clip):
    import jaxprompt as jp

    return jp.make_task(tiny_clip, CLASSNAMES)


@pytest.fixture(scope="session")
def new_task(tiny_clip):
    import jaxprompt as jp

    return jp.make_task(tiny_clip, NEW_CLASSNAMES)


@pytest.fixture(scope="session")
def images():
    """[4, 32, 32, 3] float32 random 'normalised' images."""
    return np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)


@pytest.fixture(scope="session")
def batch(images):
    return {"image": images, "label": np.array([0, 1, 2, 4], np.int32)}


@pytest.fixture
def gcs():
    """A fake Cloud Storage (tests/fakegcs.py) with buckets ``bucket`` and ``my-bucket`` (the
    README's); its ``env`` points gcsfs and tensorstore in a child process at it."""
    from fakegcs import FakeGCS

    with FakeGCS(buckets=("bucket", "my-bucket")) as server:
        yield server


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
