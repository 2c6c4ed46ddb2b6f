"""A small CoOp training run for the kill-and-resume test (run as a subprocess or imported).

``python tests/resume_worker.py CLIP_DIR WORKDIR [SLEEP]`` trains CoOp on the tiny CLIP with
checkpoints every 2 steps and writes the final prompt to ``WORKDIR/final.npz``. ``SLEEP`` slows
each batch down so that the test can kill the process midway.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NamedTuple

# Same device setup as tests/conftest.py, before jax is imported: results must be bit-identical.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

CLASSNAMES = ["cat", "golden retriever", "dog house", "zebra", "red fish"]
STEPS = 8
ITERS_PER_EPOCH = 2
CHECKPOINT_EVERY = 2


class StatefulBatches:
    """Deterministic batches (batch i from seed i) with grain-style get_state / set_state."""

    def __init__(self, sleep: float = 0.0):
        self.i = 0
        self.sleep = sleep

    def __iter__(self):
        return self

    def __next__(self):
        if self.sleep:
            time.sleep(self.sleep)
        r = np.random.RandomState(1000 + self.i)
        self.i += 1
        return {
            "image": r.randn(8, 32, 32, 3).astype(np.float32),
            "label": r.randint(0, len(CLASSNAMES), size=8).astype(np.int32),
        }

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def mean_aggregator():
    """A uniform running mean over epoch-end prompts, shaped like jaxprompt.gpa's aggregator."""

    def init(prompt):
        return {"sum": jax.tree.map(jnp.zeros_like, prompt), "n": jnp.zeros((), jnp.int32)}

    def update(state, prompt, epoch):
        del epoch
        return {"sum": jax.tree.map(jnp.add, state["sum"], prompt), "n": state["n"] + 1}

    def result(state):
        return jax.tree.map(lambda s: s / state["n"], state["sum"])

    return init, update, result


class Aggregator(NamedTuple):
    init: Any
    update: Any
    result: Any


def run(clip_dir: str, workdir: str, sleep: float = 0.0) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the final prompt as numpy."""
    jax.config.update("jax_default_matmul_precision", "highest")
    import jaxprompt as jp
    from jaxprompt import train

    clip = jp.load_clip(clip_dir)
    task = jp.make_task(clip, CLASSNAMES)
    method = jp.methods.get("coop", n_ctx=4)
    tx = train.make_optimizer(
        0.05, epochs=STEPS // ITERS_PER_EPOCH, iters_per_epoch=ITERS_PER_EPOCH, warmup_lr=0.01
    )
    state = train.fit(
        method,
        tx,
        clip,
        task,
        StatefulBatches(sleep),
        steps=STEPS,
        key=jax.random.key(42),
        workdir=workdir,
        log_every=1,
        iters_per_epoch=ITERS_PER_EPOCH,
        checkpoint_every=CHECKPOINT_EVERY,
        aggregator=Aggregator(*mean_aggregator()),
    )
    return jax.tree.map(np.asarray, jax.device_get(state.prompt))


def main(argv: list[str]) -> None:
    clip_dir, workdir = argv[1], argv[2]
    sleep = float(argv[3]) if len(argv) > 3 else 0.0
    from jaxprompt import checkpoint

    # Tells the test where this process started from (None = a fresh run).
    sys.stdout.write(f"start_step={checkpoint.latest_step(workdir)}\n")
    sys.stdout.flush()
    prompt = run(clip_dir, workdir, sleep)
    np.savez(os.path.join(workdir, "final.npz"), **prompt)


if __name__ == "__main__":
    main(sys.argv)
