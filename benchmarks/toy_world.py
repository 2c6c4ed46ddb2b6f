"""Every method on the toy world, seeds 1-3: base-to-novel and cross-domain tables.

    python benchmarks/toy_world.py --out docs/toy_results.md [--methods coop,ivlp] [--seeds 1,2]

Runs ``configs/base2new.py`` (train on the 8 base textures, test base and new) and
``configs/xdomain.py`` (train on all 16 photo textures, test the sketch/night/cartoon styles
and the colour label space) for each method and seed through the same code path as the CLI
(run directories under ``--runs``; finished runs are skipped, so it resumes), then writes the
mean over seeds as markdown tables. Prints one JSON line with the means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_METHODS = ("zeroshot", "maple", "coop", "ivlp", "promptsrc", "cocoop", "bayes")


def _config(protocol: str, arg: str):
    path = os.path.join(REPO, "configs", protocol + ".py")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(protocol, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _section(protocol: str, rows: dict, seeds: str) -> str:
    from jaxprompt import evaluate

    cols = ("base", "new", "hm") if protocol == "base2new" else tuple(next(iter(rows.values())))
    table = evaluate.markdown_table(rows, columns=cols, average=False)
    return f"### {protocol} (toy world, mean of seeds {seeds})\n\n" + table.replace(
        "| Dataset |", "| Method |", 1
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--protocols", default="base2new,xdomain")
    ap.add_argument("--runs", default="runs/toy")
    ap.add_argument("--out", default="docs/toy_results.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    from jaxprompt import evaluate, experiment

    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sections, summary = [], {}
    t0 = time.time()

    def write(partial_sections):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(
                "# Toy-world results\n\nMeasured with `python benchmarks/toy_world.py` "
                f"({time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s on this machine).\n\n"
                + "\n\n".join(partial_sections)
                + "\n"
            )

    for protocol in args.protocols.split(","):
        rows = {}
        for m in methods:
            per_seed = []
            for s in seeds:
                cfg = _config(protocol, f"{m},dataset=toy_textures,seed={s}")
                wd = os.path.join(args.runs, protocol, m, f"seed{s}")
                per_seed.append(experiment.run_train(cfg, wd)["accuracy"])
            stats = evaluate.summarize_seeds(per_seed)
            rows[m] = {k: v["mean"] for k, v in stats.items()}
            summary[f"{protocol}/{m}"] = rows[m]
            write(sections + [_section(protocol, rows, args.seeds)])  # progress, per method
        sections.append(_section(protocol, rows, args.seeds))
    write(sections)
    print(json.dumps({"benchmark": "toy_world", "seeds": seeds, "means": summary}))


if __name__ == "__main__":
    main()
