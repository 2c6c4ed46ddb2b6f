"""Off the happy path, through the installed console script from a directory that is not the
checkout, as a user meets it: every bad input is one line on stderr, exit code 2, nothing
written; Ctrl-C is one line and exit code 130, and the same command then resumes exactly."""

import collections
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_COMPILE

SCRIPT = os.path.join(os.path.dirname(sys.executable), "jaxprompt")  # the installed command


def _env():
    return {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # one device, as a user's machine


def _tree(d):
    out = {}
    for root, dirs, files in os.walk(d):
        for name in files + dirs:
            p = os.path.join(root, name)
            out[os.path.relpath(p, d)] = os.path.getsize(p) if os.path.isfile(p) else None
    return out


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A working directory with what the table's inputs name: an image, a run directory, a cut
    prompt file and a plain file."""
    import safetensors.numpy
    from PIL import Image

    d = tmp_path_factory.mktemp("user")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "img.png")
    (d / "rundir").mkdir()
    (d / "afile").write_text("not a directory\n")
    data = safetensors.numpy.save(
        {"ctx": np.ones((4, 128), np.float32)},
        metadata={"jaxprompt": json.dumps({"method": "coop"})},
    )
    (d / "cut.safetensors").write_bytes(data[:-20])  # an interrupted copy
    return d


TOY = "fewshot:coop,dataset=toy_textures,runlocal=true"
TPT = "adapt:tpt,dataset=toy_textures,runlocal=true"
BAD_INPUT = [
    # (arguments, what the one line must say)
    (["predict", "--prompt", "rundir", "--classes", "a,b", "img.png"],
     "rundir is a directory: give a prompt file, e.g. `jaxprompt export --workdir rundir`"),
    (["predict", "--prompt", "cut.safetensors", "--classes", "a,b", "img.png"],
     "cut.safetensors is damaged"),
    (["train", "--config", TOY, "--workdir", "afile"],
     "--workdir afile is a file: name a directory"),
    (["train", "--config", TOY, "--config.optim.lr=abc", "--workdir", "w"],
     "could not convert string to float: 'abc'"),
    (["train", "--config", TOY, "--workdir", "/proc/jaxprompt-test/demo"],
     "cannot create --workdir /proc/jaxprompt-test/demo"),
    (["prepare", "--dataset", "no_such_set"], "unknown dataset 'no_such_set'"),
    (["sweep", "--config", "fewshot:coop", "--datasets", "toy_textures,no_such_set",
      "--root", "sweeps"], "unknown dataset 'no_such_set'"),
    # A DomainNet target builds its config (it once failed there, on the catalog's name list)
    # and, with no data here, names how to build it; a bad domain lists the domains.
    (["adapt", "--config", "adapt:pouf,dataset=DomainNet/clipart", "--workdir", "w",
      "--config.data.data_dir=tfds"], "`tfds build domainnet/clipart --data_dir DIR`"),
    (["adapt", "--config", "adapt:pouf,dataset=DomainNet/nope", "--workdir", "w"],
     "unknown DomainNet domain 'nope'; choose one of clipart"),
    (["sweep", "--config", "fewshot:coop", "--datasets", "toy_textures", "--seeds", "x",
      "--root", "sweeps"], "--seeds 'x': give comma-separated integers"),
    (["train", "--config", TOY, "--config.data.batch_size=0", "--workdir", "w"],
     "data.batch_size=0 must be at least 1"),
    (["train", "--config", TOY, "--config.optim.epochs=-1", "--workdir", "w"],
     "optim.epochs=-1 is negative"),
    (["adapt", "--config", TPT, "--config.data.batch_size=0", "--workdir", "w"],
     "data.batch_size=0 must be at least 1"),
    (["adapt", "--config", TPT, "--config.method.views=8", "--workdir", "w"],
     "keep=0.1 of 8 views selects int(8 * 0.1) = 0"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expect", BAD_INPUT, ids=[f"{a[0]}-{e.split(':')[0][:30]}" for a, e in BAD_INPUT]
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, expect, user_dir):
    before = _tree(user_dir)
    out = subprocess.run(
        [SCRIPT, *args], cwd=user_dir, env=_env(), capture_output=True, text=True, timeout=600
    )
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("jaxprompt: error: "), out.stderr[-2000:]
    assert expect in err[0]
    assert _tree(user_dir) == before


def test_prepare_on_a_generated_set_says_there_is_nothing_to_do(tmp_path):
    import importlib

    prepare = importlib.import_module("jaxprompt.data.prepare")  # the package binds the function
    with pytest.raises(prepare.NothingToPrepare, match="nothing to prepare"):
        prepare.prepare("toy_textures", data_dir=str(tmp_path))
    assert prepare.main(["--dataset", "toy_textures", "--data_dir", str(tmp_path)]) == 0
    assert not os.listdir(tmp_path)


def _toy_train(clip_dir, *, epochs):
    """A few-shot CoOp run on the toy world with the tiny CLIP: 4 steps an epoch."""
    return [
        SCRIPT, "train", "--config", TOY, f"--config.clip.name={clip_dir}",
        "--config.method.kw.n_ctx=4", f"--config.optim.epochs={epochs}", "--workdir", "runs/x",
    ]  # fmt: skip


def _start(cmd, cwd):
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_same_command_resumes_without_duplicate_metrics(
    tiny_clip_dir, tmp_path
):
    cmd = _toy_train(tiny_clip_dir, epochs=100)
    p = _start(cmd, tmp_path)
    lines, total = [], None
    for line in p.stderr:
        lines.append(line)
        m = re.search(r"step 30/(\d+)", line)  # four steps an epoch: checkpoints were written
        if m:
            total = int(m.group(1))
            p.send_signal(signal.SIGINT)
            break
    lines += p.communicate(timeout=300)[1].splitlines(True)
    text = "".join(lines)
    assert p.returncode == 130, text[-3000:]
    assert "Traceback" not in text
    m = re.fullmatch(
        r"jaxprompt: interrupted: runs/x keeps the checkpoint of step (\d+); the same command "
        r"resumes there",
        lines[-1].strip(),
    )
    assert m, lines[-1]
    saved = int(m.group(1))
    assert total == 400 and 28 <= saved < total

    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"at step {saved}" in out.stderr
    records = [json.loads(ln) for ln in open(tmp_path / "runs/x/metrics.jsonl")]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, total + 1)), collections.Counter(train_steps).most_common(3)


def test_coop_says_when_init_words_size_the_context_differently(tiny_clip, tiny_task, caplog):
    import jax

    import jaxprompt as jp

    # "a photo of a" is 4 tokens of the tiny tokenizer: the context has 4 vectors, not 2.
    method = jp.methods.get("coop", n_ctx=2, init_words="a photo of a")
    with caplog.at_level("WARNING", logger="jaxprompt.methods.coop"):
        prompt = method.init(jax.random.key(0), tiny_clip, tiny_task)
    assert prompt["ctx"].shape[0] == 4
    assert [r.getMessage() for r in caplog.records] == [
        "init_words 'a photo of a' are 4 tokens on this CLIP's tokenizer: the context has 4 "
        "vectors (n_ctx=2 is not used)"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxprompt.methods.coop"):
        jp.methods.get("coop", n_ctx=4, init_words="a photo of a").init(
            jax.random.key(0), tiny_clip, tiny_task
        )
        jp.methods.get("coop", init_words="a photo of a").init(  # the default: no request
            jax.random.key(0), tiny_clip, tiny_task
        )
    assert not caplog.records


@pytest.mark.slow
def test_a_second_process_on_a_running_directory_stops_and_the_first_is_unaffected(
    tiny_clip_dir, tmp_path
):
    cmd = _toy_train(tiny_clip_dir, epochs=60)
    first = _start(cmd, tmp_path)
    lines = []
    for line in first.stderr:
        lines.append(line)
        if "step 10/" in line:
            break
    lock = json.loads((tmp_path / "runs/x/.jaxprompt.lock").read_text())
    assert lock["pid"] == first.pid
    second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith(
        f"jaxprompt: error: runs/x is in use by jaxprompt process {first.pid} on "
    ), err
    lines += first.communicate(timeout=600)[1].splitlines(True)
    assert first.returncode == 0, "".join(lines)[-3000:]
    assert not (tmp_path / "runs/x/.jaxprompt.lock").exists()  # released at the end
    records = [json.loads(ln) for ln in open(tmp_path / "runs/x/metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 241))

    # A lock left by a killed process (no such pid) is taken over by the next run.
    (tmp_path / "runs/y").mkdir()
    dead = {"pid": 2**22 + 12345, "host": lock["host"]}
    (tmp_path / "runs/y/.jaxprompt.lock").write_text(json.dumps(dead))
    from jaxprompt.app import rundir

    run = rundir.RunDir(str(tmp_path / "runs/y"), {"a": 1})
    run.open()
    assert json.loads((tmp_path / "runs/y/.jaxprompt.lock").read_text())["pid"] == os.getpid()
    run.unlock()
    assert not (tmp_path / "runs/y/.jaxprompt.lock").exists()


def test_an_unretrieved_checkpoint_read_error_is_not_printed_after_the_one_line(capsys):
    """asyncio logs a collected task's exception as "Task exception was never retrieved" with
    its traceback; for orbax's failed reads of an unreadable checkpoint (which the run has
    already reported in one line) the CLI's logging drops it, and nothing else."""
    import asyncio
    import gc

    from jaxprompt.app import console

    console.setup()

    async def failing(message):
        raise ValueError(message)

    def collect_unretrieved(message):
        loop = asyncio.new_event_loop()
        task = loop.create_task(failing(message))
        loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody awaits it
        loop.close()
        del task
        gc.collect()

    read = 'OUT_OF_RANGE: Error reading "prompt.ctx/0.0" in OCDBT database at local file "x"'
    collect_unretrieved(read)
    assert "never retrieved" not in capsys.readouterr().err
    collect_unretrieved("something else")
    assert "Task exception was never retrieved" in capsys.readouterr().err
