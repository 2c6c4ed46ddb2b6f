"""Shared pieces of the protocol configs: argument parsing, defaults and method presets.

Configs import only ml_collections, this file and jaxprompt's dataset catalog (numpy only, no
jax), so each builds in well under a second and ``--config.<key>=<value>`` overrides are checked
against these keys. Every per-dataset setting (PromptSRC's few-shot GPA, Bayesian prompts' L and
epochs, the toy world's CLIP, the zero-shot template) is keyed by the catalog's name, reached
from any alias through :func:`catalog_name`: ``dataset=dtd``, ``DTD`` and
``DescribableTextures`` get the same recipe.
"""

from __future__ import annotations

import ml_collections

DEFAULT_CLIP = "openai/clip-vit-base-patch16"

# PromptSRC's self-regulation settings for the "+src" presets (promptsrc.md 4).
_SRC = dict(w_kl=1.0, w_text=25.0, w_image=10.0, templates="promptsrc_60")
# PromptSRC's base-to-novel GPA (mean 15, std 1 over 20 epochs) as fractions of a run's epochs.
SRC_RELATIVE_GPA = (15.0 / 20.0, 1.0 / 20.0)

# The published recipes (promptsrc.md sections 2, 6, 7 and 12; CoOp/CoCoOp configs). Each entry:
# method keyword arguments and the optimisation of the base-to-novel protocol.
METHOD_PRESETS = {
    # CLIP's row of the papers' tables: CoOp's hand-crafted template of the dataset each task
    # comes from (protocol.md 1.2; templates="dataset" reads it from the task), so evaluations
    # on other datasets use theirs. --config.method.kw.templates=imagenet_80 for CLIP's ensemble.
    "zeroshot": dict(method=dict(templates="dataset"), optim=dict(epochs=0, lr=0.0, batch_size=32)),
    # CoOp as the CoCoOp/PromptSRC papers ran it in base-to-novel: 16 tokens, random init.
    "coop": dict(method=dict(n_ctx=16), optim=dict(epochs=200, lr=0.002, batch_size=32)),
    "cocoop": dict(
        method=dict(n_ctx=4, init_words="a photo of a"),
        optim=dict(epochs=10, lr=0.002, batch_size=1),
    ),
    "ivlp": dict(
        method=dict(depth=9, n_ctx_text=4, n_ctx_vision=4, init_words="a photo of a"),
        optim=dict(epochs=20, lr=0.0025, batch_size=4),
    ),
    "maple": dict(
        method=dict(depth=9, n_ctx=2, init_words="a photo of a"),
        optim=dict(epochs=5, lr=0.0035, batch_size=4),
    ),
    "promptsrc": dict(
        method=dict(
            depth=9,
            n_ctx_text=4,
            n_ctx_vision=4,
            init_words="a photo of a",
            w_text=25.0,
            w_image=10.0,
            gpa_mean=15.0,
            gpa_std=1.0,
        ),
        optim=dict(epochs=20, lr=0.0025, batch_size=4),
    ),
    # Self-regulation on other bases (issue 18; jaxprompt.methods.selfreg): the base's own
    # base-to-novel preset (prompt and optimisation) plus PromptSRC's weights (KL 1, text L1 25,
    # image L1 10; the image term only where the base prompts the vision tower) and its 60
    # teacher templates. GPA keeps PromptSRC's shape relative to the run ("relative_gpa"):
    # gpa_mean / gpa_std = 3/4 and 1/20 of the configured epochs (15 and 1 of PromptSRC's 20),
    # the std at least one epoch so that short runs still average (selfreg.relative_gpa): 150 /
    # 10 for CoOp's 200 epochs, 7.5 / 1 for CoCoOp's 10, 3.75 / 1 for MaPLe's 5 (set in base()
    # from the final epoch count; --config.method.kw.gpa_mean=... overrides).
    "coop+src": dict(
        method=dict(base="coop", base_kwargs=dict(n_ctx=16), **_SRC),
        optim=dict(epochs=200, lr=0.002, batch_size=32),
        relative_gpa=SRC_RELATIVE_GPA,
    ),
    "cocoop+src": dict(
        method=dict(base="cocoop", base_kwargs=dict(n_ctx=4, init_words="a photo of a"), **_SRC),
        optim=dict(epochs=10, lr=0.002, batch_size=1),
        relative_gpa=SRC_RELATIVE_GPA,
    ),
    "maple+src": dict(
        method=dict(
            base="maple", base_kwargs=dict(depth=9, n_ctx=2, init_words="a photo of a"), **_SRC
        ),
        optim=dict(epochs=5, lr=0.0035, batch_size=4),
        relative_gpa=SRC_RELATIVE_GPA,
    ),
    # KgCoOp (Yao, Zhang, Xu, CVPR 2023; jaxprompt.methods.kgcoop): CoOp with 4 tokens from
    # "a photo of a" and lambda 8 on 1 - cos to the dataset's hand-crafted prompt's frozen
    # features, KgCoOp's own template table ("dataset:kgcoop": trainers/kgcoop.py:37-53, CoOp's
    # except DTD). Optimisation from the reference's base-to-novel config
    # (KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml: 100 epochs, lr 0.002, batch
    # 128; tests/test_recipe_table.py cites each line).
    "kgcoop": dict(
        method=dict(
            base="coop",
            base_kwargs=dict(init_words="a photo of a"),
            weight=8.0,
            templates="dataset:kgcoop",
        ),
        optim=dict(epochs=100, lr=0.002, batch_size=128),
    ),
    # Bayesian prompt learning (bayesian.md 4.1): the released config is the unconditional
    # posterior, batch 1, lr 0.002 with SGD + coupled weight decay 5e-4; L and the epochs are
    # per dataset (BAYES_PER_DATASET), these are ImageNet's. --config.method.kw.conditional=true
    # selects the image-conditional posterior with the same recipe.
    "bayes": dict(
        method=dict(
            n_ctx=4,
            init_words="a photo of a",
            conditional=False,
            mc_samples=10,
            kl_weight=1e-3,
            chunk=0,  # text sequences per lax.map step (0: all at once); not in the paper
        ),
        optim=dict(epochs=10, lr=0.002, batch_size=1),
    ),
}

# Bayesian prompt learning: Monte Carlo samples L (train = test) and epochs per dataset, from the
# reference's VPT.md (bayesian.md 4.3). SUN397: VPT.md says L = 20, the ablation scripts 10; we
# follow VPT.md. Keys are catalog names; datasets not listed keep the preset (L 10, 10 epochs).
BAYES_PER_DATASET = {
    "Caltech101": (20, 20),
    "OxfordPets": (40, 20),
    "StanfordCars": (20, 40),
    "OxfordFlowers": (10, 40),
    "Food101": (20, 20),
    "FGVCAircraft": (10, 10),
    "SUN397": (20, 10),
    "DescribableTextures": (40, 10),
    "EuroSAT": (20, 60),
    "UCF101": (5, 20),
    "ImageNet": (10, 10),
}

# The toy CLIP has 4 layers per tower where ViT-B/16 has 12: prompt depths scale by 4/12. Its
# ViT sees 16 patches where ViT-B/16 sees 196: 4 appended vision prompts would be a fifth of
# its sequence and take a fifth of every attention (measured: IVLP's training accuracy fell
# from zero-shot's 81% to 49% at its first steps), so vision prompt counts scale by 16/196
# (at least 1), keeping their share of the sequence what it is at ViT-B/16.
TOY_LAYERS = 4
TOY_PATCHES = 16
VIT_B16_PATCHES = 196

TOY_DATASETS = (
    "toy_textures",
    "toy_textures_sketch",
    "toy_textures_night",
    "toy_textures_cartoon",
    "toy_colours",
)


def parse_arg(arg: str | None, **defaults):
    """Parses ``"method,key=value,..."`` (the part after ``:`` in ``--config file.py:...``).

    The first bare word is the method. Values are converted to the type of the default.

    Raises:
      ValueError: an unknown key or method (the message lists the valid ones).
    """
    out = dict(defaults)
    for i, part in enumerate(p for p in (arg or "").split(",") if p):
        if "=" not in part:
            if i == 0 and "method" in out:
                out["method"] = part
                continue
            raise ValueError(f"config argument {part!r} is not key=value")
        k, v = part.split("=", 1)
        if k not in out:
            raise ValueError(f"unknown config argument {k!r}; valid: {', '.join(sorted(out))}")
        d = out[k]
        out[k] = (v.lower() in ("1", "true", "yes")) if isinstance(d, bool) else type(d)(v)
    if "method" in out and out["method"] not in METHOD_PRESETS:
        raise ValueError(
            f"unknown method {out['method']!r}; presets: {', '.join(sorted(METHOD_PRESETS))}"
        )
    return ml_collections.ConfigDict(out)


def catalog_name(dataset: str) -> str | None:
    """The catalog's name for ``dataset`` (``"dtd"`` -> ``"DescribableTextures"``); None for a
    ``folder:``/``csv:`` dataset.

    Raises:
      ValueError: an unknown dataset (one line listing the valid names).
    """
    from jaxprompt.data import catalog

    try:
        return catalog.canonical_name(dataset)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None


def is_toy(dataset: str) -> bool:
    """Whether ``dataset`` is one of the toy world's (which run on the shipped toy CLIP)."""
    return catalog_name(dataset) in TOY_DATASETS


def is_domainnet(dataset: str) -> bool:
    """Whether ``dataset`` names a DomainNet domain (``DomainNet/clipart``: POUF's targets, read
    by its runner, not catalog entries).

    Raises:
      ValueError: a DomainNet name with an unknown domain (one line listing the domains).
    """
    from jaxprompt.data import catalog

    try:
        return catalog.domainnet_domain(dataset) is not None
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None


def base(arg) -> ml_collections.ConfigDict:
    """The keys every protocol shares, filled from the parsed argument and the method preset."""
    preset = METHOD_PRESETS[arg.method]
    toy = is_toy(arg.dataset)
    c = ml_collections.ConfigDict()
    c.runner = "train"  # jaxprompt.app.runners: which runner runs this config
    c.protocol = ""
    c.seed = arg.seed
    c.method = ml_collections.ConfigDict({"name": arg.method, "kw": dict(preset["method"])})
    c.clip = clip_config(arg)
    c.data = ml_collections.ConfigDict(
        {
            "dataset": arg.dataset,
            "shots": arg.shots,
            "subset": "all",
            "seed": arg.seed,
            "batch_size": preset["optim"]["batch_size"],
            "eval_batch_size": 100,
            "data_dir": "",
            "manual_dir": "",
            "split_file": "",
            # Random-resized-crop area range: CoOp's for natural images; textures of the
            # 32-pixel toy world lose their class in small crops.
            "rrc_scale": (0.5, 1.0) if toy else (0.08, 1.0),
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "lr": preset["optim"]["lr"],
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "warmup_epochs": 1,
            "warmup_lr": 1e-5,
            "epochs": preset["optim"]["epochs"],
        }
    )
    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
    # jax_default_matmul_precision: "auto" keeps the platform's default (exact float32 on CPU,
    # TF32 on recent NVIDIA GPUs, bfloat16 passes on TPU: fast, but numbers differ across
    # hardware); "highest" makes float32 matmuls exact everywhere (the PyTorch references'
    # numerics; several times slower on TPU). Recorded in results.json.
    c.matmul_precision = "auto"
    c.ckpt = ml_collections.ConfigDict({"every_epochs": 1, "keep": 3})
    c.log_every = 50
    c.eval_every_epochs = 0
    c.evals = []
    if toy:
        scale_depth_for_toy(c)
    if arg.runlocal:
        c.data.batch_size = min(c.data.batch_size, 8)
        c.optim.epochs = min(c.optim.epochs, 1)
        c.data.shots = min(arg.shots, 2)
        c.log_every = 1
    set_relative_gpa(c, preset)
    return c


def clip_config(arg, *, toy: bool | None = None) -> ml_collections.ConfigDict:
    """The ``clip`` block: ``backbone=`` when given (``RN50``, ``ViT-B/16``, ..., a hub id, a
    directory or a ``.pt`` file; jaxprompt.backbones resolves OpenAI's names to the files in
    ``$JAXPROMPT_CLIP_DIR`` or ``~/.cache/clip``), else the toy CLIP for a toy dataset and
    ViT-B/16 from the hub for the others. ``--config.clip.name=...`` overrides it as well.
    ``toy``: whether the dataset is the toy world's, when the caller knows it (a DomainNet
    target is not in the catalog that :func:`is_toy` reads); None: ``is_toy(arg.dataset)``."""
    backbone = arg.get("backbone", "")
    toy = is_toy(arg.dataset) if toy is None else toy
    default = "toy" if toy else DEFAULT_CLIP
    return ml_collections.ConfigDict({"name": backbone or default, "dtype": "float32"})


def set_relative_gpa(c, preset) -> None:
    """Sets ``method.kw.gpa_mean`` / ``gpa_std`` as fractions of ``optim.epochs`` for a preset
    with ``relative_gpa`` (the "+src" ones); a protocol that changes the epochs calls it again."""
    if "relative_gpa" in preset:
        mean, std = preset["relative_gpa"]
        c.method.kw["gpa_mean"] = float(mean * c.optim.epochs)
        # At least one epoch, so short runs still average (jaxprompt.methods.selfreg.
        # relative_gpa argues it; the same rule, kept here because configs import no jax).
        c.method.kw["gpa_std"] = float(max(std * c.optim.epochs, 1.0))


def apply_bayes_per_dataset(c, arg) -> None:
    """Sets Bayesian prompts' L (``method.kw.mc_samples``) and epochs for ``arg.dataset``.

    Datasets outside :data:`BAYES_PER_DATASET` (the toy world, folders) keep the preset; a
    ``runlocal`` config keeps its single epoch.
    """
    name = catalog_name(arg.dataset)
    if name not in BAYES_PER_DATASET:
        return
    samples, epochs = BAYES_PER_DATASET[name]
    c.method.kw["mc_samples"] = samples
    if not arg.runlocal:
        c.optim.epochs = epochs


def scale_depth_for_toy(c) -> None:
    """Maps ViT-B/16 prompt shapes to the toy CLIP: depths by 4/12 layers (9 -> 3, 3 -> 1),
    vision prompt counts by 16/196 patches (4 -> 1; MaPLe's coupled 2 -> 1)."""
    if c.clip.name != "toy":
        return

    def tokens(n):
        return max(1, round(n * TOY_PATCHES / VIT_B16_PATCHES))

    def scale(name, kw):
        if "depth" in kw:
            kw["depth"] = max(1, round(kw["depth"] * TOY_LAYERS / 12))
        if "n_ctx_vision" in kw:
            kw["n_ctx_vision"] = tokens(kw["n_ctx_vision"])
        if name == "maple":  # one count for the text tokens and their coupled vision ones
            kw["n_ctx"] = tokens(kw["n_ctx"])

    scale(c.method.name, c.method.kw)
    if "base_kwargs" in c.method.kw:  # a wrapper's base (maple+src): the same mapping
        scale(c.method.kw["base"], c.method.kw["base_kwargs"])
