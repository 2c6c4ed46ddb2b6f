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
        assert r["flops"] > 0 and 0 < r["mfu"] and r["peak_tflops_per_s"] > 0
        for path in (r, r["plain"]):
            if path["flops_source"] == "xla":
                # XLA counts elementwise work too; the matmul-only count is the same order.
                assert 0.5 < path["xla_over_analytic"] < 3, r
            else:  # a scanned tower: XLA's count misses all but one trip of the loop
                assert path["flops"] == path["flops_analytic"] > path["flops_xla"], r
    promptsrc = lines[-1]
    assert promptsrc["teacher_seconds_3"] > 0 and promptsrc["teacher_seconds_plain_3"] > 0
    assert promptsrc["teacher_sequences_3"] == 60 * 3
    for r in lines:
        # Both text paths, compiled and timed in the one process.
        assert r["path"] == "shared" and r["plain"]["step_s"] > 0
        assert r["prefix_step_speedup"] == round(r["plain"]["step_s"] / r["step_s"], 2)
        # The prefix-shared path does less text work by construction (XLA's count and ours).
        assert r["flops_analytic"] < r["plain"]["flops_analytic"]
        assert r["flops"] < r["plain"]["flops"], r
    # CoCoOp rematerialises its text tower: the executed estimate exceeds the model FLOPs, and
    # its shared path scans the layers (the plain path has no loop).
    cocoop = lines[1]
    assert cocoop["remat"] and cocoop["flops_analytic"] > cocoop["flops_analytic_model"]
    assert cocoop["flops_source"].startswith("analytic")
    assert cocoop["plain"]["flops_source"] == "xla"


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


ACCELERATOR = os.path.join(REPO, "benchmarks", "accelerator.sh")


def _accelerator(*args):
    return subprocess.run(
        ["bash", ACCELERATOR, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"},
    )


def test_accelerator_script_refuses_a_cpu_only_host():
    out = _accelerator()
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert "jax sees only the CPU" in line and "--allow-cpu" in line


def test_accelerator_script_reports_pieces_left_out_of_its_budget():
    # No time left: every piece (three runs x two dtypes) says so in JSON, nothing runs.
    # The pieces themselves are the benchmarks tested above; on an accelerator the script
    # runs them in full (the figures in the README's benchmark section).
    out = _accelerator("--allow-cpu", "--preset", "tiny", "--budget", "0")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert [(r["benchmark"], r["timed_out"]) for r in lines] == [
        ("text_tower", True),
        ("train_step", True),
        ("text_tower", True),
    ] * 2
    assert "--dtype bfloat16" in lines[0]["args"] and "--dtype float32" in lines[3]["args"]
    bad = _accelerator("--budget", "soon")
    assert bad.returncode == 2 and "whole numbers" in bad.stderr


@pytest.mark.slow
def test_tpt_benchmark_runs_on_a_resnet_preset():
    """benchmarks/tpt.py --preset rn-tiny: the ResNet CLIP path (RN50's is the same code)."""
    args = ["--preset", "rn-tiny", "--classes", "5", "--views", "10", "--batches", "1,2"]
    (line,) = _run("tpt", *args, "--time-batches", "1", timeout=900)
    assert line["shapes"].startswith("rn-tiny") and line["images_per_second"]["1"] > 0
    assert line["flops_ratio"] > 1.0, line  # the reference runs the text tower three times
