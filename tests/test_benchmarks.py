"""Smoke tests of the benchmark scripts at tiny shapes (the real runs are ViT-B/16, by hand)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name, *args, env=None, timeout=600):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(ln) for ln in out.stdout.splitlines() if ln.strip()]


@pytest.mark.slow
def test_train_step_prints_one_json_line_per_method():
    # Its own process: XLA's CPU code generation without optimisation (most of this test's time
    # is compiling five train steps; the numbers are not looked at, only their form).
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    lines = _run(
        "train_step",
        "--preset", "tiny",
        "--classes", "5",
        "--steps", "1",
        "--teacher-classes", "3",
        "--peak-repeats", "2",
        "--no-augment",
        env={"XLA_FLAGS": flags.strip()},
    )  # fmt: skip
    assert [r["method"] for r in lines] == ["coop", "cocoop", "ivlp", "maple", "promptsrc"]
    for r in lines:
        assert r["benchmark"] == "train_step"
        assert (r["classes"], r["batch"]) == (5, 4)
        assert r["step_s"] > 0 and r["compile_s"] > 0
        assert r["flops"] > 0 and r["flops_source"] == "xla_cost_analysis"
        assert 0 < r["mfu"] and r["peak_tflops_per_s"] > 0
        # XLA counts elementwise work too; the matmul-only estimate should be the same order.
        assert 0.5 < r["xla_over_analytic"] < 3, r
    promptsrc = lines[-1]
    assert promptsrc["teacher_seconds_3"] > 0
    assert promptsrc["teacher_sequences"] == 60 * 3
    # CoCoOp rematerialises its text tower: the executed estimate exceeds the model FLOPs.
    cocoop = lines[1]
    assert cocoop["remat"] and cocoop["flops_analytic"] > cocoop["flops_analytic_model"]


@pytest.mark.slow
def test_text_tower_prefix_speedup_prints_json():
    lines = _run(
        "text_tower",
        "--preset", "tiny",
        "--only", "prefix",
        "--vocab", "word",
        "--classes", "5",
        "--prefix-ctx", "4",
        "--repeats", "1",
    )  # fmt: skip
    (r,) = lines
    assert r["prefix_ctx"] == 4 and r["word_prefix_tokens"] == 5
    assert r["word_plain_s"] > 0 and r["word_shared_s"] > 0
    assert r["prefix_speedup"] == r["word_prefix_speedup"] > 0


@pytest.mark.slow
def test_text_tower_memory_prints_json():
    lines = _run(
        "text_tower",
        "--preset", "tiny",
        "--only", "memory",
        "--vocab", "word",
        "--classes", "5",
        "--mc-samples", "2",
    )  # fmt: skip
    (r,) = lines
    assert (r["batch"], r["n_ctx"], r["mc_samples"]) == (4, 4, 2)
    for name in ("cocoop", "bayes", "bayes_cond"):
        shared = r[f"word_{name}_shared_temp_mib"]
        plain = r[f"word_{name}_plain_temp_mib"]
        assert shared > 0 and plain > 0
        assert r[f"{name}_memory"] == r[f"word_{name}_memory"] > 0
