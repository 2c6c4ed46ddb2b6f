"""A paper's table in one command: every method x dataset x seed of a protocol, then the table.

    jaxprompt reproduce base2new --methods coop,promptsrc --datasets coop11 --seeds 1,2,3 \\
        --root gs://BUCKET/jp [--shots 1,2,4,8,16] [--config.optim.epochs=5 ...] [--dry-run]

Protocols: base2new, fewshot, xdomain (cross-dataset and domain generalisation from a source)
and adapt (TPT, POUF). ``--datasets`` takes names or a set: ``coop11`` (the 11 datasets of the
CoOp benchmark), ``imagenet-variants`` (ImageNet and -V2/-Sketch/-A/-R) or ``toy`` (the toy
world: the textures and colours for base2new and fewshot, the textures as the xdomain source,
the shifted styles for adapt), which runs end to end on a CPU in minutes.

The plan is printed first (how many runs, which are done); ``--dry-run`` stops there. The runs
are those of ``jaxprompt sweep`` (``ROOT/<protocol>/<method>/<dataset>/[<shots>s/]seed<n>``,
:func:`jaxprompt.app.sweep.run_dir`): a finished one is skipped, an interrupted one resumes
from its newest checkpoint, all in one program; on several hosts every host runs the same
command and process 0 writes. After the first run of each method the estimated time left is
printed. A run that fails is recorded (``failed.json`` in its directory), named in the table,
and the others go on (exit code 1 at the end).

After every run ``ROOT/<protocol>/table.md``, ``table.csv``, ``table.tex`` and ``figure.png``
are written again (:mod:`jaxprompt.app.table`; ``jaxprompt table ROOT`` rebuilds them without
training), with the published numbers beside ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from jaxprompt.app import sweep
from jaxprompt.app import table as table_lib
from jaxprompt.data import catalog

__all__ = ["DATASET_SETS", "PlannedRun", "execute", "main", "plan"]

log = logging.getLogger("jaxprompt")

COOP11 = catalog.COOP11
IMAGENET_VARIANTS = catalog.IMAGENET_VARIANTS
TOY_SHIFTS = ("toy_textures_sketch", "toy_textures_night", "toy_textures_cartoon")

# Named dataset sets of --datasets, per protocol. xdomain's datasets are the sources (the
# config names the targets); adapt runs on the targets themselves.
DATASET_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "coop11": {p: COOP11 for p in table_lib.PROTOCOLS},
    "imagenet-variants": {p: IMAGENET_VARIANTS for p in table_lib.PROTOCOLS},
    "toy": {
        "base2new": ("toy_textures", "toy_colours"),
        "fewshot": ("toy_textures", "toy_colours"),
        "xdomain": ("toy_textures",),
        "adapt": TOY_SHIFTS,
    },
}
DEFAULT_DATASETS = {
    "base2new": "coop11",
    "fewshot": "coop11",
    "xdomain": "ImageNet",
    "adapt": "imagenet-variants",
}
DEFAULT_SHOTS = {"fewshot": "1,2,4,8,16"}


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a reproduction.

    Attributes:
      method: the preset (``coop``, ``tpt_coop``, ...).
      dataset: the catalog's dataset name.
      shots: shots per class (None: the protocol has none).
      seed: the run's seed.
      config_arg: its ``--config`` value.
      workdir: its run directory.
      runner: the config's runner (``train``, ``tpt``, ``pouf``, ``pouf_mlm``).
      model: the CLIP it runs (``clip.name``).
      state: ``done`` (skipped), ``resume`` (started before: resumes) or ``todo``.
    """

    method: str
    dataset: str
    shots: int | None
    seed: int
    config_arg: str
    workdir: str
    runner: str
    model: str
    state: str = "todo"


def _to_dict(config: Any) -> dict[str, Any]:
    # experiment.to_dict without importing jax (the plan and --dry-run need none)
    return json.loads(json.dumps(config.to_dict(), default=str))


def _state(workdir: str) -> str:
    path = epath.Path(workdir)
    if (path / table_lib.RESULTS).exists():
        return "done"
    return "resume" if (path / table_lib.CONFIG).exists() else "todo"


def plan(
    protocol: str,
    *,
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    shots: Sequence[int | None] = (None,),
    root: str,
    overrides: Sequence[str] = (),
) -> list[tuple[PlannedRun, Any]]:
    """Every run of the reproduction (methods outermost, seeds innermost), with its config.

    Reads only: each run's state comes from its directory (:func:`_state`).

    Raises:
      ValueError (and the config parser's errors): an unknown method, dataset or config key.
    """
    from jaxprompt.app import flags as flags_lib

    out = []
    for m in methods:
        runs = sweep.plan(f"{protocol}:{m}", datasets=datasets, shots=shots, seeds=seeds)
        for r in runs:
            argv = ["jaxprompt", "--config", r.config_arg, *overrides, "--workdir", "-"]
            config, _ = flags_lib.parse_run_flags(argv, need_config=True)
            cfg = _to_dict(config)
            wd = sweep.run_dir(root, cfg)
            shots_ = int(cfg["data"]["shots"]) if "shots" in cfg["data"] else None
            run = PlannedRun(
                method=m,
                dataset=str(cfg["data"]["dataset"]),
                shots=shots_,
                seed=int(cfg["seed"]),
                config_arg=r.config_arg,
                workdir=wd,
                runner=str(cfg.get("runner", "train")),
                model=str(cfg.get("clip", {}).get("name", "")),
                state=_state(wd),
            )
            out.append((run, config))
    return out


def write_plan(root: str, protocol: str, runs: Sequence[PlannedRun]) -> None:
    """Adds the runs to ``ROOT/<protocol>/plan.json`` (what the table expects), keeping the runs
    other reproductions into this root planned."""
    path = epath.Path(root) / protocol / table_lib.PLAN
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    entries = {(e["method"], e["dataset"], e.get("shots"), e["seed"]): e for e in old}
    for r in runs:
        e = {"method": r.method, "dataset": r.dataset, "shots": r.shots, "seed": r.seed}
        entries[(r.method, r.dataset, r.shots, r.seed)] = {**e, "model": r.model}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": list(entries.values())}, indent=1) + "\n")


def _command(runner: str) -> str:
    return "train" if runner == "train" else "adapt"


def print_plan(protocol: str, runs: Sequence[PlannedRun]) -> None:
    """The plan: counts, then one line per run with its state and command."""
    n = len(runs)
    counts = {s: sum(r.state == s for r in runs) for s in ("done", "resume", "todo")}
    dims = [
        f"{len({r.method for r in runs})} methods",
        f"{len({r.dataset for r in runs})} datasets",
    ]
    if any(r.shots is not None for r in runs) and protocol == "fewshot":
        dims.append(f"{len({r.shots for r in runs})} shot counts")
    dims.append(f"{len({r.seed for r in runs})} seeds")
    print(
        f"reproduce {protocol}: {n} runs ({' x '.join(dims)}): {counts['done']} done, "
        f"{counts['resume']} to resume, {counts['todo']} to run",
        flush=True,
    )
    for r in runs:
        cmd = f"jaxprompt {_command(r.runner)} --config {r.config_arg} --workdir {r.workdir}"
        print(f"  [{r.state}] {cmd}")


def _eta(times: Mapping[str, list[float]], left: Mapping[str, int]) -> str:
    """Seconds left from each method's measured run times; the methods not timed yet named."""
    from jaxprompt.app import console

    secs = sum(sum(times[m]) / len(times[m]) * n for m, n in left.items() if times.get(m))
    untimed = {m: n for m, n in left.items() if n and not times.get(m)}
    out = f"about {console.format_seconds(secs)} left"
    if untimed:
        out += f" (+ {sum(untimed.values())} runs of {', '.join(untimed)}, not timed yet)"
    return out


def execute(
    protocol: str,
    runs: Sequence[tuple[PlannedRun, Any]],
    *,
    root: str,
    run_one: Callable[[PlannedRun, Any], Mapping[str, Any]],
    is_main: bool = True,
    write_tables: Callable[[], str] | None = None,
) -> list[tuple[PlannedRun, str]]:
    """Runs every planned run that is not done, one after another; returns the failures.

    Args:
      protocol: the protocol (for the messages).
      runs: :func:`plan`'s output.
      root: the root of the runs.
      run_one: runs one (config, directory) to its results record; whatever it raises
        (except Ctrl-C) fails that run only: ``failed.json`` is written in its directory and
        the next run starts.
      is_main: whether this process writes (process 0 of a multi-host job).
      write_tables: rebuilds the tables (after each run); None: not rebuilt.
    """
    todo = [(r, c) for r, c in runs if r.state != "done"]
    left = {}
    for r, _ in todo:
        left[r.method] = left.get(r.method, 0) + 1
    times: dict[str, list[float]] = {}
    failures = []
    for i, (r, config) in enumerate(todo):
        log.info(
            "reproduce run %d/%d (%s): %s %s%s seed %d -> %s", i + 1, len(todo), r.state,
            r.method, r.dataset, "" if r.shots is None else f" {r.shots} shots", r.seed,
            r.workdir,
        )  # fmt: skip
        failed_file = epath.Path(r.workdir) / table_lib.FAILED
        t0 = time.perf_counter()
        try:
            run_one(r, config)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failed run must not stop the others
            from jaxprompt.app import flags as flags_lib

            msg = flags_lib.one_line(e) or type(e).__name__
            log.error("reproduce: %s failed: %s", r.workdir, msg)
            log.debug("%s", traceback.format_exc())
            failures.append((r, msg))
            if is_main:
                failed_file.parent.mkdir(parents=True, exist_ok=True)
                failed_file.write_text(json.dumps({"error": msg, "config": r.config_arg}) + "\n")
        else:
            times.setdefault(r.method, []).append(time.perf_counter() - t0)
            if is_main and failed_file.exists():
                failed_file.unlink()  # an earlier failure, now run through
        left[r.method] -= 1
        if sum(left.values()):
            failed = f" ({len(failures)} failed)" if failures else ""
            print(
                f"reproduce {protocol}: {i + 1}/{len(todo)} runs over{failed}, {_eta(times, left)}",
                flush=True,
            )
        if is_main and write_tables is not None:
            try:
                write_tables()
            except Exception as e:  # noqa: BLE001 - a table must never stop the runs
                log.warning("reproduce: the tables could not be written: %s", e)
    return failures


def _run_one(r: PlannedRun, config: Any, checked: Mapping[str, Any]) -> Mapping[str, Any]:
    from jaxprompt.app import experiment, runners

    if r.runner == "train":
        with experiment.matmul_precision(experiment.to_dict(config)):
            return experiment.run_train(config, r.workdir, checked=checked.get(r.workdir))
    return runners.run(config, r.workdir, command=_command(r.runner))


def _split(text: str, kind: type) -> list[Any]:
    values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"empty list {text!r}")
    return values


def datasets_for(protocol: str, text: str) -> list[str]:
    """``--datasets``: comma-separated names and sets (coop11, imagenet-variants, toy), as the
    catalog's names (any alias: ``dtd`` -> ``DescribableTextures``), without repeats."""
    from jaxprompt.data import catalog

    out: list[str] = []
    for part in _split(text, str):
        names = DATASET_SETS[part][protocol] if part in DATASET_SETS else (part,)
        for n in names:
            if "/" in n or ":" in n:  # a path, a text task (glue/sst2), DomainNet/<domain>
                out += [n] if n not in out else []
                continue
            try:
                name = catalog.canonical_name(n) or n
            except KeyError as e:
                sets = ", ".join(DATASET_SETS)
                raise ValueError(f"{e.args[0]}; or a set: {sets}") from None
            if name not in out:
                out.append(name)
    return out


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="jaxprompt reproduce",
        description=__doc__.split("\n\n")[0],
        epilog="Other --config.<key>=<value> flags are passed to every run (e.g. a short "
        "schedule: --config.optim.epochs=2). The tables: jaxprompt table ROOT.",
    )
    ap.add_argument("protocol", choices=table_lib.PROTOCOLS, help="the protocol")
    ap.add_argument(
        "--methods",
        required=True,
        help="comma-separated presets (coop,cocoop,ivlp,maple,promptsrc,...; adapt: tpt,pouf,...)",
    )
    ap.add_argument("--root", required=True, help="root directory of the runs (local or gs://)")
    ap.add_argument(
        "--datasets",
        help="comma-separated names or sets: coop11, imagenet-variants, toy (default: coop11; "
        "xdomain: ImageNet, the source; adapt: imagenet-variants)",
    )
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    ap.add_argument(
        "--shots", help="comma-separated shot counts (fewshot default 1,2,4,8,16; else 16)"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    return sweep.parse_with_overrides(ap, argv)


def main(argv: Sequence[str]) -> int:
    """``jaxprompt reproduce``; ``argv`` are the arguments after ``reproduce``.

    Returns 0 when every run finished, 1 when some failed (the table names them), 2 for bad
    input (one line, before anything is written), 130 on Ctrl-C.
    """
    from jaxprompt.app import flags as flags_lib

    ns, overrides = _parse(argv)
    p = ns.protocol
    try:
        if p == "adapt" and ns.shots:
            raise ValueError("adapt has no shots: drop --shots")
        shots_text = ns.shots or DEFAULT_SHOTS.get(p)
        runs = plan(
            p,
            methods=_split(ns.methods, str),
            datasets=datasets_for(p, ns.datasets or DEFAULT_DATASETS[p]),
            seeds=_split(ns.seeds, int),
            shots=_split(shots_text, int) if shots_text else [None],
            root=ns.root,
            overrides=overrides,
        )
    except ImportError as e:  # gs:// without gcsfs
        return flags_lib.fail(f"{e} (pip install gcsfs)")
    except Exception as e:  # noqa: BLE001 - the CLI's one-line error for any bad input
        return flags_lib.fail(flags_lib.one_line(e))
    print_plan(p, [r for r, _ in runs])
    if ns.dry_run:
        return 0

    from jaxprompt.app import experiment, rundir, runners

    runners.maybe_initialize_distributed()
    # Every training run is checked (reading only) before the first one starts, as sweep
    # does: a config that cannot work must not surface hours in. The label-free runners
    # check their inputs when they start.
    checked, cache = {}, {}
    for r, config in runs:
        if r.state == "done" or r.runner != "train":
            continue
        try:
            checked[r.workdir] = experiment.check_train(config, r.workdir, cache=cache)
        except runners.USER_ERRORS as e:
            return flags_lib.fail(f"{r.workdir}: {flags_lib.one_line(e)}")
    main_process = rundir.is_main()
    if main_process:
        write_plan(ns.root, p, [r for r, _ in runs])

    def tables() -> str:
        return table_lib.write(ns.root, p)

    try:
        failures = execute(
            p,
            runs,
            root=ns.root,
            run_one=lambda r, c: _run_one(r, c, checked),
            is_main=main_process,
            write_tables=tables,
        )
    except KeyboardInterrupt:
        return flags_lib.interrupted(
            "finished runs are kept; the same command resumes the interrupted one, "
            f"`jaxprompt table {ns.root}` shows the table so far"
        )
    if main_process:
        md = tables()
        print(md)
        files = ",".join(table_lib.FILES)
        print(f"reproduce {p}: {ns.root}/{p}/{{{files}}}")
    if failures:
        print(f"reproduce {p}: {len(failures)} runs failed:", file=sys.stderr)
        for r, msg in failures:
            print(f"  {r.workdir}: {msg}", file=sys.stderr)
        return 1
    return 0
