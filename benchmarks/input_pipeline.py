"""Eval-preprocessing throughput of the host input pipeline, as one JSON line.

Writes a synthetic image folder (JPEGs of ImageNet-like sizes) to a temp dir, then times
``eval_iterator`` (decode + PIL bicubic resize + center crop + CLIP normalise, grain threads).

    python benchmarks/input_pipeline.py [--images 512] [--batch 64] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from jaxprompt import data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        for c in range(4):
            os.makedirs(os.path.join(root, f"c{c}"))
        for i in range(args.images):
            h, w = int(rng.integers(300, 500)), int(rng.integers(300, 500))
            # Smooth content so JPEG sizes are realistic (noise would be unusually large).
            base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
            img.save(os.path.join(root, f"c{i % 4}", f"{i:05d}.jpg"), quality=90)
        ds = data.load_dataset(f"folder:{root}", data_dir=os.path.join(root, "_none"))
        examples = [x for xs in ds.split.values() for x in xs]
        kw = dict(batch_size=args.batch, shard=(0, 1), num_threads=args.threads)
        next(data.eval_iterator(examples[: args.batch], ds.fetch, **kw))  # warm up
        start = time.perf_counter()
        n = 0
        for batch in data.eval_iterator(examples, ds.fetch, **kw):
            n += int(batch["mask"].sum())
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "benchmark": "input_pipeline/eval_preprocessing",
                "images": n,
                "batch_size": args.batch,
                "threads": args.threads,
                "cpus": os.cpu_count(),
                "seconds": round(seconds, 3),
                "images_per_second": round(n / seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
