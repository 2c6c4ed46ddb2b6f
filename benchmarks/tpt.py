"""TPT episodes at ViT-B/16 or RN50 shapes: images per second and FLOPs against the reference.

Random weights with ViT-B/16 shapes (vision 768 wide, 12 layers, 224 px, patch 16; text 512
wide, 12 layers, context 77), or with ``--preset rn50`` OpenAI's ResNet-50 CLIP (the TPT
paper's main backbone: modified ResNet-50 at 224 px, 1024-d embedding, the same text tower);
C ImageNet class names (default 200, ImageNet-A's size), the CoOp "a photo of a" prompt
(4 tokens), 64 views per image, 6 kept, one AdamW step. Prints one JSON line.

FLOPs come from XLA's cost analysis of the compiled programs (``compiled.cost_analysis()``):

* ours: the jitted :func:`jaxprompt.methods.tpt.episodes` for a batch of B images, divided by
  B. It holds one image-tower call on the B x 64 views, the shared text forward of the initial
  prompt (with the rematerialised recomputation in its backward pass), B text backward passes
  and B text forwards with the tuned prompts, all at the task's truncated length.
* reference (azshue/TPT's order of work): per image, the text tower three times over C
  prompts at 77 tokens (forward, backward counted as one more forward of work, as the brief
  defines it, and the forward with the tuned prompt) plus the image tower on 64 views. Each term
  is the cost analysis of our own encoder on those shapes.

``flops_ratio`` = reference / ours per image at the largest batch.

Timing runs the compiled episodes on random views. On a CPU one image is tens of seconds at
these shapes, so by default only batches 1 and 2 are timed there (``--time-batches`` to change);
accelerators time 1, 4 and 16. The JSON says which platform the numbers are from.

    python benchmarks/tpt.py                     # 200 classes
    python benchmarks/tpt.py --classes 1000 --time-batches 1
    python benchmarks/tpt.py --preset rn50       # TPT's RN50 table
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import testing
from jaxprompt.methods.tpt import adamw_torch, episodes


def classnames(n: int) -> list[str]:
    text = resources.files("jaxprompt").joinpath("assets/imagenet_classnames.txt").read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    # Spread over the label space (the first n are all fish and birds).
    return [names[i] for i in np.linspace(0, len(names) - 1, n).astype(int)]


def flops(compiled: Any) -> float:
    """Total FLOPs of a compiled XLA program (cost analysis; a dict, or a list of one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def padded_task(task: jp.Task, length: int, eot_id: int) -> jp.Task:
    """The task padded with EOT to ``length`` class tokens (an untruncated text tower)."""
    ids = np.full((len(task), length), eot_id, np.int32)
    ids[:, : task.token_ids.shape[1]] = np.asarray(task.token_ids)
    return task.replace(token_ids=jnp.asarray(ids))


def reference_flops(clip: jp.Clip, task: jp.Task, prompt: Any, views: int) -> dict[str, float]:
    """Per-image FLOPs of the reference's order of work (see the module docstring)."""
    n_ctx = prompt["ctx"].shape[0]
    full = padded_task(task, clip.spec.context_length - 1 - n_ctx, clip.spec.eot_id)

    def text(p, c, t):
        embeds, eot = clip_lib.prompted_text_inputs(c, t, p["ctx"])
        return clip_lib.encode_text(c, embeds, eot)

    size = clip.spec.image_size
    img = jax.ShapeDtypeStruct((views, size, size, 3), jnp.float32)
    t77 = flops(jax.jit(text).lower(prompt, clip, full).compile())
    i64 = flops(jax.jit(clip_lib.encode_image).lower(clip, img).compile())
    return {"text_77": t77, "image_views": i64, "total": 3 * t77 + i64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--batches", default="1,4,16", help="batch sizes whose FLOPs are analysed")
    ap.add_argument("--time-batches", default=None, help="batch sizes timed (default by platform)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--preset",
        default="vit-b/16",
        help="model shapes: vit-b/16, rn50 (OpenAI's ResNet-50 CLIP, TPT's main backbone), "
        "tiny or rn-tiny (quick checks)",
    )
    args = ap.parse_args()
    platform = jax.devices()[0].platform
    flop_batches = [int(b) for b in args.batches.split(",")]
    timed = args.time_batches or ("1,2" if platform == "cpu" else "1,4,16")
    time_batches = [int(b) for b in timed.split(",") if b]

    names = classnames(args.classes)
    t = time.perf_counter()
    if args.preset in testing.RESNET_PRESETS:
        # TPT's headline backbone: OpenAI's RN50 (random weights in its layout, its BPE vocab).
        sd = testing.random_openai_resnet(args.preset)
        clip = clip_lib.from_openai_state_dict(sd, name=args.preset)
    else:
        with tempfile.TemporaryDirectory() as d:
            testing.save_random_clip(d, words=names + ["a photo of a"], preset=args.preset)
            clip = jp.load_clip(d)
    build_s = time.perf_counter() - t
    task = jp.make_task(clip, names)
    base = jp.methods.coop(n_ctx=4, init_words="a photo of a", remat=True)
    tx = adamw_torch()
    prompt = base.init(jax.random.key(0), clip, task)
    size = clip.spec.image_size
    fn = jax.jit(lambda p, c, t, v: episodes(base, tx, p, c, t, v))

    ours: dict[str, float] = {}
    compiled: dict[int, Any] = {}
    compile_s: dict[str, float] = {}
    for b in sorted(set(flop_batches) | set(time_batches)):
        spec = jax.ShapeDtypeStruct((b, args.views, size, size, 3), jnp.float32)
        t = time.perf_counter()
        compiled[b] = fn.lower(prompt, clip, task, spec).compile()
        compile_s[str(b)] = round(time.perf_counter() - t, 1)
        if b in flop_batches:
            ours[str(b)] = flops(compiled[b]) / b
    ref = reference_flops(clip, task, prompt, args.views)

    ips: dict[str, float] = {}
    rng = np.random.RandomState(0)
    for b in time_batches:
        views = jnp.asarray(rng.randn(b, args.views, size, size, 3).astype(np.float32))
        jax.block_until_ready(compiled[b](prompt, clip, task, views))  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(compiled[b](prompt, clip, task, views))
            best = min(best, time.perf_counter() - t)
        ips[str(b)] = round(b / best, 4)

    largest = str(max(flop_batches))
    print(
        json.dumps(
            {
                "benchmark": "tpt_episodes",
                "platform": platform,
                "device_kind": jax.devices()[0].device_kind,
                "devices": len(jax.devices()),
                "shapes": f"{args.preset} (random weights)",
                "classes": args.classes,
                "views": args.views,
                "text_tokens": int(1 + 4 + task.token_ids.shape[1]),
                "images_per_second": ips,
                "gflops_per_image": {k: round(v / 1e9, 1) for k, v in ours.items()},
                "reference_gflops_per_image": round(ref["total"] / 1e9, 1),
                "reference_terms_gflops": {
                    "text_tower_77_tokens_x1": round(ref["text_77"] / 1e9, 1),
                    "image_tower_views": round(ref["image_views"] / 1e9, 1),
                },
                "flops_ratio_by_batch": {k: round(ref["total"] / v, 3) for k, v in ours.items()},
                "flops_ratio": round(ref["total"] / ours[largest], 3),
                "compile_s": compile_s,
                "build_clip_s": round(build_s, 1),
            }
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
