"""Train-step time, FLOPs and MFU of CoOp, CoCoOp, IVLP, MaPLe and PromptSRC at ViT-B/16 shapes.

Random weights with ViT-B/16 shapes (vision 768 wide, 12 layers, 224 px, patch 16; text 512
wide, 12 layers), real ImageNet class names spread over the label space, batch 4, each method
with its published base-to-novel hyperparameters (``METHOD_PRESETS`` of ``configs/common.py``:
CoOp 16 random context tokens; CoCoOp "a photo of a"; IVLP and PromptSRC depth 9, 4 + 4
tokens; MaPLe depth 9, 2 tokens) and optimizer (SGD, momentum 0.9, weight decay 5e-4, the
per-epoch warm-up + cosine schedule). The step is the library's own
:func:`jaxprompt.train.make_train_step` with the on-device training augmentation (random
resized crop of a 512 px uint8 canvas, flip, normalise) as ``jaxprompt train`` runs it, jitted
with the state donated. Prints one JSON line per (method, class count) on stdout; progress goes
to stderr.

* Two text paths (``--paths``, both by default): ``shared``, the prefix-shared text encoder
  every method uses by default (``[SOT] ctx`` encoded once per prefix group, the class suffixes
  attending to its cached keys and values), and ``plain``, every class's full sequence
  (``shared_prefix=False``, the pre-issue-16 path). Both are compiled and their steps
  alternate, so machine load hits both alike. The first path's figures are the line's
  top-level keys; the other's sit under its name (``"plain": {...}``), and
  ``prefix_step_speedup`` (plain / shared step time), ``prefix_flops_ratio`` and
  ``prefix_temp_ratio`` compare them.
* ``step_s``: median of ``--steps`` timed steps after one warm-up step; ``compile_s``: the
  ahead-of-time ``lower().compile()`` of the step, timed separately.
* ``flops``: XLA's cost analysis of the compiled step (``flops_source`` "xla"). It counts what
  the program executes, so a rematerialised tower's recomputed forward pass is included (CoCoOp
  rematerialises its text tower by default). XLA counts a loop's body once, not once per trip,
  so for a step with a loop (the prefix-shared text tower runs its layers as a ``lax.scan``
  under remat) ``flops`` is the analytic count instead (``flops_source`` "analytic ...", XLA's
  own figure kept as ``flops_xla``). ``flops_analytic`` is an independent matmul-only count of
  the same work (transformer layers, patch embedding, projections: 24 N L D^2 + 4 N L^2 D per
  layer forward; backward to the inputs only, as CLIP gets no gradient: 24 N L D^2 + 8 N L^2 D;
  plus, where rematerialised, the forward again less the second MLP matmul, whose output no
  gradient needs); ``flops_analytic_model`` leaves the recomputation out (the usual "model
  FLOPs"); ``xla_over_analytic`` is their ratio (a little above 1: XLA also counts elementwise
  work and the augmentation).
* ``peak_tflops_per_s``: the best of several runs of jitted n x n matmuls (2 n^3 FLOPs) in
  the towers' ``--dtype`` on the same device, measured in the same process at the start and
  again after every line (best so far: a busy moment cannot lower it);
  ``mfu = flops / step_s / peak`` and
  ``mfu_model_analytic`` the same with the analytic model FLOPs. ``loadavg_1m`` records other
  work on the machine.
* PromptSRC also reports ``teacher_seconds_<C>`` for each ``--teacher-classes`` count C (100
  by default; ``--teacher-classes 100 1000`` for both of the issue's sizes): building the
  frozen 60-template teacher text features with
  :func:`jaxprompt.methods.promptsrc.teacher_text_features`, jitted as ``with_teacher`` does,
  on each path (``teacher_seconds_plain_<C>``; ``teacher_speedup_<C>`` is their ratio); compile
  time separately. Inside the timed step the teacher is a cached [C, E] constant, as
  with ``with_teacher``, but filled with random unit vectors (computing it for 1000 classes,
  60,000 sequences, would take longer than the step benchmark itself and is not part of a
  step).
* ``temp_gib``: XLA's temporary buffers of the compiled step (``memory_analysis``), and
  ``max_rss_gib`` the process's peak resident memory so far (it only grows across lines).
  ``--compile-only`` prints these (and the FLOPs) without running a step: a memory check
  before a long run.

No real CLIP BPE vocabulary is available offline: the tokenizer is word-level (every word of
the class names and templates one token), so class prompts are somewhat shorter than with BPE.
On a CPU, CoCoOp at 1000 classes (4 x 1000 prompted sequences forward, backward and
rematerialised) takes minutes per step and XLA's CPU compiler gives its step 16.4 GiB of
temporary buffers (the process peaked at 20.3 GiB); ``--methods`` selects a subset.

    python benchmarks/train_step.py                                 # 5 methods x 50, 1000 classes
    python benchmarks/train_step.py --methods promptsrc --classes 50 --teacher-classes 100 1000
    python benchmarks/train_step.py --methods coop promptsrc --classes 100 --steps 5
    python benchmarks/train_step.py --preset tiny --classes 5       # a quick check (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import templates as templates_lib
from jaxprompt import testing
from jaxprompt import train as train_lib
from jaxprompt.data import augment as augment_lib
from jaxprompt.methods.promptsrc import TEACHER_KEY, teacher_text_features

METHODS = ("coop", "cocoop", "ivlp", "maple", "promptsrc")
REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def presets() -> dict[str, dict]:
    """The published per-method recipes, read from ``configs/common.py`` (one source of truth)."""
    spec = importlib.util.spec_from_file_location("_jp_configs_common", REPO / "configs/common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.METHOD_PRESETS


def all_classnames() -> list[str]:
    text = resources.files("jaxprompt").joinpath("assets/imagenet_classnames.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def classnames(n: int) -> list[str]:
    names = all_classnames()
    # Spread over the label space (the first n are all fish and birds).
    return [names[i] for i in np.linspace(0, len(names) - 1, n).astype(int)]


def flops_of(compiled: Any) -> float:
    """Total FLOPs of a compiled XLA program (cost analysis; a dict, or a list of one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def temp_gib(compiled: Any) -> float | None:
    try:
        return round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)
    except Exception:  # not every backend implements it
        return None


def host_cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float | None:
    """The 1-minute load average (other work on the machine skews the times)."""
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def max_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux


class MatmulPeak:
    """Best achieved FLOP/s of jitted float32 n x n matmuls on the default device.

    Measured at the start and again after every timed method, keeping the best: on a shared
    machine one measurement can land in a busy moment, and a low peak would inflate the MFU.
    """

    def __init__(self, sizes: list[int], repeats: int, dtype: str = "float32"):
        self.repeats = repeats
        self.best = 0.0
        self.measurements = 0
        self._fns = []
        for i, n in enumerate(sizes):
            a = jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype))
            mm = jax.jit(jnp.matmul).lower(a, a).compile()
            jax.block_until_ready(mm(a, a))
            self._fns.append((n, mm, a))
        self.sizes = sizes

    def measure(self) -> float:
        for n, mm, a in self._fns:
            for _ in range(self.repeats):
                t = time.perf_counter()
                jax.block_until_ready(mm(a, a))
                self.best = max(self.best, 2 * n**3 / (time.perf_counter() - t))
        self.measurements += 1
        return self.best


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs (matmuls only), to cross-check XLA's count
# ------------------------------------------------------------------------------------------------


def tower_flops(
    n: int, length: int, width: int, layers: int, *, keys: int | None = None
) -> tuple[float, float, float]:
    """Matmul FLOPs of ``layers`` pre-LN blocks (MLP 4x width) on n sequences of ``length``.

    Returns (forward, backward, recomputation). Forward per layer: q, k, v, out (8 D^2) and the
    MLP (16 D^2) per token, QK^T and PV (2 L K D each per sequence, K = ``keys``, the attended
    positions: ``length`` itself, or a cached prefix plus the suffix on the prefix-shared path).
    Backward with respect to the inputs only (the weights get no gradient): the same dense work,
    and four L K D products for attention. A rematerialised block recomputes its forward except
    the second MLP matmul, whose output no gradient needs (XLA removes it).
    """
    keys = length if keys is None else keys
    dense = 24.0 * n * length * width**2
    attn = 4.0 * n * length * keys * width
    fc2 = 8.0 * n * length * width**2
    return layers * (dense + attn), layers * (dense + 2 * attn), layers * (dense - fc2 + attn)


def prefix_tokens(clip: jp.Clip, name: str, cfg: dict) -> int:
    """Tokens between [SOT] and the class name in the method's text prompt."""
    words = cfg.get("init_words")
    n_words = len(clip_lib.tokenize(clip, [words])[0][0]) - 2 if words else 0
    if name in ("coop", "cocoop"):
        return n_words if words else int(cfg.get("n_ctx", 16))
    if name == "maple":  # n_ctx learned tokens, the rest of the init words fixed
        return max(n_words, int(cfg["n_ctx"]))
    return int(cfg["n_ctx_text"])  # IVLP / PromptSRC: init words only when they fit n_ctx


def analytic_flops(
    clip: jp.Clip, task: jp.Task, name: str, cfg: dict, batch: int, *, shared: bool = False
) -> tuple[float, float]:
    """(executed, model) matmul FLOPs of one train step; executed adds rematerialisation.

    ``shared``: the prefix-shared text path, where ``[SOT] ctx`` runs once per prefix group
    (once, or once per image for CoCoOp) and the class suffixes attend to its cached keys.
    """
    s = clip.spec
    classes = len(task)
    prefix = 1 + prefix_tokens(clip, name, cfg)
    suffix = int(task.token_ids.shape[1])
    text_len = prefix + suffix
    patches = (s.image_size // s.patch_size) ** 2
    patch_embed = 2.0 * batch * patches * (3 * s.patch_size**2) * s.vision_width
    vis_proj = 2.0 * batch * s.vision_width * s.embed_dim

    def vision(n_prompts: int, grad: bool) -> float:
        fwd, bwd, _ = tower_flops(batch, 1 + patches + n_prompts, s.vision_width, s.vision_layers)
        return patch_embed + vis_proj + fwd + (bwd + vis_proj if grad else 0.0)

    n_text = classes * batch if name == "cocoop" else classes
    if shared:
        groups = batch if name == "cocoop" else 1
        p = tower_flops(groups, prefix, s.text_width, s.text_layers)
        q = tower_flops(n_text, suffix, s.text_width, s.text_layers, keys=text_len)
        t_fwd, t_bwd, t_re = (a + b for a, b in zip(p, q, strict=True))
    else:
        t_fwd, t_bwd, t_re = tower_flops(n_text, text_len, s.text_width, s.text_layers)
    t_proj = 2.0 * n_text * s.text_width * s.embed_dim
    text = t_fwd + t_bwd + 2 * t_proj
    logits = 2.0 * 2 * batch * classes * s.embed_dim  # forward and backward
    if name in ("coop", "cocoop"):
        images = vision(0, grad=False)
    elif name == "ivlp":
        images = vision(int(cfg["n_ctx_vision"]), grad=True)
    elif name == "maple":
        images = vision(int(cfg["n_ctx"]), grad=True)
    elif name == "promptsrc":  # prompted path plus the frozen image features
        images = vision(int(cfg["n_ctx_vision"]), grad=True) + vision(0, grad=False)
        logits *= 1.5  # the frozen logits z (forward only)
    else:
        raise ValueError(name)
    model = text + images + logits
    remat = bool(cfg.get("remat", name == "cocoop"))
    recompute = t_re if remat else 0.0
    if remat and name not in ("coop", "cocoop"):  # the prompted image tower too
        n_v = int(cfg.get("n_ctx_vision", cfg.get("n_ctx", 0)))
        recompute += tower_flops(batch, 1 + patches + n_v, s.vision_width, s.vision_layers)[2]
    return model + recompute, model


# ------------------------------------------------------------------------------------------------
# Benchmark pieces
# ------------------------------------------------------------------------------------------------


def scaled_kwargs(kwargs: dict, clip: jp.Clip) -> dict:
    """Prompt depths of the 12-layer recipes mapped to a shallower CLIP (as the toy configs do)."""
    kwargs = dict(kwargs)
    layers = min(clip.spec.text_layers, clip.spec.vision_layers)
    if "depth" in kwargs and layers < 12:
        kwargs["depth"] = max(1, round(kwargs["depth"] * layers / 12))
    return kwargs


def with_cached_teacher(method: jp.methods.PromptMethod, teacher: np.ndarray):
    """PromptSRC whose loss uses ``teacher`` as its cached [C, E] teacher (as ``with_teacher``)."""
    inner = method.loss

    def loss(prompt, clip, task, batch, key):
        return inner(prompt, clip, task, {**batch, TEACHER_KEY: teacher}, key)

    return method._replace(loss=loss)


def random_teacher(classes: int, dim: int) -> np.ndarray:
    g = np.random.RandomState(1).randn(classes, dim).astype(np.float32)
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def time_teacher(clip: jp.Clip, cfg: dict, classes: int, paths: list[str]) -> dict[str, Any]:
    """Seconds to build PromptSRC's teacher for ``classes`` classes, as ``with_teacher`` does.

    One jitted call per path (``shared``: each template's words before the class name encoded
    once, :func:`jaxprompt.methods.zeroshot.template_features`; ``plain``: every template x class
    sequence in full, ``chunk`` at a time), compile timed separately. Keys end in the class
    count; the plain path's carry ``_plain``.
    """
    task = jp.make_task(clip, classnames(classes))
    tmpl = tuple(cfg.get("templates") or templates_lib.PROMPTSRC_60)
    chunk = cfg.get("chunk", 1024)
    names = [n.replace("_", " ") for n in task.names]
    ids, _ = clip_lib.tokenize(clip, [tm.format(n) for tm in tmpl for n in names])
    out: dict[str, Any] = {
        f"teacher_sequences_{classes}": len(tmpl) * len(names),
        f"teacher_tokens_{classes}": int(ids.shape[1]),
        "teacher_chunk": chunk,
    }
    for path in paths:
        shared = path == "shared"
        fn = jax.jit(
            lambda c, t, shared=shared: teacher_text_features(
                c, t, tmpl, chunk=chunk, shared_prefix=shared
            )
        )
        t = time.perf_counter()
        compiled = fn.lower(clip, task).compile()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(compiled(clip, task))
        run_s = time.perf_counter() - t
        tag = "" if shared else "_plain"
        out[f"teacher_seconds{tag}_{classes}"] = round(run_s, 3)
        out[f"teacher_compile_s{tag}_{classes}"] = round(compile_s, 2)
        log(f"promptsrc teacher, {classes} classes, {path}: {run_s:.2f}s")
    if len(paths) == 2:
        out[f"teacher_speedup_{classes}"] = round(
            out[f"teacher_seconds_plain_{classes}"] / out[f"teacher_seconds_{classes}"], 2
        )
    return out


def make_batch(clip: jp.Clip, batch: int, classes: int, augment: bool) -> dict[str, Any]:
    rng = np.random.RandomState(0)
    size = clip.spec.image_size
    labels = jnp.asarray(rng.randint(0, classes, batch), jnp.int32)
    if not augment:
        return {"image": jnp.asarray(rng.randn(batch, size, size, 3), jnp.float32), "label": labels}
    canvas = jp.data.canvas_size(size)  # what the runners decode images into
    return {
        "image": jnp.asarray(rng.randint(0, 256, (batch, canvas, canvas, 3)), jnp.uint8),
        "size": jnp.full((batch, 2), canvas, jnp.int32),
        "label": labels,
    }


def compile_path(
    clip: jp.Clip, name: str, preset: dict, task: jp.Task, args: argparse.Namespace, path: str
) -> dict[str, Any]:
    """The method's jitted train step on one text path, compiled, with its state and batch."""
    cfg = {**scaled_kwargs(preset["method"], clip), "shared_prefix": path == "shared"}
    method = jp.methods.get(name, **cfg)
    classes = len(task)
    if name == "promptsrc":
        method = with_cached_teacher(method, random_teacher(classes, clip.spec.embed_dim))
    optim = preset["optim"]
    tx = train_lib.make_optimizer(optim["lr"], epochs=max(1, optim["epochs"]), iters_per_epoch=100)
    augment = None
    if args.augment:
        size = clip.spec.image_size

        def augment(batch, key):
            return augment_lib.train_augment(key, batch, out_size=size)

    key = jax.random.key(0)
    state = train_lib.init_train_state(method, tx, key, clip, task)
    batch = make_batch(clip, args.batch, classes, args.augment)
    step = jax.jit(train_lib.make_train_step(method, tx, augment=augment), donate_argnums=0)
    t = time.perf_counter()
    compiled = step.lower(state, clip, task, batch, key).compile()
    compile_s = time.perf_counter() - t
    xla_flops = flops_of(compiled)
    executed, model = analytic_flops(clip, task, name, cfg, args.batch, shared=path == "shared")
    # XLA's cost analysis counts the body of a loop once, not once per trip: a step whose
    # layers run as a scan (the shared text tower under remat) is undercounted, so its FLOPs
    # are the analytic count (which agrees with XLA's within about 1% on loop-free steps).
    looped = bool(re.search(r"\bwhile\(", compiled.as_text()))
    flops = executed if looped else xla_flops
    log(
        f"{name} C={classes} {path}: compiled in {compile_s:.1f}s, "
        f"{flops / 1e12:.3f} TFLOP/step, temp {temp_gib(compiled)} GiB"
    )
    return {
        "compiled": compiled,
        "state": state,
        "batch": batch,
        "key": key,
        "cfg": cfg,
        "lr": optim["lr"],
        "remat": bool(method.config.get("remat", False)),
        "stats": {
            "compile_s": round(compile_s, 2),
            "flops": flops,
            "flops_source": "analytic (XLA counts a loop body once)" if looped else "xla",
            "flops_xla": xla_flops,
            "flops_analytic": executed,
            "flops_analytic_model": model,
            "xla_over_analytic": None if looped else round(xla_flops / executed, 3),
            "temp_gib": temp_gib(compiled),
        },
    }


def bench_one(
    clip: jp.Clip,
    name: str,
    preset: dict,
    classes: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One method at one class count, on each text path of ``args.paths``.

    The first path's figures are the line's top-level keys; every other path's sit under its
    name (``"plain": {...}``). Steps alternate between the paths, so machine load hits both.
    """
    task = jp.make_task(clip, classnames(classes))
    runs = {path: compile_path(clip, name, preset, task, args, path) for path in args.paths}
    first = runs[args.paths[0]]
    out = {
        "method": name,
        "classes": classes,
        "batch": args.batch,
        "path": args.paths[0],
        **first["stats"],
        "remat": first["remat"],
        "method_config": {
            k: v for k, v in first["cfg"].items() if k not in ("templates", "shared_prefix")
        },
        "lr": first["lr"],
    }
    for path in args.paths[1:]:
        out[path] = dict(runs[path]["stats"])
    if not args.compile_only:
        times: dict[str, list[float]] = {path: [] for path in runs}
        for i in range(args.steps + 1):  # step 0 is the warm-up
            for path, run in runs.items():
                t = time.perf_counter()
                run["state"], metrics = run["compiled"](
                    run["state"], clip, task, run["batch"], run["key"]
                )
                jax.block_until_ready((run["state"], metrics))
                run["loss"] = float(metrics["loss"])
                dt = time.perf_counter() - t
                if i == 0:
                    run["stats"]["warmup_step_s"] = round(dt, 3)
                else:
                    times[path].append(dt)
                log(f"{name} C={classes} {path}: step {i}/{args.steps} {dt:.2f}s")
        for path, run in runs.items():
            step_s = statistics.median(times[path])
            run["stats"].update(
                step_s=round(step_s, 4),
                step_s_all=[round(x, 4) for x in times[path]],
                tflops_per_s=round(run["stats"]["flops"] / step_s / 1e12, 4),
                loss=run["loss"],
            )
        timed = ("warmup_step_s", "step_s", "step_s_all", "tflops_per_s")
        out.update({k: first["stats"][k] for k in timed})
        out["loss"] = first["loss"]
        for path in args.paths[1:]:
            out[path] = dict(runs[path]["stats"])
    if args.paths == ["shared", "plain"]:
        plain, shared = runs["plain"]["stats"], runs["shared"]["stats"]
        out["prefix_flops_ratio"] = round(plain["flops"] / shared["flops"], 2)
        if plain["temp_gib"] and shared["temp_gib"]:
            out["prefix_temp_ratio"] = round(plain["temp_gib"] / shared["temp_gib"], 2)
        if "step_s" in shared:
            out["prefix_step_speedup"] = round(plain["step_s"] / shared["step_s"], 2)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--classes", nargs="+", type=int, default=[50, 1000])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    ap.add_argument("--preset", default="vit-b/16", help="model shapes (tiny: a quick check)")
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the frozen towers (prompts, logits and losses stay float32)",
    )
    ap.add_argument(
        "--teacher-classes",
        nargs="+",
        type=int,
        default=[100],
        help="class counts for the teacher timing (0: skip it)",
    )
    ap.add_argument(
        "--paths",
        nargs="+",
        default=["shared", "plain"],
        choices=("shared", "plain"),
        help="text paths to measure: prefix-shared (the default) and/or plain",
    )
    ap.add_argument(
        "--peak-sizes", nargs="+", type=int, default=None, help="matmul sides for the peak"
    )
    ap.add_argument("--peak-repeats", type=int, default=5, help="runs per size, best kept")
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="compile and report FLOPs and XLA's temporary memory, without timing",
    )
    ap.add_argument(
        "--no-augment", dest="augment", action="store_false", help="feed 224 px images directly"
    )
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    n_names = len(all_classnames())
    args.teacher_classes = [c for c in args.teacher_classes if c]
    if len(set(args.paths)) != len(args.paths):
        ap.error("--paths: give each path once")
    if not all(1 <= c <= n_names for c in [*args.classes, *args.teacher_classes]):
        ap.error(f"class counts must be in 1..{n_names} (the ImageNet class names)")

    dev = jax.devices()[0]
    # Accelerators reach their peak only on large products.
    big = [4096, 8192] if dev.platform != "cpu" else [1024, 2048]
    sizes = args.peak_sizes or (big if args.preset == "vit-b/16" else [256])
    peak = MatmulPeak(sizes, args.peak_repeats, args.dtype)
    log(f"matmul peak {sizes} {args.dtype}: {peak.measure() / 1e12:.4f} TFLOP/s on {dev}")
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    common = {
        "benchmark": "train_step",
        "device": f"{dev.platform}:{dev.device_kind}",
        "host": host_cpu(),
        "cpu_cores_usable": len(affinity) if affinity else os.cpu_count(),
        "shapes": f"{args.preset} (random weights)",
        "dtype": args.dtype,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "augment": args.augment,
    }

    all_presets = presets()
    # Vocabulary: every class name used and the teacher's template words, one token per word.
    words = sorted({n for c in [*args.classes, *args.teacher_classes] for n in classnames(c)})
    words += [*templates_lib.PROMPTSRC_60, "a photo of a"]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        testing.save_random_clip(d, words=words, preset=args.preset)
        clip = jp.load_clip(d, dtype=args.dtype)
    log(f"random {args.preset} CLIP built in {time.perf_counter() - t:.1f}s")

    teacher: dict[str, Any] = {}
    results = []
    for classes in args.classes:
        for name in args.methods:
            if (
                name == "promptsrc"
                and args.teacher_classes
                and not teacher
                and not args.compile_only
            ):
                for n in args.teacher_classes:
                    teacher.update(time_teacher(clip, all_presets[name]["method"], n, args.paths))
            log(f"{name} C={classes}: start")
            r = bench_one(clip, name, all_presets[name], classes, args)
            if not args.compile_only:
                best = peak.measure()
                r["peak_tflops_per_s"] = round(best / 1e12, 4)
                r["peak_source"] = (
                    f"jitted {args.dtype} n x n matmuls, n in {sizes}, best of "
                    f"{args.peak_repeats * peak.measurements} runs each over the process"
                )
                r["mfu"] = round(r["flops"] / r["step_s"] / best, 4)
                r["mfu_model_analytic"] = round(r["flops_analytic_model"] / r["step_s"] / best, 4)
            if name == "promptsrc":
                r.update(teacher)
            r["max_rss_gib"] = max_rss_gib()
            r["loadavg_1m"] = loadavg()
            line = {**common, **r}
            results.append(line)
            print(json.dumps(line), flush=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
