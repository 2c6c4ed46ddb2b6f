"""Label-free test-time protocols: TPT, episodic, one test image at a time (POUF goes here later).

Every test image of the dataset's test split gets its own episode: 64 views (view 0 the plain
resize + center crop; 63 random resized crops + flips, with AugMix for the fine-grained
datasets), the 6 most confident views, one AdamW step on the entropy of their mean probability
from a fresh prompt, then a prediction on view 0. Zero-shot (the initial prompt on view 0) and
TPT accuracy are written side by side to ``results.json``.

    jaxprompt adapt --config adapt:tpt,dataset=ImageNetA --workdir runs/tpt/a
    jaxprompt adapt --config adapt:tpt_coop,dataset=ImageNetA \\
        --config.init_from=runs/coop_imagenet_4ctx --workdir runs/tpt_coop/a
    jaxprompt adapt --config adapt:tpt,dataset=toy_textures,runlocal=true \\
        --workdir /tmp/tpt_toy

Presets:
  tpt:        the prompt starts from "a photo of a" (CoOp form, 4 tokens, class at the end).
  tpt_coop:   the prompt starts from a trained CoOp context (``--config.init_from`` = a run
              directory or an exported ``.npz``; 4 tokens, class-agnostic, as the paper's).
  tpt_cocoop: TPT + CoCoOp from a trained CoCoOp run (``--config.init_from``).
  tpt_ivlp, tpt_maple, tpt_promptsrc, tpt_bayes: test-time tuning of a trained IVLP, MaPLe,
              PromptSRC or Bayesian prompt (``--config.init_from`` = its run directory or its
              ``jaxprompt export`` file); every leaf of the prompt, vision prompts included, is
              tuned through the base's own logits on the views.

Online TPT (``adapt:tpt,online=true``): the prompt tuned on test image i, and AdamW's state,
are where image i + 1 starts (``--config.method.carry_optimizer=false``, or
``--config.method.reset=online`` on the episodic preset, carries the prompt only and gives
every image a fresh optimiser state), in a seeded shuffle of the test split
(``data.stream_seed``, the run's seed by default, as the official loader shuffles; ``-1`` keeps
the stored order, which is class by class for most splits); within a batch the images run one
after another (a scan), so the result does not depend on the batch size.

What TPT's AdamW (lr 5e-3, weight decay 0.01, PyTorch's decoupled decay) does over a long
stream. The official loop (azshue/TPT @63ecbac, ``tpt_classification.py``) builds
``torch.optim.AdamW(trainable_param, args.lr)`` once (line 145; lr 5e-3 at line 323, PyTorch's
default weight decay 0.01), and before every test sample restores the prompt
(``model.reset()``, line 274) and the optimiser (``optimizer.load_state_dict(optim_state)``,
line 275); its loader shuffles the test set (``shuffle=True``, line 215). It has no online
mode (TPT's issue #16 asks for one); online TPT here is that loop without its resets. By the
update rule:

* with a fresh optimiser state per image (line 275 kept, ``carry_optimizer=false``),
  the one step per image has bias-corrected moments ``m = g``, ``v = g^2``, so it moves every
  coordinate by ``lr * g / (|g| + eps)``, i.e. +-lr whatever the gradient's size (a sign step),
  and the decay multiplies the carried context by ``1 - lr * wd = 1 - 5e-5`` per image:
  ``(1 - 5e-5)^N``, 0.61 after 10,000 images and 0.08 after ImageNet's 50,000. The sign steps
  add up like a random walk of about ``lr * sqrt(N)`` per coordinate wherever the images'
  gradients disagree: 0.063 after the toy world's 160 images, seven times the mean size of a
  coordinate of the toy context it starts from (0.009), so the prompt drifts.
* with ``carry_optimizer=true`` (neither line 274 nor line 275) the step is
  ``lr * m / (sqrt(v) + eps)`` with ``m`` averaging about the last 10 images' gradients (b1 =
  0.9) and ``v`` about the last 1,000 (b2 = 0.999): steps follow the gradient's size instead of
  its sign, but gradients that disagree from image to image still add up to about
  ``lr * sqrt(N)`` (the moving average passes each gradient on once in total), so carrying the
  state does not stop the drift by itself; the decay is the same ``(1 - lr * wd)^N``, and it
  pulls the context towards zero, not towards the initial prompt.

The online preset (``online=true``) carries the optimiser state too: online TPT is then the
official loop with no reset at all (neither line 274 nor line 275), one AdamW over the stream,
whose steps follow each gradient's size relative to the stream's instead of moving every
coordinate by lr; the learning rate and decay stay the official ones (a smaller rate would
slow the drift, but how much smaller depends on the stream's length, and no reference says).
Measured (toy world, seed 1, every 5th test image of the shuffled stream, sketch / night;
docs/toy_results_compose.md): zero-shot 32.50 / 43.75, carried state 22.50 / 11.25, fresh
state per image 14.38 / 10.00 (``--config.method.carry_optimizer=false``, the preset before
2026-12-08). Both drift far below zero-shot on this world: online TPT is for research on
streams.
The carry is saved with the progress file (``carry.npz``) so an interrupted run resumes
exactly; at the end ``carry.npz`` holds the prompt the last image ended with. Episodic reset
stays the default.

Backbone: ``backbone=NAME`` (or ``--config.clip.name=NAME``): ``RN50``, ``ViT-B/16``, ...
(OpenAI's ``.pt`` file from ``$JAXPROMPT_CLIP_DIR`` or ``~/.cache/clip``), a hub id, a
directory or a file; default ViT-B/16 (the toy CLIP on the toy world). The paper's main
backbone is RN50, with the same recipe (views cut at the model's 224 pixels, CLIP's mean and
std):

    jaxprompt adapt --config adapt:tpt,dataset=ImageNetA,backbone=RN50 --workdir runs/tpt_rn50/a
    jaxprompt adapt --config adapt:tpt_coop,dataset=ImageNetA,backbone=RN50 \\
        --config.init_from=runs/coop_rn50_imagenet_4ctx --workdir runs/tpt_coop_rn50/a

(the CoOp run: configs/fewshot.py). The paper's numbers on CLIP-RN50, NOT reproduced here (TPT
paper Table 1 as TPT's README gives it, specs/tpt.md 5.1, [README, verified]), top-1 % on
ImageNet / -A / -V2 / -R / -Sketch; CoOp and CoCoOp trained on ImageNet, 16 shots:

    CLIP-RN50     58.16 / 21.83 / 51.41 / 56.15 / 33.37
    TPT           60.74 / 26.67 / 54.7  / 59.11 / 35.09
    CoOp          63.33 / 23.06 / 55.40 / 56.60 / 34.67
    TPT + CoOp    64.73 / 30.32 / 57.83 / 58.99 / 35.86
    CoCoOp        62.81 / 23.32 / 55.72 / 57.74 / 34.48
    TPT + CoCoOp  62.93 / 27.40 / 56.60 / 59.88 / 35.43

Cross-dataset on RN50 (specs/tpt.md 5.2), Flowers / DTD / Pets / Cars / UCF101 / Caltech101 /
Food101 / SUN397 / Aircraft / EuroSAT: TPT 62.69 / 40.84 / 84.49 / 58.46 / 60.82 / 87.02 /
74.88 / 61.46 / 17.58 / 28.33 [3rd: TDA's README, which reuses TPT's benchmark]; CLIP-RN50
61.75 / 40.37 / 83.57 / 55.70 / 58.84 / 85.88 / 73.97 / 58.80 / 15.66 / 23.69 [recall: from
memory of the paper, in no primary source found; its average recomputes].

Toy world (shipped toy CLIP, mean of seeds 1-3, docs/toy_results.md), top-1 % on sketch /
night / cartoon: ``tpt`` (every 5th test image, ``data.every=5``) 27.92 / 31.88 / 31.25 against
zero-shot 25.62 / 38.12 / 31.88 on the same images (measured before issue 15's data changes;
seed 1 after them, docs/toy_results_compose.md: 26.88 / 28.12 / 30.00); ``pouf`` 28.63 /
32.83 / 50.83 against zero-shot 28.00 / 40.12 / 36.75 (2026-12-08); online TPT above. The
papers' numbers on real data are theirs (TPT's paper, section 5 of its spec), not reproduced
here.
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
    # Test-time tuning of any trained prompt: the whole prompt pytree (vision prompts included)
    # is tuned through the base's own logits on the views (TPT's generic path). The base and
    # its hyperparameters come from the trained run's meta; these are the fallbacks.
    "tpt_ivlp": dict(base="ivlp", base_kwargs=dict(remat=True)),
    "tpt_maple": dict(base="maple", base_kwargs=dict(remat=True)),
    # PromptSRC's prompt is an IVLP prompt (the GPA aggregate when the run saved one); its
    # regularisers play no part at test time.
    "tpt_promptsrc": dict(base="promptsrc", base_kwargs=dict(remat=True)),
    # Bayesian prompts: the logits are the MC predictive at the method's fixed evaluation key,
    # so the entropy's gradient reaches the mean and variance through the samples.
    "tpt_bayes": dict(base="bayes", base_kwargs=dict(remat=True)),
}
NEEDS_INIT = ("tpt_coop", "tpt_cocoop", "tpt_ivlp", "tpt_maple", "tpt_promptsrc", "tpt_bayes")
# POUF (specs/pouf.md): unsupervised adaptation on unlabeled target data, run by
# jaxprompt.app.pouf.run_pouf. pouf: CoOp context (4 tokens from "a photo of a") and
# logit_scale; pouf_full: every CLIP weight (the fixed prompt "a photo of a {}"); pouf_mlm:
# a RoBERTa masked LM on a text task.
POUF_PRESETS = ("pouf", "pouf_full", "pouf_mlm")


def get_config(arg=None):
    # The preset is the first bare word ("tpt,dataset=..."); common.parse_arg knows only the
    # training presets, so it is split off here.
    parts = [p for p in (arg or "").split(",") if p]
    preset = "tpt"
    if parts and "=" not in parts[0]:
        preset = parts.pop(0)
    if preset in POUF_PRESETS:
        return pouf_config(preset, ",".join(parts))
    if preset not in PRESETS:
        presets = sorted([*PRESETS, *POUF_PRESETS])
        raise ValueError(f"unknown adapt preset {preset!r}; presets: {', '.join(presets)}")
    arg = common.parse_arg(
        ",".join(parts),
        dataset="toy_textures",
        seed=0,
        runlocal=False,
        batch_size=8,
        limit=0,
        every=1,
        online=False,
        backbone="",
    )
    p = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.runner = "tpt"  # jaxprompt.app.runners
    c.protocol = "adapt"
    c.preset = preset
    c.seed = arg.seed  # the views of test image i come from fold_in(key(seed), i)
    # The initial prompt: a run directory, or a prompt file (.safetensors from `jaxprompt
    # export`, an old .npz, hf://USER/NAME). Required by the presets that tune a trained prompt.
    c.init_from = ""
    c.needs_init_from = preset in NEEDS_INIT
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
            # "episodic" (TPT: every test image starts from the initial prompt, fresh
            # optimiser state) or "online" (each image starts from the prompt the previous
            # image of the test split ended with; within a batch the images run one after
            # another in test-split order, a scan, so the result is the sequential one).
            "reset": "online" if arg.online else "episodic",
            # online only: carry the AdamW state from image to image too (the online preset
            # does: a fresh state per image makes every step +-lr whatever the gradient; see
            # the module docstring). --config.method.carry_optimizer=false restores the
            # optimiser for every image, as the official loop does (tpt_classification.py:275).
            "carry_optimizer": bool(arg.online),
        }
    )
    c.clip = common.clip_config(arg)
    c.data = ml_collections.ConfigDict(
        {
            "dataset": arg.dataset,
            # "auto": AugMix for the fine-grained datasets, crops + flips for the ImageNet family.
            "augmix": "auto",
            "batch_size": arg.batch_size,  # episodes per step (per host)
            "limit": arg.limit,  # 0: the whole test split; n: its first n images
            # every k-th test image (before the limit): a class-balanced subset of a
            # class-ordered split, for quick estimates
            "every": arg.every,
            # online TPT only: the test split is seen in the order of the permutation
            # np.random.default_rng(stream_seed) (the official loader shuffles, seeded by the
            # run's seed); -1 keeps the stored order, which is class by class for most splits
            "stream_seed": int(arg.seed),
            "data_dir": "",
            "manual_dir": "",
            "split_file": "",
        }
    )
    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
    # jax_default_matmul_precision: "auto" keeps the platform's default (exact float32 on CPU,
    # TF32 on recent NVIDIA GPUs, bfloat16 passes on TPU: fast, but numbers differ across
    # hardware); "highest" makes float32 matmuls exact everywhere (the PyTorch references'
    # numerics; several times slower on TPU). Recorded in results.json.
    c.matmul_precision = "auto"
    c.log_every = 20  # batches
    c.save_every = 50  # batches between progress files (an interrupted run resumes there)
    if arg.runlocal:
        c.method.views = 16
        c.data.limit = arg.limit or 16
        c.log_every = 1
        c.save_every = 1  # a smoke run exercises the resume point too
    return c


def pouf_config(preset, arg=""):
    """POUF presets; ``arg`` is the rest of ``pouf,key=value,...``.

    Keys: ``dataset`` (CLIP: ``folder:PATH`` for an Office-31/Office-Home domain,
    ``DomainNet/<domain>``, a catalog or toy dataset; MLM: ``glue/sst2``, ``glue/mnli``, ...
    or ``csv:PATH``), ``task`` (MLM, for csv files), ``backbone`` (CLIP: ``RN50``,
    ``ViT-B/16``, ..., a hub id or a path), ``seed``, ``runlocal``, ``full``
    (``pouf,full=true`` is ``pouf_full``), ``select_with_target_labels`` (report the best epoch
    by target TEST accuracy too: the reference's selection, label leakage; default off, the
    last step is the result).

    ``pouf_mlm`` follows LM-BFF's protocol (spec 2.3): it runs every seed of ``seeds`` (13,
    21, 42, 87, 100; ``seed`` only when ``--config.seeds='()'``, and alone with ``runlocal``),
    each adapting on that seed's ``data.k_shot`` = 16 per class train split, selecting on its
    16 per class dev split (``select_on_dev``; reported as ``pouf_best_by_dev`` beside the last
    step ``pouf``), and reporting the task's metric on the original evaluation split, per seed
    and as mean / std. There ``select_with_target_labels`` is label leakage (an oracle kept for
    comparison), never the result.
    """
    mlm = preset == "pouf_mlm"
    arg = common.parse_arg(
        arg, dataset="glue/sst2" if mlm else "toy_textures_sketch", task="", seed=1 if not mlm
        else 42, runlocal=False, full=False, select_with_target_labels=False, limit=0,
        **({} if mlm else {"backbone": ""}),
    )  # fmt: skip
    c = ml_collections.ConfigDict()
    c.runner = "pouf_mlm" if mlm else "pouf"  # jaxprompt.app.runners
    c.protocol = "adapt"
    c.preset = preset
    c.seed = arg.seed
    c.select_with_target_labels = arg.select_with_target_labels
    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
    # jax_default_matmul_precision: "auto" keeps the platform's default (exact float32 on CPU,
    # TF32 on recent NVIDIA GPUs, bfloat16 passes on TPU: fast, but numbers differ across
    # hardware); "highest" makes float32 matmuls exact everywhere (the PyTorch references'
    # numerics; several times slower on TPU). Recorded in results.json.
    c.matmul_precision = "auto"
    if mlm:
        # spec 2.2-2.3: CT at t = 10 on tanh-GELU mask features vs label-word decoder rows,
        # 0.6 IM on the label-word logits; AdamW 1e-5, linear decay over 1000 steps, batch 2.
        c.method = ml_collections.ConfigDict({
            "name": "pouf_mlm", "w_transport": 1.0, "w_info": 0.6, "scale": 10.0,
            "feature_gelu": "tanh", "dropout": True,
        })  # fmt: skip
        c.mlm = ml_collections.ConfigDict({"name": "roberta-large"})
        # spec 2.3 (LM-BFF's protocol): per seed, adapt on the k-shot train split (k_shot per
        # class of the full train set, labels dropped), select on the k-shot dev split (the
        # next k_shot per class), test on the original evaluation split (GLUE's dev set).
        # k_shot=0: adapt on the whole train split, the last step is the result.
        c.data = ml_collections.ConfigDict({
            "dataset": arg.dataset, "task": arg.task, "data_dir": "", "limit": arg.limit,
            "k_shot": 16,
        })  # fmt: skip
        # The five LM-BFF split seeds, each also that split's training seed (the reference's
        # split 16-42 trains with seed 42); results.json: per seed, and mean / std. `seed`
        # is used only when this is empty (--config.seeds='()').
        c.seeds = (13, 21, 42, 87, 100)
        # Selection on the labeled k-shot dev split, every eval_every steps (the reference's);
        # the last step is reported too. select_with_target_labels (off) would select on the
        # TEST labels: label leakage, for comparison only.
        c.select_on_dev = True
        c.optim = ml_collections.ConfigDict({"lr": 1e-5, "steps": 1000, "batch_size": 2})
        c.eval_every = 100
        c.eval_batch_size = 32
        c.log_every = 50
        if arg.runlocal:
            c.seeds = (arg.seed,)
            c.optim.steps = 10
            c.eval_every = 5
            c.log_every = 1
        return c
    full = preset == "pouf_full" or arg.full
    # DomainNet targets are read by the POUF runner, not from the catalog is_toy looks in.
    toy = not common.is_domainnet(arg.dataset) and common.is_toy(arg.dataset)
    if full:
        base, base_kwargs = "zeroshot", {"templates": ["a photo of a {}"]}
    else:
        base, base_kwargs = "coop", {"n_ctx": 4, "init_words": "a photo of a"}
    c.method = ml_collections.ConfigDict({
        "name": "pouf", "base": base, "base_kwargs": base_kwargs, "w_transport": 1.0,
        "w_info": 0.3, "train_logit_scale": True, "full_model": full,
    })  # fmt: skip
    # spec 1.8: the EFFECTIVE rates (tllib multipliers x 0.01), Nesterov SGD, coupled L2 1e-3,
    # lr x (1 + 2e-4 t)^-0.75 over global steps; 10 epochs x 500 iterations of 96 images.
    c.optim = ml_collections.ConfigDict({
        "ctx_lr": 1e-3, "logit_scale_lr": 5e-7, "clip_lr": 5e-7, "momentum": 0.9,
        "weight_decay": 1e-3, "gamma": 2e-4, "decay": 0.75, "epochs": 10,
        "iters_per_epoch": 500,
    })  # fmt: skip
    c.clip = common.clip_config(arg, toy=toy)
    c.data = ml_collections.ConfigDict({
        "dataset": arg.dataset, "batch_size": 96, "eval_batch_size": 32,
        # "auto": a folder domain (Office) adapts and tests on all its images (the reference's
        # transductive protocol); other datasets adapt on train and test on test.
        "adapt_split": "auto", "test_split": "auto",
        # spec 1.1 / pitfall 10: square resize to 256 (scaled as 256/224 of the model's image
        # size: 37 px for the toy CLIP's 32), bilinear RandomResizedCrop, flip.
        "augment": "pouf",
        "rrc_scale": (0.5, 1.0) if toy else (0.08, 1.0),
        "limit": arg.limit, "data_dir": "", "manual_dir": "", "split_file": "",
    })  # fmt: skip
    c.log_every = 50
    c.ckpt_keep = 2
    if toy:
        # The toy target split has 1,600 images: 50 iterations of 96 are three passes an
        # epoch (500 would be thirty, minutes of CPU for no gain on a 4-layer model).
        c.optim.iters_per_epoch = 50
    if arg.runlocal:
        c.optim.epochs = 2
        c.optim.iters_per_epoch = 3
        c.data.batch_size = 16
        c.data.limit = arg.limit or 64
        c.log_every = 1
    return c
