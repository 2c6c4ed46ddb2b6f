"""Forward+backward time of the prompted text tower: EOT truncation and prefix sharing.

ViT-B/16 text shapes (width 512, 12 layers, 8 heads, context 77) with random weights, C class
prompts "[SOT] ctx <name>." of real ImageNet class names, gradient with respect to the
context (what every prompt learner computes each step). Prints one JSON line.

Two measurements, each comparing two implementations in the same process (interleaved, so
machine load hits both alike):

* truncation (``--n-ctx``, 4 by default): sequences cut after the last EOT vs padded to 77.
* prefix sharing (``--prefix-ctx``, CoOp's 16 by default): ``[SOT] ctx`` encoded once for all
  classes (:func:`jaxprompt.clip.encode_text_shared`) vs once per class; both truncated.
  ``prefix_speedup`` is plain time / shared time.

No real CLIP BPE vocabulary is available offline, so token counts are bracketed: a word-level
vocabulary (every word one token: shorter than BPE) and a character-level one (every character
one token: longer than BPE). Real BPE prompts fall in between, and so does their speedup.

    python benchmarks/text_tower.py --classes 100
    python benchmarks/text_tower.py --only prefix --classes 1000   # the issue's setting
    python benchmarks/text_tower.py --only cocoop --classes 100    # CoCoOp step temporaries
    python benchmarks/text_tower.py --only bayes --classes 100     # Bayesian prompts, L = 10
    python benchmarks/text_tower.py --only memory --classes 1000 --vocab word  # both, the issue's

The memory modes compile (do not run) one training step (value_and_grad of the method's loss),
batch ``--batch`` (4), context ``--n-ctx`` (4), remat on, shared vs plain, and report XLA's
temporaries in MiB. ``--only cocoop``: CoCoOp, ``cocoop_memory`` = plain / shared. ``--only
bayes``: Bayesian prompts with ``--mc-samples`` (10, the method's default) Monte Carlo samples,
the unconditional posterior (``bayes_memory``) and the conditional one (``bayes_cond_memory``,
B x L prefix groups; ``--bayes-variants`` picks one). ``--only memory`` runs both. The
``*_shared_temp_mib`` / ``*_plain_temp_mib`` keys carry the two paths' figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import testing


def classnames(n: int) -> list[str]:
    text = resources.files("jaxprompt").joinpath("assets/imagenet_classnames.txt").read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    # Spread over the label space rather than taking the first n (all fish and birds).
    idx = np.linspace(0, len(names) - 1, n).astype(int)
    return [names[i] for i in idx]


def build_clip(directory: str, words: list[str], preset: str, dtype: str = "float32") -> jp.Clip:
    # Only the text tower is measured: keep the vision tower minimal to save init time.
    testing.save_random_clip(
        directory,
        words=words,
        preset=preset,
        vision_layers=1,
        vision_width=64,
        vision_heads=4,
        image_size=32,
        patch_size=16,
    )
    return jp.load_clip(directory, dtype=dtype)


def compiled_grad(clip: jp.Clip, task: jp.Task, ctx: jax.Array, *, shared_prefix: bool = False):
    """The jitted value-and-grad of a loss on the prompted text features, compiled."""

    def loss(ctx, clip, task):
        feats = clip_lib.prompted_text_features(clip, task, ctx, shared_prefix=shared_prefix)
        return jnp.sum(clip_lib.normalize(feats)[:, 0])

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(ctx, clip, task))  # compile
    return lambda: jax.block_until_ready(step(ctx, clip, task))


def step_temp_bytes(method, clip: jp.Clip, task: jp.Task, *, batch: int) -> int:
    """XLA temporaries of one training step (value_and_grad of ``method.loss``), compile only."""
    prompt = method.init(jax.random.key(0), clip, task)
    size = clip.spec.image_size
    data = {
        "image": jnp.zeros((batch, size, size, 3), jnp.float32),
        "label": jnp.arange(batch, dtype=jnp.int32) % len(task),
    }

    def loss(prompt, clip, task, data):
        return method.loss(prompt, clip, task, data, jax.random.key(1))[0]

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(prompt, clip, task, data).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def cocoop_temp_bytes(
    clip: jp.Clip, task: jp.Task, *, batch: int, n_ctx: int, shared_prefix: bool
) -> int:
    """XLA temporaries of a CoCoOp train step (value_and_grad of the loss), compile only.

    CoCoOp runs B x C text sequences per step (one context per image), so its step is the one
    whose memory the prefix sharing (one prefix group per image) should cut most.
    """
    method = jp.methods.cocoop(n_ctx, init_words=None, shared_prefix=shared_prefix)
    return step_temp_bytes(method, clip, task, batch=batch)


def bayes_temp_bytes(
    clip: jp.Clip,
    task: jp.Task,
    *,
    batch: int,
    n_ctx: int,
    mc_samples: int,
    conditional: bool,
    shared_prefix: bool,
) -> int:
    """XLA temporaries of a Bayesian-prompt train step, compile only.

    The method's defaults otherwise (remat on, no chunking): L x C text sequences per step
    (unconditional, one prefix group per sample) or B x L x C (conditional, one per sample and
    image).
    """
    method = jp.methods.bayes(
        n_ctx,
        init_words=None,
        mc_samples=mc_samples,
        conditional=conditional,
        shared_prefix=shared_prefix,
    )
    return step_temp_bytes(method, clip, task, batch=batch)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per function, alternating them so machine load hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def padded(task: jp.Task, clip: jp.Clip, n_ctx: int) -> jp.Task:
    """The same task padded to the full context (what an untruncated implementation runs)."""
    width = clip.spec.context_length - 1 - n_ctx
    ids = np.full((len(task), width), clip.spec.eot_id, np.int32)
    ids[:, : task.token_ids.shape[1]] = np.asarray(task.token_ids)
    return task.replace(token_ids=jnp.asarray(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--n-ctx", type=int, default=4, help="context of the truncation runs")
    ap.add_argument("--prefix-ctx", type=int, default=16, help="context of the prefix runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--only",
        choices=("all", "truncation", "prefix", "cocoop", "bayes", "memory"),
        default="all",
    )
    ap.add_argument("--batch", type=int, default=4, help="images per step (memory modes)")
    ap.add_argument("--mc-samples", type=int, default=10, help="Bayes Monte Carlo samples")
    ap.add_argument(
        "--bayes-variants",
        choices=("both", "unconditional", "conditional"),
        default="both",
        help="which Bayesian posteriors --only bayes / memory measures",
    )
    ap.add_argument("--preset", choices=("vit-b/16", "tiny"), default="vit-b/16")
    ap.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="frozen towers' dtype"
    )
    ap.add_argument(
        "--vocab", choices=("both", "word", "char"), default="both", help="token-count brackets"
    )
    args = ap.parse_args()
    names = classnames(args.classes)
    result = {
        "benchmark": "text_tower",
        "shapes": f"{args.preset} text, random weights",
        "classes": args.classes,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "dtype": args.dtype,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
    }
    vocabularies = {"word": [f"a photo of a {n}" for n in names], "char": []}
    if args.vocab != "both":
        vocabularies = {args.vocab: vocabularies[args.vocab]}
    for label, words in vocabularies.items():
        with tempfile.TemporaryDirectory() as d:
            clip = build_clip(d, words, args.preset, args.dtype)
            task = jp.make_task(clip, names)
            width = clip.spec.text_width
            if args.only in ("all", "truncation"):
                ctx = 0.02 * jax.random.normal(jax.random.key(0), (args.n_ctx, width))
                full = padded(task, clip, args.n_ctx)
                t = interleaved(
                    {
                        "trunc": compiled_grad(clip, task, ctx),
                        "full": compiled_grad(clip, full, ctx),
                    },
                    args.repeats,
                )
                result["n_ctx"] = args.n_ctx
                result[f"{label}_tokens"] = 1 + args.n_ctx + int(task.token_ids.shape[1])
                result[f"{label}_truncated_s"] = round(t["trunc"], 4)
                result[f"{label}_full_s"] = round(t["full"], 4)
                result[f"{label}_speedup"] = round(t["full"] / t["trunc"], 2)
            if args.only in ("all", "prefix"):
                ctx = 0.02 * jax.random.normal(jax.random.key(0), (args.prefix_ctx, width))
                t = interleaved(
                    {
                        "shared": compiled_grad(clip, task, ctx, shared_prefix=True),
                        "plain": compiled_grad(clip, task, ctx, shared_prefix=False),
                    },
                    args.repeats,
                )
                result["prefix_ctx"] = args.prefix_ctx
                # Prefix (start token and context) and the longest class suffix.
                result[f"{label}_prefix_tokens"] = 1 + args.prefix_ctx
                result[f"{label}_suffix_tokens"] = int(task.token_ids.shape[1])
                result[f"{label}_plain_s"] = round(t["plain"], 4)
                result[f"{label}_shared_s"] = round(t["shared"], 4)
                result[f"{label}_prefix_speedup"] = round(t["plain"] / t["shared"], 2)
            if args.only in ("cocoop", "memory"):
                # Compile only (no run): the temporaries XLA plans for one training step.
                mem = {
                    k: cocoop_temp_bytes(
                        clip, task, batch=args.batch, n_ctx=args.n_ctx, shared_prefix=k == "shared"
                    )
                    for k in ("shared", "plain")
                }
                result["batch"] = args.batch
                result["n_ctx"] = args.n_ctx
                result[f"{label}_cocoop_shared_temp_mib"] = round(mem["shared"] / 2**20, 1)
                result[f"{label}_cocoop_plain_temp_mib"] = round(mem["plain"] / 2**20, 1)
                result[f"{label}_cocoop_memory"] = round(mem["plain"] / mem["shared"], 2)
            if args.only in ("bayes", "memory"):
                variants = {"bayes": False, "bayes_cond": True}
                if args.bayes_variants != "both":
                    variants = {
                        k: v
                        for k, v in variants.items()
                        if v == (args.bayes_variants == "conditional")
                    }
                for name, conditional in variants.items():
                    mem = {
                        k: bayes_temp_bytes(
                            clip,
                            task,
                            batch=args.batch,
                            n_ctx=args.n_ctx,
                            mc_samples=args.mc_samples,
                            conditional=conditional,
                            shared_prefix=k == "shared",
                        )
                        for k in ("shared", "plain")
                    }
                    result[f"{label}_{name}_shared_temp_mib"] = round(mem["shared"] / 2**20, 1)
                    result[f"{label}_{name}_plain_temp_mib"] = round(mem["plain"] / 2**20, 1)
                    result[f"{label}_{name}_memory"] = round(mem["plain"] / mem["shared"], 2)
                result["batch"] = args.batch
                result["n_ctx"] = args.n_ctx
                result["mc_samples"] = args.mc_samples
    # The headline numbers: the conservative prompts (character-level: longer, so the least
    # to gain from either), or the only vocabulary measured.
    head = "char" if "char" in vocabularies else next(iter(vocabularies))
    for key in ("speedup", "prefix_speedup", "cocoop_memory", "bayes_memory", "bayes_cond_memory"):
        if f"{head}_{key}" in result:
            result[key] = result[f"{head}_{key}"]
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
