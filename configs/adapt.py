"""Label-free test-time protocols: TPT, episodic, one test image at a time (POUF goes here later).

Every test image of the dataset's test split gets its own episode: 64 views (view 0 the plain
resize + center crop; 63 random resized crops + flips, with AugMix for the fine-grained
datasets), the 6 most confident views, one AdamW step on the entropy of their mean probability
from a fresh prompt, then a prediction on view 0. Zero-shot (the initial prompt on view 0) and
TPT accuracy are written side by side to ``results.json``.

    jaxprompt adapt --config configs/adapt.py:tpt,dataset=ImageNetA --workdir runs/tpt/a
    jaxprompt adapt --config configs/adapt.py:tpt_coop,dataset=ImageNetA \\
        --config.init_from=runs/coop_imagenet_4ctx --workdir runs/tpt_coop/a
    jaxprompt adapt --config configs/adapt.py:tpt,dataset=toy_textures,runlocal=true \\
        --workdir /tmp/tpt_toy

Presets:
  tpt:        the prompt starts from "a photo of a" (CoOp form, 4 tokens, class at the end).
  tpt_coop:   the prompt starts from a trained CoOp context (``--config.init_from`` = a run
              directory or an exported ``.npz``; 4 tokens, class-agnostic, as the paper's).
  tpt_cocoop: TPT + CoCoOp from a trained CoCoOp run (``--config.init_from``).

No number is listed here until it has been reproduced with this code (the paper's are in
``specs/tpt.md`` section 5).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

PRESETS = {
    "tpt": dict(base="coop", base_kwargs=dict(n_ctx=4, init_words="a photo of a", remat=True)),
    # The base's hyperparameters come from the loaded run's meta; these are the fallbacks.
    "tpt_coop": dict(base="coop", base_kwargs=dict(n_ctx=4, remat=True)),
    "tpt_cocoop": dict(base="cocoop", base_kwargs=dict(n_ctx=4, init_words="a photo of a")),
}
NEEDS_INIT = ("tpt_coop", "tpt_cocoop")


def get_config(arg=None):
    # The preset is the first bare word ("tpt,dataset=..."); common.parse_arg knows only the
    # training presets, so it is split off here.
    parts = [p for p in (arg or "").split(",") if p]
    preset = "tpt"
    if parts and "=" not in parts[0]:
        preset = parts.pop(0)
    if preset not in PRESETS:
        raise ValueError(f"unknown adapt preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    arg = common.parse_arg(
        ",".join(parts), dataset="toy_textures", seed=0, runlocal=False, batch_size=8, limit=0
    )
    toy = arg.dataset in common.TOY_DATASETS
    p = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.protocol = "adapt"
    c.preset = preset
    c.seed = arg.seed  # the views of test image i come from fold_in(key(seed), i)
    c.init_from = ""  # a run directory or exported .npz with the initial prompt
    c.method = ml_collections.ConfigDict(
        {
            "name": "tpt",
            "base": p["base"],
            "base_kwargs": dict(p["base_kwargs"]),
            "steps": 1,
            "views": 64,
            "keep": 0.1,
            # torch.optim.AdamW(lr=5e-3) with PyTorch's defaults (weight decay 0.01).
            "optimizer": {
                "name": "adamw",
                "learning_rate": 5e-3,
                "weight_decay": 0.01,
                "b1": 0.9,
                "b2": 0.999,
                "eps": 1e-8,
            },
            "cocoop_unnormalized": True,
        }
    )
    c.clip = ml_collections.ConfigDict(
        {"name": "toy" if toy else common.DEFAULT_CLIP, "dtype": "float32"}
    )
    c.data = ml_collections.ConfigDict(
        {
            "dataset": arg.dataset,
            # "auto": AugMix for the fine-grained datasets, crops + flips for the ImageNet family.
            "augmix": "auto",
            "batch_size": arg.batch_size,  # episodes per step (per host)
            "limit": arg.limit,  # 0: the whole test split; n: its first n images
            "data_dir": "",
            "manual_dir": "",
            "split_file": "",
        }
    )
    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
    c.log_every = 20  # batches
    c.save_every = 50  # batches between progress files (an interrupted run resumes there)
    if arg.runlocal:
        c.method.views = 16
        c.data.limit = arg.limit or 16
        c.log_every = 1
    return c
