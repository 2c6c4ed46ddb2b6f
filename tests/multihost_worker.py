"""One process of the multi-host training test (run as a subprocess by tests/test_multihost.py).

``python tests/multihost_worker.py CLIP_DIR WORKDIR OUT PROCESS_ID NUM_PROCESSES PORT DEVICES
[steps=N] [start_delay=S] [checkpointer_delay=S]``

Every process simulates ``DEVICES`` CPU devices. With ``NUM_PROCESSES > 1`` it joins a
``jax.distributed`` job on ``localhost:PORT`` (gloo CPU collectives), as a TPU VM worker does
through ``JAXPROMPT_MULTIHOST=1``, and feeds only ITS rows of every global batch: process ``i``
of ``k`` takes rows ``i*B/k .. (i+1)*B/k - 1``, so the union over processes is the batch one
process would see. :func:`train_and_evaluate` trains CoOp on the tiny CLIP with
:func:`jaxprompt.train.fit` (checkpoints and ``metrics.jsonl`` in the shared ``WORKDIR``) and
evaluates it with :func:`jaxprompt.evaluate.evaluate` on host-local eval batches; process 0
writes the final prompt and the accuracy to ``OUT`` (``.npz``). The test also imports
:func:`train_and_evaluate` to run the one-process reference in its own (8-device) process.

Timing is the multi-host hazard: a host that starts late, or reaches the checkpointer late, sees
the shared run directory as another host has just changed it. ``start_delay`` sleeps after
joining the job and before training; ``checkpointer_delay`` sleeps before the checkpointer is
created. Every barrier a process passes is printed (``barrier NAME``), so a failing test shows
each host's barrier sequence.
"""

from __future__ import annotations

import os
import sys
import time

CLASSNAMES = ["cat", "golden retriever", "dog house", "zebra", "red fish"]
GLOBAL_BATCH = 16
STEPS = 4
CHECKPOINT_EVERY = 2
EVAL_BATCHES = 2


def global_batch(i: int) -> dict:
    """Global training batch ``i`` (the same on every process: it is seeded by ``i``)."""
    import numpy as np

    r = np.random.RandomState(2000 + i)
    return {
        "image": r.randn(GLOBAL_BATCH, 32, 32, 3).astype(np.float32),
        "label": r.randint(0, len(CLASSNAMES), size=GLOBAL_BATCH).astype(np.int32),
    }


class HostBatches:
    """This process's rows of every global batch, with a checkpointable position."""

    def __init__(self, index: int, count: int, *, eval_mode: bool = False):
        self.i, self.index, self.count, self.eval_mode = 0, index, count, eval_mode

    def __iter__(self) -> HostBatches:
        return self

    def __next__(self) -> dict:
        if self.eval_mode and self.i >= EVAL_BATCHES:
            raise StopIteration
        b = global_batch(self.i + (100 if self.eval_mode else 0))
        self.i += 1
        rows = GLOBAL_BATCH // self.count
        return {k: v[self.index * rows : (self.index + 1) * rows] for k, v in b.items()}

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])


def train_and_evaluate(clip_dir: str, workdir: str, steps: int = STEPS) -> dict:
    """Trains CoOp with ``fit`` on this process's rows and evaluates it; returns numpy results.

    Runs in whatever jax job the caller set up (one process, or one of several after
    ``jax.distributed.initialize``); the mesh spans all devices of all processes. ``steps``
    below ``STEPS`` stops early on the same schedule (a later call with ``STEPS`` resumes).
    """
    import jax
    import numpy as np

    import jaxprompt as jp
    from jaxprompt import evaluate, sharding, train

    pid, nproc = jax.process_index(), jax.process_count()
    clip = jp.load_clip(clip_dir)
    task = jp.make_task(clip, CLASSNAMES)
    method = jp.methods.get("coop", n_ctx=4)
    tx = train.make_optimizer(0.05, epochs=STEPS, iters_per_epoch=1, warmup_lr=0.01)
    mesh = sharding.make_mesh()
    state = train.fit(
        method,
        tx,
        clip,
        task,
        HostBatches(pid, nproc),
        steps=steps,
        key=jax.random.key(7),
        mesh=mesh,
        workdir=workdir,
        log_every=1,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    acc = evaluate.evaluate(
        method,
        state.prompt,
        clip,
        task,
        HostBatches(pid, nproc, eval_mode=True),
        mesh=mesh,
        key=jax.random.key(0),
    )
    # The prompt is replicated: every process holds the whole value locally.
    ctx = np.asarray(state.prompt["ctx"].addressable_data(0))
    return {"ctx": ctx, "top1": np.float64(acc["top1"]), "n": np.int64(acc["n"])}


def _inject_delays(start_delay: float, checkpointer_delay: float) -> None:
    """Sleeps now and before the checkpointer is made; prints every barrier passed."""
    from jax.experimental import multihost_utils

    from jaxprompt import checkpoint

    sync = multihost_utils.sync_global_devices

    def logged_sync(name: str) -> None:
        sys.stdout.write(f"barrier {name}\n")
        sys.stdout.flush()
        sync(name)

    multihost_utils.sync_global_devices = logged_sync  # orbax calls it through the module
    init = checkpoint.Checkpointer.__init__

    def late_init(self, *args, **kwargs):
        time.sleep(checkpointer_delay)
        init(self, *args, **kwargs)

    checkpoint.Checkpointer.__init__ = late_init
    time.sleep(start_delay)


def main(argv: list[str]) -> None:
    clip_dir, workdir, out = argv[1], argv[2], argv[3]
    pid, nproc, port, devices = (int(a) for a in argv[4:8])
    opts = dict(a.split("=", 1) for a in argv[8:])
    # The device count is this host's; the parent's flags (conftest.FAST_COMPILE) are kept.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
        + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()

    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    if nproc > 1:
        # gloo is jax's default CPU collectives implementation; named here so the test does
        # not depend on that default.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}",
            num_processes=nproc,
            process_id=pid,
            initialization_timeout=120,
        )
    assert jax.process_count() == nproc and jax.device_count() == nproc * devices
    _inject_delays(float(opts.get("start_delay", 0)), float(opts.get("checkpointer_delay", 0)))
    res = train_and_evaluate(clip_dir, workdir, steps=int(opts.get("steps", STEPS)))
    if pid == 0:
        np.savez(out, **res, seconds=np.float64(time.perf_counter() - t0))
    sys.stdout.write(f"process {pid}/{nproc} done in {time.perf_counter() - t0:.1f}s\n")


if __name__ == "__main__":
    main(sys.argv)
