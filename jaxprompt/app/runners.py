"""The runners by name: a config says which one runs it (``config.runner``).

``train`` (:func:`jaxprompt.app.experiment.run_train`) for the training protocols, ``tpt``
(:func:`jaxprompt.app.tpt.run_adapt`), ``pouf`` (:func:`jaxprompt.app.pouf.run_pouf`) and
``pouf_mlm`` (:func:`jaxprompt.app.pouf.run_pouf_mlm`) for the label-free ones. The CLI
looks the runner up here; no code switches on a method's name to find it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from absl import flags as absl_flags

from jaxprompt import checkpoint, clip, hf_checkpoint
from jaxprompt.app import experiment
from jaxprompt.app import flags as flags_lib

# The command each runner belongs to (so `jaxprompt train --config adapt:tpt` says which).
COMMAND = {"train": "train", "tpt": "adapt", "pouf": "adapt", "pouf_mlm": "adapt"}


def _runner(name: str) -> Callable[[Any, str], dict[str, Any]]:
    if name == "train":
        return experiment.run_train
    if name == "tpt":
        from jaxprompt.app import tpt

        return tpt.run_adapt
    from jaxprompt.app import pouf

    return pouf.run_pouf_mlm if name == "pouf_mlm" else pouf.run_pouf


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxprompt.side import mlm

    return (
        clip.ClipLoadError,
        mlm.MlmLoadError,
        checkpoint.CheckpointMismatchError,
        checkpoint.CheckpointUnreadableError,
        hf_checkpoint.HubError,
        experiment.ConfigError,
        flags_lib.FlagError,
        absl_flags.Error,
        FileNotFoundError,
        ValueError,
        KeyError,
        AttributeError,
    )


# Errors whose message is the one line a user needs (the CLI prints it and exits with 2).
USER_ERRORS = _user_errors()


def run(config: Any, workdir: str, *, command: str) -> dict[str, Any]:
    """Runs ``config`` with the runner it names; returns the run's ``results.json`` record.

    Raises:
      experiment.ConfigError: for an unknown runner, or one that belongs to another command.
    """
    name = str(config.get("runner", "train"))
    if name not in COMMAND:
        raise experiment.ConfigError(
            f"config.runner={name!r} is not a runner; choose one of {', '.join(COMMAND)}"
        )
    if COMMAND[name] != command:
        raise experiment.ConfigError(
            f"this config runs with `jaxprompt {COMMAND[name]}`, not `jaxprompt {command}`"
        )
    with experiment.matmul_precision(experiment.to_dict(config)):
        return _runner(name)(config, workdir)


def evaluate(workdir: str, config: Any | None) -> dict[str, Any]:
    """``jaxprompt eval``: the saved prompt of a training run on its (or ``config``'s) evals."""
    return experiment.run_eval(workdir, config)


def resume_note(workdir: str) -> str:
    """What an interrupted run left in ``workdir`` to resume from, in words (Ctrl-C's line).

    The newest finished checkpoint (training, POUF), else TPT's progress file, else nothing.
    """
    import json

    from etils import epath

    try:
        step = checkpoint.latest_step(workdir)
        if step is not None:
            return f"{workdir} keeps the checkpoint of step {step}; the same command resumes there"
        from jaxprompt.app import tpt

        progress = epath.Path(workdir) / tpt.PROGRESS
        if progress.exists():
            done = json.loads(progress.read_text())["batches"]
            return f"{workdir} keeps the progress of {done} batches; the same command resumes there"
    except Exception:  # noqa: BLE001 - a half-written file: say nothing was kept, never fail
        pass
    return "no checkpoint was saved yet; the same command starts the run again"


def maybe_initialize_distributed() -> None:
    """Joins the multi-host job on a TPU pod worker (``JAXPROMPT_MULTIHOST=1``)."""
    if os.environ.get("JAXPROMPT_MULTIHOST") == "1":
        import jax

        jax.distributed.initialize()
