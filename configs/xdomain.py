"""Cross-dataset transfer and domain generalisation: train once on a source, test elsewhere.

Train on all classes of the source (16 shots), then evaluate the same prompt on other datasets
(their own class names) and on shifted domains. For the real benchmark the source is ImageNet and
the targets the 10 other CoOp datasets plus ImageNet-V2/-Sketch/-A/-R; for the toy world the
source is ``toy_textures``, the targets its other styles (domain shift) and ``toy_colours``
(another label space).

    jaxprompt train --config xdomain:promptsrc,dataset=ImageNet --workdir runs/xd
    jaxprompt train --config xdomain:promptsrc,dataset=toy_textures --workdir runs/xd_toy

PromptSRC's recipe here: depth 3, 20 epochs, GPA mean 6 / std 10; MaPLe: depth 3, 2 epochs,
lr 0.0026.

Toy world (source ``toy_textures``; seed 1 only, docs/toy_results_xdomain.md, 2026-12-02),
top-1 % on photo / sketch / night / cartoon / colours:

    zeroshot   67.88 / 28.00 / 40.12 / 36.75 / 28.75
    coop       71.25 / 25.88 / 36.50 / 39.12 / 12.38
    promptsrc  76.25 / 33.12 / 42.75 / 42.62 / 17.12

The other presets and seeds 2-3 have not been measured here yet.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from jaxprompt.data import catalog  # noqa: E402

# CoOp's other 10 datasets (cross-dataset), then ImageNet's variants (domain generalisation).
IMAGENET_TARGETS = catalog.COOP11[1:] + catalog.IMAGENET_VARIANTS[1:]
TOY_TARGETS = ("toy_textures_sketch", "toy_textures_night", "toy_textures_cartoon", "toy_colours")


def get_config(arg=None):
    arg = common.parse_arg(
        arg,
        method="promptsrc",
        dataset="toy_textures",
        shots=16,
        seed=1,
        runlocal=False,
        backbone="",
    )
    c = common.base(arg)
    c.protocol = "xdomain"
    c.data.subset = "all"
    if arg.method in ("promptsrc", "ivlp"):
        c.method.kw["depth"] = 3
        common.scale_depth_for_toy(c)
    if arg.method == "promptsrc":
        c.method.kw["gpa_mean"], c.method.kw["gpa_std"] = 6.0, 10.0
    if arg.method == "maple" and not arg.runlocal:
        c.method.kw["depth"] = 3
        common.scale_depth_for_toy(c)
        c.optim.lr, c.optim.epochs = 0.0026, 2
    if arg.method == "bayes":  # the source's L and epochs (ImageNet: L 10, 10 epochs)
        common.apply_bayes_per_dataset(c, arg)
    targets = TOY_TARGETS if common.is_toy(arg.dataset) else IMAGENET_TARGETS
    c.evals = [{"name": arg.dataset, "dataset": arg.dataset, "subset": "all"}] + [
        {"name": t, "dataset": t, "subset": "all"} for t in targets
    ]
    return c
