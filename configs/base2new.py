"""Base-to-novel generalisation (CoCoOp protocol): train on the base half, test base and new.

16 shots of the first ceil(n/2) classes; evaluate on the base test split and, with the same
prompt and rebuilt class prompts, on the new classes; report base, new and their harmonic mean.

    jaxprompt train --config base2new:promptsrc,dataset=toy_textures,seed=1 \\
        --workdir runs/b2n/promptsrc/toy_textures/seed1

Arguments after ``:``: the method (zeroshot, coop, cocoop, ivlp, maple, promptsrc, bayes), then
``dataset=``, ``shots=``, ``seed=``, ``runlocal=true`` (tiny smoke run).

Toy world (``dataset=toy_textures``, the shipped toy CLIP; ``python benchmarks/toy_world.py``,
mean of seeds 1-3, docs/toy_results.md), top-1 % base / new / HM:

    zeroshot   81.25 / 82.25 / 81.75      ivlp       90.67 / 65.67 / 76.17
    coop       92.58 / 74.83 / 82.77      maple      83.33 / 71.08 / 76.72
    cocoop     95.17 / 84.42 / 89.47      promptsrc  93.75 / 76.00 / 83.95
    bayes      85.00 / 80.33 / 82.60

The papers' numbers on real data are in README.md; ours are recorded there only once
reproduced.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg=None):
    arg = common.parse_arg(
        arg, method="promptsrc", dataset="toy_textures", shots=16, seed=1, runlocal=False
    )
    c = common.base(arg)
    c.protocol = "base2new"
    c.data.subset = "base"
    if arg.method == "bayes":  # L (train = test) and epochs per dataset
        common.apply_bayes_per_dataset(c, arg)
    c.evals = [
        {"name": "base", "dataset": arg.dataset, "subset": "base"},
        {"name": "new", "dataset": arg.dataset, "subset": "new"},
    ]
    return c
