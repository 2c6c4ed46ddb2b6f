"""Command-line flags of the runners: protocol configs by name, overrides, one-line errors.

``--config`` takes a protocol config in either form:

* ``base2new:promptsrc,dataset=dtd`` — a protocol by name: the config file installed with the
  package (``jaxprompt/configs``, the repository's top-level ``configs/``), so it works from any
  directory after ``pip install``;
* ``configs/base2new.py:promptsrc,dataset=dtd`` — any config file by path (your own too).

``--config.<key>=<value>`` overrides a key (a misspelt key is an error) and ``--workdir`` names
the run directory. Parsing goes through ``ml_collections.config_flags`` and imports no jax, so
``--help`` and bad flags answer at once.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import resources
from typing import Any

PROTOCOLS = {
    "base2new": "train on the base half of the classes, test base and new (harmonic mean)",
    "fewshot": "K shots of every class, test on all classes",
    "xdomain": "train once on a source dataset, test on other datasets and shifted domains",
    "adapt": "label-free adaptation on the test data: TPT (per image) and POUF",
}


class FlagError(ValueError):
    """A command-line argument that cannot work; the message names the fix."""


def config_dir() -> str:
    """The installed protocol configs (``jaxprompt/configs``; the repository's ``configs/``)."""
    return os.fspath(resources.files("jaxprompt.configs"))


def resolve_config_arg(value: str) -> str:
    """``base2new:promptsrc,...`` -> ``/installed/configs/base2new.py:promptsrc,...``.

    A value naming a file (``configs/base2new.py:...``, any path ending in ``.py``) is
    returned unchanged.
    """
    path, sep, rest = value.partition(":")
    if path.endswith(".py") or os.sep in path or "/" in path:
        return value
    if path not in PROTOCOLS:
        raise FlagError(
            f"unknown protocol {path!r} in --config; choose one of {', '.join(PROTOCOLS)} "
            "(e.g. --config base2new:promptsrc) or give a config file path"
        )
    return os.path.join(config_dir(), f"{path}.py") + sep + rest


def presets(protocol: str) -> list[str]:
    """The presets a protocol config accepts after ``:`` (e.g. ``promptsrc``)."""
    sys.path.insert(0, config_dir())
    try:
        import common

        if protocol == "adapt":
            import adapt

            return [*adapt.PRESETS, *adapt.POUF_PRESETS]
        return list(common.METHOD_PRESETS)
    finally:
        sys.path.remove(config_dir())


def parse_run_flags(argv: list[str], *, need_config: bool) -> tuple[Any, str]:
    """Parses ``--config`` (either form), ``--config.<key>=<value>`` and ``--workdir``.

    Args:
      argv: the program name, then the flags.
      need_config: whether ``--config`` is required.

    Returns:
      ``(config or None, workdir)``.

    Raises:
      FlagError, or absl/ml_collections errors for a bad key or config file (see
      :func:`one_line`).
    """
    from absl import flags
    from ml_collections import config_flags

    argv = [argv[0]] + _resolve_config_values(argv[1:])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "protocol config: PROTOCOL:PRESET[,key=value] or a file path",
        flag_values=fv,
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "run directory (local path or gs://)", flag_values=fv)
    # ml_collections finds the `--config.<key>` overrides by scanning sys.argv, so parse with
    # sys.argv set to what we parse (the CLI may be called in-process with other arguments).
    saved, sys.argv = sys.argv, list(argv)
    try:
        rest = fv(argv)
    finally:
        sys.argv = saved
    if len(rest) > 1:
        raise FlagError(f"unexpected arguments {rest[1:]}")
    if not fv.workdir:
        raise FlagError("--workdir is required")
    if need_config and fv.config is None:
        raise FlagError("--config is required, e.g. --config base2new:coop")
    return fv.config, fv.workdir


def _resolve_config_values(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            out += [a, resolve_config_arg(args[i + 1])]
            i += 2
            continue
        if a.startswith("--config="):
            a = "--config=" + resolve_config_arg(a[len("--config=") :])
        out.append(a)
        i += 1
    return out


def one_line(e: BaseException) -> str:
    """The actionable line of an exception (config errors arrive wrapped in tracebacks)."""
    text = str(e.args[0]) if isinstance(e, KeyError | AttributeError) and e.args else str(e)
    text = text.replace("\\n", "\n").replace("\\'", "'").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        # A KeyError's repr quotes the whole message; a quote that only ends it (`'abc'`) stays.
        text = text[1:-1]
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


def fail(msg: str) -> int:
    """Prints the one-line error and returns exit code 2."""
    print(f"jaxprompt: error: {msg}", file=sys.stderr)
    return 2


def interrupted(note: str = "") -> int:
    """Ctrl-C: one line saying what was kept, exit code 130 (128 + SIGINT), no traceback."""
    print(f"jaxprompt: interrupted{': ' + note if note else ''}", file=sys.stderr)
    return 130
