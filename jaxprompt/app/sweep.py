"""Sweeps: one command trains every (dataset, shots, seed) of a protocol, one run after another.

    jaxprompt sweep --config fewshot:coop --datasets dtd,eurosat --shots 1,4,16 \\
        --seeds 1,2,3 --root gs://BUCKET/jp [--config.optim.lr=0.001 ...] [--dry-run]

Each run gets its own directory
``ROOT/<protocol>/<method>/<dataset>/<shots>s/seed<n>`` and is an ordinary ``jaxprompt train``
run: a finished one (with ``results.json``) is skipped, an interrupted one resumes from its
newest checkpoint. So after a preemption the same command picks up where it stopped. A list
that is not given keeps the config's value (e.g. base-to-novel's 16 shots).

At the end ``ROOT/<protocol>/<method>/summary.json`` and ``summary.md`` hold every run's
accuracies and, per (dataset, shots), their mean and standard deviation over the seeds.

Few-shot runs take minutes, so a sweep packs them one after another into one program (jax and
the model load once per run, compiled steps are reused when shapes agree). On several hosts,
every host runs the same sweep and process 0 writes the files.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from etils import epath

__all__ = ["SweepRun", "main", "plan", "run_dir"]

log = logging.getLogger("jaxprompt")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Attributes:
      dataset: the dataset name given on the command line (``None``: the config's).
      shots: shots per class (``None``: the config's).
      seed: run seed (``None``: the config's).
      config_arg: the full ``--config`` value of the run (``file.py:method,dataset=...``).
      workdir: its run directory (filled in once the config is resolved).
    """

    dataset: str | None
    shots: int | None
    seed: int | None
    config_arg: str
    workdir: str = ""


def _split_list(text: str | None, kind: type, flag: str) -> list[Any]:
    if text is None:
        return [None]
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag} {text!r}: give comma-separated integers, e.g. 1,2,3") from None
    if not values:
        raise ValueError(f"--{flag} {text!r} is an empty list")
    return values


def plan(
    config: str,
    *,
    datasets: Sequence[str | None] = (None,),
    shots: Sequence[int | None] = (None,),
    seeds: Sequence[int | None] = (None,),
) -> list[SweepRun]:
    """The runs of a sweep, datasets outermost and seeds innermost.

    Args:
      config: the ``--config`` value without the swept keys, e.g. ``configs/fewshot.py:coop``.
      datasets: dataset names (``None``: the config's default).
      shots: shot counts (``None``: the config's default).
      seeds: seeds (``None``: the config's default).

    Returns:
      One :class:`SweepRun` per combination, each with its complete ``--config`` value.

    Example:
      >>> [r.config_arg for r in plan("configs/fewshot.py:coop", shots=[1, 2])]
      ['configs/fewshot.py:coop,shots=1', 'configs/fewshot.py:coop,shots=2']
    """
    path, _, arg = config.partition(":")
    out = []
    for d, k, s in itertools.product(datasets, shots, seeds):
        parts = [p for p in arg.split(",") if p]
        parts += [f"dataset={d}"] if d is not None else []
        parts += [f"shots={k}"] if k is not None else []
        parts += [f"seed={s}"] if s is not None else []
        out.append(SweepRun(d, k, s, f"{path}:{','.join(parts)}"))
    return out


def run_dir(root: str, cfg: Any) -> str:
    """``ROOT/<protocol>/<method>/<dataset>/<shots>s/seed<n>`` for a resolved config.

    A label-free config (``adapt``) is named by its preset (``tpt_coop``, ``pouf_full``: one
    method name may run under several) and has no shots level.
    """
    protocol = cfg["protocol"] or "run"
    d = cfg["data"]
    parts = [protocol, cfg.get("preset") or cfg["method"]["name"], d["dataset"]]
    if "shots" in d:
        parts.append(f"{int(d['shots'])}s")
    parts.append(f"seed{int(cfg['seed'])}")
    # A dataset given as a path (folder:/x/y, csv:/x/y.csv) must not add directory levels.
    parts = [str(p).replace("/", "_").replace(":", "_") for p in parts]
    return str(epath.Path(root).joinpath(*parts))


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="jaxprompt sweep",
        description=__doc__.split("\n\n")[0],
        epilog="Other --config.<key>=<value> flags are passed to every run.",
    )
    ap.add_argument(
        "--config", required=True, help="PROTOCOL:PRESET[,...] or configs/<protocol>.py:PRESET"
    )
    ap.add_argument("--root", required=True, help="root directory of the runs (local or gs://)")
    ap.add_argument("--datasets", help="comma-separated dataset names")
    ap.add_argument("--shots", help="comma-separated shot counts")
    ap.add_argument("--seeds", help="comma-separated seeds")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    ap.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    return parse_with_overrides(ap, argv)


def parse_with_overrides(
    ap: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """``ap``'s own flags, and the ``--config.<key>=<value>`` overrides passed on to every run;
    anything else is argparse's usage error (exit 2)."""
    ns, rest = ap.parse_known_args(list(argv))
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    return ns, rest


def main(argv: Sequence[str]) -> int:
    """Runs a sweep; ``argv`` are the arguments after ``sweep``. Returns the exit code.

    Errors in the arguments or a config end with a one-line message and exit code 2. A failed
    run stops the sweep (exit code 1) unless ``--keep-going``, which runs the others and
    reports the failures at the end.
    """
    from jaxprompt.app import flags as flags_lib

    ns, overrides = _parse(argv)
    from jaxprompt.app import experiment  # jax and the models: not needed for --help

    try:
        runs = plan(
            ns.config,
            datasets=_split_list(ns.datasets, str, "datasets"),
            shots=_split_list(ns.shots, int, "shots"),
            seeds=_split_list(ns.seeds, int, "seeds"),
        )
        resolved = []
        for r in runs:
            argv_r = ["jaxprompt", "--config", r.config_arg, *overrides, "--workdir", "-"]
            config, _ = flags_lib.parse_run_flags(argv_r, need_config=True)
            cfg = experiment.to_dict(config)
            resolved.append(
                (SweepRun(r.dataset, r.shots, r.seed, r.config_arg, run_dir(ns.root, cfg)), config)
            )
    except Exception as e:  # noqa: BLE001 - the CLI's one-line error for any bad input
        return flags_lib.fail(flags_lib.one_line(e))

    try:
        done = [(epath.Path(r.workdir) / experiment.RESULTS).exists() for r, _ in resolved]
    except ImportError as e:  # gs:// without gcsfs
        return flags_lib.fail(f"{e} (pip install gcsfs)")
    print(f"sweep: {len(resolved)} runs, {sum(done)} done", flush=True)
    for (r, _), is_done in zip(resolved, done, strict=True):
        state = "done" if is_done else "todo"
        print(f"  [{state}] jaxprompt train --config {r.config_arg} --workdir {r.workdir}")
    if ns.dry_run:
        return 0

    from jaxprompt.app import runners

    # Every run is checked (reading only) before the first one starts: a config that cannot
    # work in the last run of a sweep must not surface hours in, after the others ran.
    checks, cache = [], {}
    for r, config in resolved:
        try:
            checks.append(experiment.check_train(config, r.workdir, cache=cache))
        except runners.USER_ERRORS as e:
            return flags_lib.fail(f"{r.workdir}: {flags_lib.one_line(e)}")
    records, failed = [], []
    for i, ((r, config), checked) in enumerate(zip(resolved, checks, strict=True)):
        log.info("sweep run %d/%d: %s", i + 1, len(resolved), r.workdir)
        try:
            records.append((r, experiment.run_train(config, r.workdir, checked=checked)))
        except KeyboardInterrupt:
            return flags_lib.interrupted(
                f"{len(records)} of {len(resolved)} runs finished, {r.workdir} stopped "
                f"({runners.resume_note(r.workdir)})"
            )
        except runners.USER_ERRORS as e:
            if not ns.keep_going:
                print(f"jaxprompt: error: sweep run {r.workdir}: {flags_lib.one_line(e)}",
                      file=sys.stderr)  # fmt: skip
                return 1
            log.error("sweep run %s failed: %s", r.workdir, flags_lib.one_line(e))
            failed.append(r.workdir)
    if records:
        _write_summary(ns.root, records)
    if failed:
        print(f"sweep: {len(failed)} runs failed: {', '.join(failed)}")
        return 1
    return 0


def summarize(records: Sequence[tuple[SweepRun, dict[str, Any]]]) -> dict[str, Any]:
    """Per-run accuracies and mean / std over seeds for every (dataset, shots).

    Args:
      records: ``(run, results.json contents)`` pairs.

    Returns:
      ``{"runs": [...], "by_dataset_shots": {"<dataset>/<shots>s": summarize_seeds(...)}}``.
    """
    from jaxprompt import evaluate

    groups: dict[str, list[dict[str, float]]] = {}
    rows = []
    for r, rec in records:
        key = f"{rec['dataset']}/{rec['shots']}s"
        groups.setdefault(key, []).append(dict(rec["accuracy"]))
        rows.append({"workdir": r.workdir, "seed": rec["seed"], "key": key, **rec["accuracy"]})
    return {
        "runs": rows,
        "by_dataset_shots": {k: evaluate.summarize_seeds(v) for k, v in groups.items()},
    }


def _write_summary(root: str, records: Sequence[tuple[SweepRun, dict[str, Any]]]) -> None:
    import jax

    from jaxprompt import evaluate
    from jaxprompt.app import rundir

    summary = summarize(records)
    groups = summary["by_dataset_shots"]
    columns = [c for c in ("base", "new", "hm") if any(c in g for g in groups.values())]
    columns = columns or sorted({c for g in groups.values() for c in g})
    table = evaluate.markdown_table(groups, columns=columns, average=len(groups) > 1)
    print(table)
    if jax.process_index() != 0:
        return
    rec = records[0][1]
    where = epath.Path(root) / (rec.get("protocol") or "run") / rec["method"]
    where.mkdir(parents=True, exist_ok=True)
    rundir.write_json(where / "summary.json", summary)
    (where / "summary.md").write_text(table + "\n")
    print(f"sweep: summary in {where}/summary.json")
