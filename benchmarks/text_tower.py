"""Forward+backward time of the prompted text tower, with and without EOT truncation.

ViT-B/16 text shapes (width 512, 12 layers, 8 heads, context 77) with random weights, C class
prompts "[SOT] ctx x4 <name>." of real ImageNet class names, gradient with respect to the
context (what every prompt learner computes each step). Prints one JSON line.

No real CLIP BPE vocabulary is available offline, so token counts are bracketed: a word-level
vocabulary (every word one token: shorter than BPE) and a character-level one (every character
one token: longer than BPE). Real BPE prompts fall in between, and so does their speedup.

    python benchmarks/text_tower.py --classes 100
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


def build_clip(directory: str, words: list[str]) -> jp.Clip:
    # Only the text tower is measured: keep the vision tower minimal to save init time.
    testing.save_random_clip(
        directory,
        words=words,
        preset="vit-b/16",
        vision_layers=1,
        vision_width=64,
        vision_heads=4,
        image_size=32,
        patch_size=16,
    )
    return jp.load_clip(directory)


def compiled_grad(clip: jp.Clip, task: jp.Task, ctx: jax.Array):
    """The jitted value-and-grad of a loss on the prompted text features, compiled."""

    def loss(ctx, clip, task):
        embeds, eot = clip_lib.prompted_text_inputs(clip, task, ctx)
        feats = clip_lib.normalize(clip_lib.encode_text(clip, embeds, eot))
        return jnp.sum(feats[:, 0])

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(ctx, clip, task))  # compile
    return lambda: jax.block_until_ready(step(ctx, clip, task))


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
    ap.add_argument("--n-ctx", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    names = classnames(args.classes)
    result = {
        "benchmark": "text_tower",
        "shapes": "ViT-B/16 text (512 wide, 12 layers), random weights",
        "classes": args.classes,
        "n_ctx": args.n_ctx,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }
    vocabularies = {"word": [f"a photo of a {n}" for n in names], "char": []}
    for label, words in vocabularies.items():
        with tempfile.TemporaryDirectory() as d:
            clip = build_clip(d, words)
            task = jp.make_task(clip, names)
            ctx = 0.02 * jax.random.normal(jax.random.key(0), (args.n_ctx, 512))
            full = padded(task, clip, args.n_ctx)
            t = interleaved(
                {
                    "trunc": compiled_grad(clip, task, ctx),
                    "full": compiled_grad(clip, full, ctx),
                },
                args.repeats,
            )
            t_trunc, t_full = t["trunc"], t["full"]
        result[f"{label}_tokens"] = 1 + args.n_ctx + int(task.token_ids.shape[1])
        result[f"{label}_truncated_s"] = round(t_trunc, 4)
        result[f"{label}_full_s"] = round(t_full, 4)
        result[f"{label}_speedup"] = round(t_full / t_trunc, 2)
    # The headline number: the conservative (longer, character-level) prompts.
    result["speedup"] = result["char_speedup"]
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
