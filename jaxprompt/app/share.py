"""``jaxprompt export`` and ``jaxprompt predict``: a run's prompt as one file, and using it.

    jaxprompt export  --workdir DIR [--out FILE]
    jaxprompt predict --prompt FILE --classes a,b,c|classes.txt [--clip NAME] [--top_k 5]
                      [--json] IMAGES_OR_FOLDER...

``export`` writes ``DIR/prompt.safetensors`` by default (format: :mod:`jaxprompt.share`).
``predict`` rebuilds the method from the file, loads the backbone the file names (or
``--clip``, which must be the same backbone), and prints each image's top-k classes among
the given names. Every bad input is a one-line error with exit code 2, and nothing is written.
Prompts of test-time methods (TPT) are not supported by ``predict`` yet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from jaxprompt.app import flags as flags_lib

DEFAULT_NAME = "prompt.safetensors"
_BATCH = 32  # images per forward pass in predict


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line FlagErrors (argparse prints usage and exits)."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse's hook
        raise flags_lib.FlagError(message)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def export_meta(workdir: str, meta: Mapping[str, Any], clip: Any) -> dict[str, Any]:
    """The prompt file's header from a run's checkpoint meta, results and backbone.

    Args:
      workdir: the run directory (its ``results.json`` gives the accuracies when present).
      meta: the checkpoint meta (``method``, ``method_config``, ``config``, ...).
      clip: the run's backbone, for its fingerprint.
    """
    from jaxprompt import share

    cfg = meta.get("config") or {}
    data = cfg.get("data") or {}
    results_path = epath.Path(workdir) / "results.json"
    record = json.loads(results_path.read_text()) if results_path.exists() else {}
    dataset = meta.get("dataset", data.get("dataset"))
    extra = {
        "protocol": record.get("protocol", cfg.get("protocol")),
        "dataset": dataset,
        # The hand-crafted template the run's tasks carried (zero-shot with
        # templates="dataset" reads it), so predict builds the same task.
        "template": _dataset_template(dataset),
        "shots": data.get("shots"),
        "seed": cfg.get("seed"),
        "results": record.get("accuracy"),
        "step": meta.get("step"),
    }
    return share.prompt_meta(
        method=str(meta["method"]),
        method_config=dict(meta.get("method_config") or {}),
        backbone_name=str((cfg.get("clip") or {}).get("name") or meta.get("model") or ""),
        fingerprint=share.backbone_fingerprint(clip),
        classnames=list(meta.get("classnames") or []),
        extra={k: v for k, v in extra.items() if v is not None},
    )


def _dataset_template(name: str | None) -> str | None:
    from jaxprompt.data import catalog

    try:
        return catalog.get_dataset(str(name)).template if name else None
    except (KeyError, ValueError):  # a dataset this install does not know: no template
        return None


def export_run(workdir: str, out: str | None = None) -> str:
    """Exports the newest readable checkpoint of ``workdir`` as one ``.safetensors`` file.

    Everything is read and checked first (checkpoint, method, backbone); the file is
    written last, to a temporary name then renamed.

    Returns:
      The path written.

    Raises:
      FileNotFoundError: no run directory or no checkpoint in it.
      ValueError: a checkpoint that names no method.
      ClipLoadError: the backbone (needed for its fingerprint) cannot be loaded.
    """
    from jaxprompt import checkpoint, share
    from jaxprompt.app import experiment

    if not epath.Path(workdir).is_dir():
        raise FileNotFoundError(f"no run directory {workdir}")
    if checkpoint.latest_step(workdir) is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint: train the run first")
    prompt, meta = checkpoint.load_prompt(workdir)
    if "method" not in meta:
        raise ValueError(f"the checkpoint in {workdir} names no method: it cannot be exported")
    cfg_clip = (meta.get("config") or {}).get("clip") or {}
    name = cfg_clip.get("name") or meta.get("model")
    if not name:
        raise ValueError(f"the checkpoint in {workdir} names no backbone: it cannot be exported")
    clip = experiment.resolve_clip(str(name), str(cfg_clip.get("dtype") or "float32"))
    header = export_meta(workdir, meta, clip)
    out = out or os.fspath(epath.Path(workdir) / DEFAULT_NAME)
    return share.save_prompt(out, prompt, header)


def export_main(args: list[str]) -> int:
    """``jaxprompt export``: returns the exit code."""
    from jaxprompt.app import runners

    ap = _Parser(prog="jaxprompt export", description="Exports a run's prompt as one file.")
    ap.add_argument("--workdir", required=True, help="the run directory")
    ap.add_argument("--out", default=None, help=f"file to write (default DIR/{DEFAULT_NAME})")
    if any(a in ("-h", "--help") for a in args):
        ap.print_help()  # argparse's own --help would raise SystemExit inside cli.main
        return 0
    try:
        ns = ap.parse_args(args)
        path = export_run(ns.workdir, ns.out)
    except runners.USER_ERRORS as e:
        return flags_lib.fail(flags_lib.one_line(e))
    print(path)
    return 0


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------


def parse_classes(value: str) -> list[str]:
    """``a,b,c`` or a text file with one class name per line -> the class names."""
    if os.path.isfile(value):
        with open(value) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise flags_lib.FlagError(f"--classes {value!r} gives no class names")
    if len(set(names)) != len(names):
        raise flags_lib.FlagError("--classes has a class name twice")
    return names


def list_images(paths: Sequence[str]) -> list[str]:
    """Image files among ``paths``: files as given, folders walked (sorted, hidden skipped)."""
    from jaxprompt.data import folder

    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out += [os.path.join(p, rel) for rel in folder._list_images(p)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"no image or folder {p}")
    if not out:
        raise FileNotFoundError(f"no images in {', '.join(paths)}")
    return out


def _load_image(path: str, size: int) -> Any:
    """One image through the data pipeline's eval transform; a ValueError if undecodable."""
    from jaxprompt import data

    with open(path, "rb") as f:
        raw = f.read()
    try:
        return data.eval_transform(raw, size)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a non-image
        raise ValueError(f"cannot read {path} as an image ({type(e).__name__})") from e


def top_k(probs: Any, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable ``(name, probability)`` of one image, most probable first."""
    order = sorted(range(len(names)), key=lambda i: -float(probs[i]))[:k]
    return [(names[i], float(probs[i])) for i in order]


def predict(
    *,
    prompt_path: str,
    classes: Sequence[str],
    images: Sequence[str],
    clip_name: str | None = None,
    seed: int = 0,
) -> tuple[list[str], Any]:
    """Class probabilities of image files under a shared prompt.

    Returns:
      ``(image paths, probabilities [N, C] numpy float32)``.

    Raises:
      BackboneMismatchError: ``clip_name`` is not the backbone the prompt was learned on.
      ValueError: a prompt of a method predict does not support (TPT).
    """
    import jax
    import numpy as np

    from jaxprompt import clip as clip_lib
    from jaxprompt import share
    from jaxprompt.app import experiment

    paths = list_images(images)
    meta = share.read_prompt_file(prompt_path)[1]  # TPT and the backbone, before loading
    if meta.get("method") == "tpt":
        raise ValueError("predict does not support TPT prompts yet (test-time tuning per image)")
    name = clip_name or (meta.get("backbone") or {}).get("name") or meta.get("model")
    if not name:
        raise ValueError(f"{prompt_path} names no backbone: pass --clip")
    clip = experiment.resolve_clip(str(name))
    method, prompt, meta = share.load_prompt(prompt_path, clip=clip)
    task = clip_lib.make_task(clip, list(classes), template=meta.get("template"))
    logits_fn = jax.jit(lambda p, c, t, x, k: method.logits(p, c, t, x, key=k))
    key = jax.random.key(seed)
    out = []
    for i in range(0, len(paths), _BATCH):
        chunk = paths[i : i + _BATCH]
        x = np.stack([_load_image(p, clip.spec.image_size) for p in chunk])
        out.append(np.asarray(jax.nn.softmax(logits_fn(prompt, clip, task, x, key), axis=-1)))
    return paths, np.concatenate(out).astype(np.float32)


def predict_main(args: list[str]) -> int:
    """``jaxprompt predict``: returns the exit code."""
    from jaxprompt.app import runners

    ap = _Parser(prog="jaxprompt predict", description="Classifies images with a shared prompt.")
    ap.add_argument("--prompt", required=True, help="a .safetensors prompt (or old .npz)")
    ap.add_argument("--classes", required=True, help="a,b,c or a file with one name per line")
    ap.add_argument("--clip", default=None, help="the backbone (default: the file's)")
    ap.add_argument("--top_k", type=int, default=5, help="labels printed per image")
    ap.add_argument("--json", action="store_true", help="one JSON object per image")
    ap.add_argument("images", nargs="+", help="image files or folders")
    if any(a in ("-h", "--help") for a in args):
        ap.print_help()
        return 0
    try:
        ns = ap.parse_args(args)
        if ns.top_k < 1:
            raise flags_lib.FlagError("--top_k must be at least 1")
        names = parse_classes(ns.classes)
        paths, probs = predict(
            prompt_path=ns.prompt, classes=names, images=ns.images, clip_name=ns.clip
        )
    except runners.USER_ERRORS as e:
        return flags_lib.fail(flags_lib.one_line(e))
    k = min(ns.top_k, len(names))
    for path, p in zip(paths, probs, strict=True):
        best = top_k(p, names, k)
        if ns.json:
            rec = {
                "image": path,
                "top_k": [{"label": n, "prob": round(v, 6)} for n, v in best],
                "probs": {n: round(float(v), 6) for n, v in zip(names, p, strict=True)},
            }
            print(json.dumps(rec))
        else:
            print(f"{path}\t" + "\t".join(f"{n} {v:.3f}" for n, v in best))
    sys.stdout.flush()
    return 0
