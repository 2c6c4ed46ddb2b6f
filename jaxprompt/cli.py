"""The ``jaxprompt`` command: parses flags, picks the runner the config names, nothing else.

    jaxprompt train   --config base2new:promptsrc,dataset=NAME --workdir DIR
    jaxprompt eval    --workdir DIR [--config xdomain:promptsrc,dataset=NAME]
    jaxprompt adapt   --config adapt:tpt,dataset=NAME --workdir DIR
    jaxprompt sweep   --config base2new:coop --root DIR [--datasets a,b --shots 1,16 --seeds 1,2,3]
    jaxprompt reproduce PROTOCOL --methods coop,promptsrc --root DIR [--datasets coop11|toy]
                      [--seeds 1,2,3] [--shots 1,2,4,8,16] [--dry-run]
    jaxprompt table   ROOT                 # the paper's tables from the finished runs under ROOT
    jaxprompt prepare --dataset NAME [--data_dir DIR] [--manual_dir DIR]
    jaxprompt pretrain-toy [--out DIR]
    jaxprompt export  --workdir DIR [--out FILE]
    jaxprompt push    --workdir DIR --repo USER/NAME [--private] [--revision main]
    jaxprompt predict --prompt FILE|hf://USER/NAME --classes a,b,c|classes.txt [--clip NAME]
                      [--top_k 5] [--json] [--tpt] IMAGES_OR_FOLDER...
    jaxprompt --version

Every command answers --help.

Every bad input ends with a one-line error naming the fix and exit code 2, before anything is
written; nothing in a run directory is deleted or overwritten. jax, transformers and the data
stack are imported only once a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import os
import sys

from jaxprompt.app import console
from jaxprompt.app import flags as flags_lib

USAGE = __doc__

_RUN_FLAGS = """\
flags:
  --config PROTOCOL:PRESET[,key=value,...]
        a protocol config by name ({protocols}),
        installed with the package, or a config file: configs/{first}.py:PRESET
        keys after the preset: dataset=NAME, shots=K, seed=S, runlocal=true (a tiny smoke run)
  --config.KEY=VALUE
        override any config key, e.g. --config.optim.lr=0.001 (a misspelt key is an error)
  --workdir DIR
        {workdir}
  --verbosity N
        -1 warnings only, 0 progress (default), 1 debug and third-party info
"""

HELP = {
    "train": (
        "jaxprompt train --config PROTOCOL:PRESET[,key=value] --workdir DIR [--config.KEY=V]",
        "Trains a prompt under a protocol config, evaluates it, and writes DIR/results.json, "
        "results.md and results.png (plus config.json, metrics.jsonl, TensorBoard events and "
        "checkpoints).",
        ("base2new", "fewshot", "xdomain"),
        "jaxprompt train --config base2new:promptsrc,dataset=toy_textures --workdir runs/demo",
    ),
    "eval": (
        "jaxprompt eval --workdir DIR [--config PROTOCOL:PRESET,dataset=NAME]",
        "Evaluates the prompt saved in a run directory (its config is in the run). With "
        "--config, evaluates on that config's evaluations instead (other datasets or domains). "
        "Results are kept per evaluation in DIR/evals/ and listed in DIR/results.md.",
        ("xdomain", "base2new", "fewshot"),
        "jaxprompt eval --workdir runs/demo --config xdomain:promptsrc,dataset=toy_textures",
    ),
    "adapt": (
        "jaxprompt adapt --config adapt:PRESET[,key=value] --workdir DIR [--config.KEY=V]",
        "Label-free adaptation on the test data: TPT (one episode per test image) or POUF "
        "(unsupervised tuning on unlabeled target images, or a masked LM on text).",
        ("adapt",),
        "jaxprompt adapt --config adapt:tpt,dataset=toy_textures_sketch,runlocal=true "
        "--workdir runs/tpt",
    ),
}

COMMANDS = (
    "train",
    "eval",
    "adapt",
    "sweep",
    "reproduce",
    "table",
    "prepare",
    "pretrain-toy",
    "export",
    "push",
    "predict",
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("jaxprompt")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        from jaxprompt import __version__

        return __version__


def command_help(cmd: str) -> str:
    """The ``--help`` text of ``train``, ``eval`` or ``adapt``: flags and config presets."""
    usage, what, protocols, example = HELP[cmd]
    import textwrap

    what = textwrap.fill(what, width=92)
    workdir = (
        "the run directory to evaluate (local path or gs://); its own evaluation is redone and\n"
        "        kept in DIR/evals/, beside any other"
        if cmd == "eval"
        else "the run directory (local path or gs://); a finished run is skipped, an interrupted\n"
        "        one resumes (Ctrl-C keeps the last checkpoint), a different config is refused"
    )
    flags = _RUN_FLAGS.format(protocols=", ".join(protocols), first=protocols[0], workdir=workdir)
    lines = [f"usage: {usage}", "", what, "", flags]
    lines.append("config presets:")
    for p in protocols:
        lines.append(f"  {p + ':':10s}{' '.join(flags_lib.presets(p))}")
        lines.append(f"  {'':10s}({flags_lib.PROTOCOLS[p]})")
    lines += ["", f"example:\n  {example}"]
    return "\n".join(lines)


def _pop_verbosity(args: list[str]) -> tuple[list[str], int]:
    out, verbosity, i = [], 0, 0
    while i < len(args):
        a = args[i]
        if a == "--verbosity" and i + 1 < len(args):
            verbosity, i = int(args[i + 1]), i + 2
            continue
        if a.startswith("--verbosity="):
            verbosity = int(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    return out, verbosity


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if len(argv) >= 2 else 2
    if argv[1] == "--version":
        print(f"jaxprompt {_version()}")
        return 0
    cmd = argv[1]
    if cmd not in COMMANDS:
        return flags_lib.fail(f"unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}")
    try:
        args, verbosity = _pop_verbosity(argv[2:])
    except ValueError:
        return flags_lib.fail("--verbosity takes an integer: -1, 0 or 1")
    if cmd in HELP and any(a in ("-h", "--help", "--helpfull") for a in args):
        print(command_help(cmd))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    console.setup(verbosity)
    if cmd == "prepare":
        from jaxprompt.data import prepare_main

        return int(prepare_main(args) or 0)
    if cmd == "pretrain-toy":
        return _pretrain_toy(args)
    if cmd == "sweep":
        from jaxprompt.app import sweep

        return sweep.main(args)
    if cmd == "reproduce":
        from jaxprompt.app import reproduce

        return reproduce.main(args)
    if cmd == "table":
        from jaxprompt.app import table

        return table.main(args)
    if cmd in ("export", "push", "predict"):
        from jaxprompt.app import share

        main_fn = {"export": share.export_main, "push": share.push_main}.get(cmd)
        return (main_fn or share.predict_main)(args)
    return _run(cmd, [argv[0], *args])


def _run(cmd: str, argv: list[str]) -> int:
    """train / eval / adapt: parse, pick the runner the config names, map errors to exit 2."""
    try:
        config, workdir = flags_lib.parse_run_flags(argv, need_config=cmd != "eval")
    except Exception as e:  # noqa: BLE001 - every flag or config-file error is one line
        return flags_lib.fail(flags_lib.one_line(e))
    from jaxprompt.app import runners

    runners.maybe_initialize_distributed()
    try:
        if cmd == "eval":
            runners.evaluate(workdir, config)
        else:
            runners.run(config, workdir, command=cmd)
    except runners.USER_ERRORS as e:
        # The library and the runners raise one-line messages that name the fix.
        return flags_lib.fail(flags_lib.one_line(e))
    except KeyboardInterrupt:
        return flags_lib.interrupted(runners.resume_note(workdir))
    return 0


def _pretrain_toy(args: list[str]) -> int:
    import argparse

    from jaxprompt.side import toyclip

    ap = argparse.ArgumentParser(prog="jaxprompt pretrain-toy", description=toyclip.__doc__)
    ap.add_argument("--out", default="toy_clip", help="output directory")
    for k, v in toyclip.RECIPE.items():
        what = toyclip.RECIPE_HELP[k]
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v, help=what)
    ns = ap.parse_args(args)
    rep = toyclip.pretrain(ns.out, **{k: getattr(ns, k) for k in toyclip.RECIPE})
    print({k: v for k, v in rep.items() if k != "history"})
    return 0


def run() -> None:
    """Console-script wrapper."""
    try:
        code = main()
        sys.stdout.flush()
    except KeyboardInterrupt:  # outside a run (prepare, pretrain-toy, predict, ...)
        code = flags_lib.interrupted()
    except BrokenPipeError:
        # `jaxprompt train --help | head`: the reader left; no traceback for that.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    run()
