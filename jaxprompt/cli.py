"""The ``jaxprompt`` command.

    jaxprompt train   --config configs/<protocol>.py:<method>,dataset=... --workdir DIR
                      [--config.<key>=<value> ...]
    jaxprompt eval    --workdir DIR [--config ...]     (no config needed: it is in the run)
    jaxprompt adapt   --config configs/adapt.py:<method>,dataset=... --workdir DIR
    jaxprompt sweep   --config configs/<protocol>.py:<method> --root DIR
                      [--datasets a,b] [--shots 1,16] [--seeds 1,2,3] [--dry-run]
    jaxprompt prepare --dataset NAME [--data_dir DIR] [--manual_dir DIR]
    jaxprompt pretrain-toy [--out DIR] [--steps N]

Every bad input (unknown method, dataset or config key, missing weights, a checkpoint that does
not fit the method) ends with a one-line error naming the fix and exit code 2; nothing in the
run directory is deleted or overwritten.
"""

from __future__ import annotations

import logging
import os
import re
import sys

USAGE = __doc__

COMMANDS = ("train", "eval", "adapt", "sweep", "prepare", "pretrain-toy")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "etils", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str) -> int:
    print(f"jaxprompt: error: {msg}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
    """The actionable line of an exception (config errors arrive wrapped in tracebacks)."""
    text = str(e.args[0]) if isinstance(e, KeyError | AttributeError) and e.args else str(e)
    text = text.replace("\\n", "\n").replace("\\'", "'").strip("'\"")
    hint = re.search(r"^'?(\w+)'?\s*\n?Did you mean \"(\w+)\"", text)
    if hint:
        return f"unknown config key {hint.group(1)!r} (did you mean {hint.group(2)!r}?)"
    if isinstance(e, KeyError | AttributeError) and re.fullmatch(r"\w+", text):
        return f"unknown config key {text!r}: check the spelling against the config file"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if any(ln.startswith("Traceback") for ln in lines):
        # The exception raised inside the config file, without its type.
        return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    m = re.match(r"Unknown command line flag '(config\.)?(.+)'", lines[0])
    if m:
        what = "config key" if m.group(1) else "flag"
        return f"unknown {what} {m.group(2)!r}: check the spelling against the config file"
    return " ".join(lines) if len(lines) <= 2 else lines[0]


def _config_flags(argv: list[str], *, need_config: bool):
    """Parses --config / --config.key=value / --workdir with ml_collections' config flags."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "protocol config: configs/<protocol>.py:<args>",
        flag_values=fv,
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "run directory (local path or gs://)", flag_values=fv)
    # ml_collections finds the `--config.<key>` overrides by scanning sys.argv, so parse with
    # sys.argv set to what we parse (main() may be called in-process with other arguments).
    saved, sys.argv = sys.argv, list(argv)
    try:
        rest = fv(argv)
    finally:
        sys.argv = saved
    if len(rest) > 1:
        raise ValueError(f"unexpected arguments {rest[1:]}")
    if not fv.workdir:
        raise ValueError("--workdir is required")
    if need_config and fv.config is None:
        raise ValueError("--config is required, e.g. --config configs/base2new.py:coop")
    return fv.config, fv.workdir


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if len(argv) >= 2 else 2
    cmd, rest = argv[1], [argv[0]] + argv[2:]
    if cmd not in COMMANDS:
        return _fail(f"unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _setup_logging()
    if cmd == "prepare":
        from jaxprompt.data import prepare_main

        return int(prepare_main(argv[2:]) or 0)
    if cmd == "pretrain-toy":
        return _pretrain_toy(argv[2:])

    import jax
    from absl import flags

    from jaxprompt import checkpoint, clip, experiment

    if os.environ.get("JAXPROMPT_MULTIHOST") == "1":
        jax.distributed.initialize()
    if cmd == "sweep":
        from jaxprompt import sweep

        return sweep.main(argv[2:])
    try:
        config, workdir = _config_flags(rest, need_config=cmd != "eval")
        if cmd == "train":
            experiment.run_train(config, workdir)
        elif cmd == "eval":
            experiment.run_eval(workdir, config)
        elif config.method.name in ("pouf", "pouf_mlm"):
            from jaxprompt import pouf_runner

            pouf_runner.run_pouf(config, workdir)
        else:
            from jaxprompt import adapt

            adapt.run_adapt(config, workdir)
    except (
        clip.ClipLoadError,
        _mlm_error(),
        checkpoint.CheckpointMismatchError,
        experiment.ConfigError,
        FileNotFoundError,
        flags.Error,
        ValueError,
        KeyError,
        AttributeError,
    ) as e:
        # absl / ml_collections report unknown flags, config keys and config-file errors as
        # these; the library raises one-line messages that name the fix.
        return _fail(_one_line(e))
    return 0


def _mlm_error() -> type[Exception]:
    from jaxprompt import mlm

    return mlm.MlmLoadError


def _pretrain_toy(args: list[str]) -> int:
    import argparse

    from jaxprompt import toyclip

    ap = argparse.ArgumentParser(prog="jaxprompt pretrain-toy", description=toyclip.__doc__)
    ap.add_argument("--out", default="toy_clip", help="output directory")
    for k, v in toyclip.RECIPE.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ns = ap.parse_args(args)
    rep = toyclip.pretrain(ns.out, **{k: getattr(ns, k) for k in toyclip.RECIPE})
    print({k: v for k, v in rep.items() if k != "history"})
    return 0


def run() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":
    run()
