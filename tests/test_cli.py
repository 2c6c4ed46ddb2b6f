"""The `jaxprompt` command end to end on the toy world, and its one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE

from jaxprompt import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "base2new.py")


def _snapshot(d):
    """Every file under d with its size and mtime (to prove nothing was touched)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained(tiny_clip_dir, tmp_path_factory):
    """A tiny CoOp base-to-novel run on the toy world through the CLI (in process), with a
    relative --workdir as users type it (orbax itself needs absolute paths)."""
    root = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = cli.main(
            [
                "jaxprompt", "train", "--config", f"{CONFIG}:coop,runlocal=true",
                f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=4",
                "--workdir", "runs/coop",
            ]
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    assert code == 0
    return str(root / "runs" / "coop")


@pytest.mark.slow
def test_train_writes_the_run_directory(trained):
    files = set(os.listdir(trained))
    assert {"config.json", "metrics.jsonl", "results.json", "results.md", "results.png"} <= files
    res = json.load(open(os.path.join(trained, "results.json")))
    acc = res["accuracy"]
    assert set(acc) == {"base", "new", "hm"}
    assert res["method"] == "coop" and res["dataset"] == "toy_textures" and res["seed"] == 1
    assert all(0 <= v <= 100 for v in acc.values())
    # Few-shot ids are recorded so the run can be repeated and shared.
    shots = json.load(open(os.path.join(trained, "data", "shot_2-seed_1.json")))
    # The file holds the K-shot draw over all 16 classes (base/new selection comes after).
    assert len(shots["train"]) == 2 * 16
    cfg = json.load(open(os.path.join(trained, "config.json")))
    assert cfg["method"]["kw"]["n_ctx"] == 4
    md = open(os.path.join(trained, "results.md")).read()
    assert md.startswith("**coop (base2new, seed 1)**") and "| toy_textures |" in md, md


@pytest.mark.slow
def test_finished_run_is_skipped_and_eval_needs_no_config(trained, tiny_clip_dir, capsys):
    before = _snapshot(trained)
    same = [
        "jaxprompt", "train", "--config", f"{CONFIG}:coop,runlocal=true",
        f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=4", "--workdir", trained,
    ]  # fmt: skip
    assert cli.main(same) == 0
    assert _snapshot(trained) == before
    # Another config in the finished run's directory is not that run: refused, not "skipped".
    capsys.readouterr()
    assert cli.main([*same[:-2], "--config.optim.lr=0.5", "--workdir", trained]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"jaxprompt: error: {trained} holds a run with a different config (optim.lr): use a new "
        "--workdir, or the original config to resume it"
    ]
    assert _snapshot(trained) == before
    assert cli.main(["jaxprompt", "eval", "--workdir", trained]) == 0
    first = json.load(open(os.path.join(trained, "results.json")))
    evals = os.path.join(trained, "evals")
    assert os.listdir(evals) == ["toy_textures-base-new.json"]
    res = json.load(open(os.path.join(evals, "toy_textures-base-new.json")))
    assert res["accuracy"] == first["accuracy"]
    # Another evaluation (a shifted domain) is kept beside the first, not over it, and
    # results.md lists both under the run's own table.
    code = cli.main(
        ["jaxprompt", "eval", "--workdir", trained, "--config",
         "xdomain:coop,dataset=toy_textures,runlocal=true"]
    )  # fmt: skip
    assert code == 0
    keys = sorted(os.listdir(evals))
    assert len(keys) == 2 and "toy_textures-toy_textures_sketch" in keys[1], keys
    assert json.load(open(os.path.join(evals, "toy_textures-base-new.json"))) == res
    sketch = json.load(open(os.path.join(evals, keys[1])))
    assert "toy_textures_sketch" in sketch["accuracy"] and "base" not in sketch["accuracy"]
    md = open(os.path.join(trained, "results.md")).read()
    assert md.count("| Dataset |") == 3 and "Evaluation `toy_textures-toy_textures_sketch" in md


@pytest.mark.slow
def test_mismatched_checkpoint_is_a_one_line_error_and_keeps_files(
    trained, tiny_clip_dir, tmp_path, capsys
):
    # Copy the checkpoints of the finished run, minus its results, and resume with another
    # context length: the checkpoint does not fit.
    import shutil

    wd = tmp_path / "resume"
    shutil.copytree(trained, wd)
    os.remove(wd / "results.json")
    before = _snapshot(wd)
    code = cli.main(
        [
            "jaxprompt", "train", "--config", f"{CONFIG}:coop,runlocal=true",
            f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=8",
            "--workdir", str(wd),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("jaxprompt: error:") and "method.kw.n_ctx" in err[-1]
    after = _snapshot(wd)
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--config", f"{CONFIG}:copo"], "unknown method 'copo'"),
        (["--config", f"{CONFIG}:coop,dataset=imagenett"], "unknown dataset 'imagenett'"),
        (["--config", f"{CONFIG}:coop,shotz=2"], "unknown config argument 'shotz'"),
        (["--config", f"{CONFIG}:coop", "--config.optim.lrr=1"], "did you mean 'lr'"),
        (
            ["--config", f"{CONFIG}:coop,runlocal=true", "--config.clip.name=/no/such/dir"],
            "not a directory",
        ),
        ([], "--config is required"),
        (
            ["--config", f"{CONFIG}:coop", "--config.optim.lr=abc"],
            "could not convert string to float: 'abc'",  # the closing quote kept
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args, expect, tmp_path, capsys):
    wd = tmp_path / "wd"
    code = cli.main(["jaxprompt", "train", *args, "--workdir", str(wd)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) >= 1 and err[-1].startswith("jaxprompt: error:")
    assert expect in err[-1]
    assert not wd.exists()  # bad input writes nothing


@pytest.fixture(scope="module")
def typo_then_curve(tiny_clip_dir, tmp_path_factory):
    """Two refused commands, then the corrected one, all in the same workdir. The corrected
    run evaluates every epoch, so it is also the run the per-epoch evaluation test reads (one
    training instead of two; each costs the compilation of a fresh train step)."""
    import contextlib
    import io

    wd = str(tmp_path_factory.mktemp("typo") / "wd")
    common = [f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=2", "--workdir", wd]
    bad = ["jaxprompt", "train", "--config", "base2new:coop,runlocal=true,dataset=toy_texturez"]
    big = ["jaxprompt", "train", "--config", "base2new:coop,runlocal=true"]
    refused = []  # (exit code, stderr, workdir exists afterwards) of each bad command
    for args in (
        [*bad, *common],
        # A batch that does not split over the (8 simulated) data-parallel devices is caught
        # as early.
        [*big, "--config.data.batch_size=12", *common],
    ):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(args)
        refused.append((code, err.getvalue(), os.path.exists(wd)))
    curve = ["--config.optim.epochs=2", "--config.eval_every_epochs=1"]
    code = cli.main([*big, *curve, *common])
    return refused, code, wd


@pytest.mark.slow
def test_a_typo_then_the_corrected_command_in_the_same_workdir(typo_then_curve):
    """Bad input is refused before anything is written, so fixing it just works."""
    refused, code, wd = typo_then_curve
    expect = [
        "unknown dataset 'toy_texturez'",
        "does not split over the 8 data-parallel devices",
    ]
    for (bad_code, err, wrote), message in zip(refused, expect, strict=True):
        assert bad_code == 2 and message in err and not wrote, (message, err)
    assert code == 0
    assert os.path.exists(os.path.join(wd, "results.json"))


@pytest.mark.slow
def test_eval_every_epochs_records_base_and_new_per_epoch(typo_then_curve):
    _, code, wd = typo_then_curve
    assert code == 0
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl")).read().splitlines()]
    evals = [r for r in rows if "eval/base" in r]
    # Epoch 1 (of 2 steps each: 16 examples, batch 8) and the end of training.
    assert [r["step"] for r in evals] == [2, 4], rows
    assert all("eval/new" in r and 0 <= r["eval/new"] <= 100 for r in evals)
    final = json.load(open(os.path.join(wd, "results.json")))["accuracy"]
    assert evals[-1]["eval/base"] == final["base"]


def test_missing_weights_directory(tmp_path, capsys):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    code = cli.main(
        ["jaxprompt", "train", "--config", f"{CONFIG}:coop,runlocal=true",
         f"--config.clip.name={empty}", "--workdir", str(tmp_path / "wd")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no CLIP weights" in err[-1]


def test_unknown_command_and_help(capsys):
    assert cli.main(["jaxprompt", "frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main(["jaxprompt", "--help"]) == 0
    assert "jaxprompt train" in capsys.readouterr().out
    assert cli.main(["jaxprompt", "--version"]) == 0
    assert capsys.readouterr().out.startswith("jaxprompt 0.")


@pytest.mark.parametrize("cmd", cli.COMMANDS)  # every command, new ones included
def test_every_subcommand_help_exits_0_from_another_directory(cmd, tmp_path):
    """A new user's first command, as typed, outside the checkout, in a fresh process."""
    t0 = __import__("time").perf_counter()
    out = subprocess.run(
        ["jaxprompt", cmd, "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()
    if cmd in ("train", "eval", "adapt"):
        assert "--workdir" in out.stdout and "config presets:" in out.stdout
        assert ("tpt" if cmd == "adapt" else "promptsrc") in out.stdout
        # Flags are read before jax or transformers load: help answers at once.
        assert __import__("time").perf_counter() - t0 < 60


def test_python_dash_m_jaxprompt(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jaxprompt", "--version"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("jaxprompt ")


def test_help_imports_neither_jax_nor_transformers():
    # Every command's --help answers at once (export, sweep, push and predict took 2.4-3.5 s).
    code = (
        "import sys, io, contextlib; from jaxprompt import cli\n"
        f"for cmd in {[c for c in cli.COMMANDS if c not in ('prepare', 'pretrain-toy')]!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            cli.main(['jaxprompt', cmd, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    heavy = ('jax', 'transformers', 'tensorflow_datasets')\n"
        "    bad = [m for m in heavy if m in sys.modules]\n"
        "    if bad:\n"
        "        sys.exit(f'{cmd} --help imported {bad}')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_config_by_protocol_name_is_the_installed_file():
    from jaxprompt.app import flags

    path = flags.resolve_config_arg("base2new:promptsrc,dataset=dtd")
    assert path.endswith(os.path.join("configs", "base2new.py") + ":promptsrc,dataset=dtd")
    assert os.path.isfile(path.partition(":")[0])
    assert flags.resolve_config_arg("configs/x.py:coop") == "configs/x.py:coop"
    with pytest.raises(flags.FlagError, match="unknown protocol 'base2nwe'"):
        flags.resolve_config_arg("base2nwe:coop")


def test_every_config_builds_with_every_method_preset():
    import importlib.util

    sys.path.insert(0, os.path.join(REPO, "configs"))
    import common

    for name in ("base2new", "fewshot", "xdomain"):
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(REPO, "configs", name + ".py")
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for method in common.METHOD_PRESETS:
            for extra in ("", ",runlocal=true"):
                c = mod.get_config(f"{method},dataset=toy_textures{extra}")
                assert c.method.name == method and c.evals and c.data.dataset == "toy_textures"
                if extra:
                    assert c.optim.epochs <= 1 and c.data.batch_size <= 8


@pytest.mark.slow
def test_console_script_runs_in_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "jaxprompt.cli", "train", "--config", f"{CONFIG}:nope",
         "--workdir", "/tmp/never"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("jaxprompt: error: unknown method")


@pytest.mark.slow
def test_prepare_then_train_on_an_image_folder_without_tensorflow(tiny_clip_dir, tmp_path):
    """`jaxprompt prepare` on a generated image folder, then a training run that reads the
    prepared array_record copy in a fresh process where TensorFlow is never imported."""
    from PIL import Image

    rng = __import__("numpy").random.RandomState(0)
    folder = tmp_path / "shapes"
    for c, name in enumerate(["red_things", "green_things", "blue_things", "grey_things"]):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            img = rng.randint(0, 60, (40 + i, 36, 3)).astype("uint8")
            img[..., c % 3] += 150
            Image.fromarray(img).save(folder / name / f"{i:03d}.png")
    data_dir = tmp_path / "tfds"
    # One CPU device, as on a laptop (the test process simulates 8).
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    prep = subprocess.run(
        [sys.executable, "-m", "jaxprompt.cli", "prepare", "--dataset", f"folder:{folder}",
         "--data_dir", str(data_dir)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-2000:]
    wd = tmp_path / "run"
    script = (
        "import sys\n"
        "from jaxprompt import cli\n"
        f"code = cli.main(['jaxprompt', 'train', '--config', '{CONFIG}:coop,runlocal=true,"
        f"dataset=folder:{folder}', '--config.clip.name={tiny_clip_dir}',"
        f" '--config.data.data_dir={data_dir}', '--config.method.kw.n_ctx=2',"
        " '--config.data.batch_size=2',"
        f" '--workdir', '{wd}'])\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.load(open(wd / "results.json"))
    assert set(res["accuracy"]) == {"base", "new", "hm"} and res["dataset"] == "shapes"


def test_toy_configs_scale_prompt_shapes_to_the_toy_clip():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import base2new
    import xdomain

    toy = base2new.get_config("promptsrc,dataset=toy_textures").method.kw
    real = base2new.get_config("promptsrc,dataset=ImageNet").method.kw
    # ViT-B/16's 12 layers and 196 patches -> the toy's 4 layers and 16 patches.
    assert (real["depth"], real["n_ctx_vision"], real["n_ctx_text"]) == (9, 4, 4)
    assert (toy["depth"], toy["n_ctx_vision"], toy["n_ctx_text"]) == (3, 1, 4)
    assert xdomain.get_config("ivlp,dataset=toy_textures").method.kw["depth"] == 1
    assert base2new.get_config("maple,dataset=toy_textures").method.kw["n_ctx"] == 1
    assert base2new.get_config("maple,dataset=ImageNet").method.kw["n_ctx"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["fewshot", "xdomain"])
def test_results_table_shows_exactly_what_was_evaluated(protocol, tiny_clip_dir, tmp_path):
    wd = tmp_path / protocol
    code = cli.main(
        ["jaxprompt", "train", "--config", f"{protocol}:coop,runlocal=true",
         f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=2",
         "--workdir", str(wd)]
    )  # fmt: skip
    assert code == 0
    acc = json.load(open(wd / "results.json"))["accuracy"]
    md = (wd / "results.md").read_text()
    assert "| - |" not in md and " - |" not in md, md
    assert "Base" not in md and "hm" not in acc
    for name in acc:  # one column per evaluated split
        assert f" {name} |" in md.splitlines()[2], md


@pytest.mark.slow
def test_zero_shot_run_can_be_evaluated_again(tiny_clip_dir, tmp_path):
    wd = str(tmp_path / "zs")
    args = ["--config.clip.name=" + tiny_clip_dir, "--workdir", wd]
    zeroshot = ["jaxprompt", "train", "--config", "base2new:zeroshot,runlocal=true"]
    assert cli.main([*zeroshot, *args]) == 0
    first = json.load(open(os.path.join(wd, "results.json")))
    assert first["steps"] == 0
    assert cli.main(["jaxprompt", "eval", "--workdir", wd]) == 0
    (key,) = os.listdir(os.path.join(wd, "evals"))
    again = json.load(open(os.path.join(wd, "evals", key)))
    assert again["accuracy"] == first["accuracy"] and again["step"] == 0


def test_a_config_runs_only_with_its_command(tmp_path, capsys):
    wd = tmp_path / "wd"
    code = cli.main(["jaxprompt", "train", "--config", "adapt:tpt", "--workdir", str(wd)])
    assert code == 2
    assert "runs with `jaxprompt adapt`" in capsys.readouterr().err
    assert not wd.exists()


@pytest.mark.slow
def test_promptsrc_run_uses_its_hooks_teacher_and_gpa(tiny_clip_dir, tmp_path, capsys):
    """The runner asks the method for its preparation and aggregator (no name switch): the
    saved prompt of a PromptSRC run is the Gaussian aggregate of its epochs. The wait for the
    teacher says what is computed, and how long it took."""
    from jaxprompt import checkpoint

    wd = tmp_path / "psrc"
    capsys.readouterr()
    code = cli.main(
        ["jaxprompt", "train", "--config", "base2new:promptsrc,runlocal=true",
         f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.depth=1",
         "--config.optim.epochs=2", "--config.data.batch_size=8", "--workdir", str(wd)]
    )  # fmt: skip
    assert code == 0
    _, meta = checkpoint.load_prompt(wd)
    assert meta["method"] == "promptsrc" and meta.get("aggregated") is True
    err = capsys.readouterr().err
    # Base-to-novel trains on the base half of the toy world's 16 classes, against the 60
    # templates of PromptSRC's teacher.
    assert re.search(
        r"\d\d:\d\d:\d\d preparing promptsrc for 8 classes \.\.\.\n"
        r".* promptsrc's teacher: the frozen text features of 60 templates x 8 classes \(480 "
        r"prompts, one compiled pass of the text encoder\)\n"
        r".* prepared promptsrc in \d+:\d\d\n",
        err,
    ), err[:3000]


def test_matmul_precision_is_checked_first_and_recorded(tiny_clip_dir, tmp_path, capsys):
    wd = tmp_path / "prec"
    base = ["jaxprompt", "train", "--config", "base2new:zeroshot,runlocal=true",
            f"--config.clip.name={tiny_clip_dir}", "--workdir", str(wd)]  # fmt: skip
    import jax

    before = jax.config.jax_default_matmul_precision
    assert cli.main([*base, "--config.matmul_precision=fastest"]) == 2
    assert "choose one of auto, default" in capsys.readouterr().err
    assert not wd.exists()
    assert cli.main([*base, "--config.matmul_precision=bfloat16"]) == 0
    res = json.load(open(wd / "results.json"))
    assert res["matmul_precision"] == "bfloat16" and res["platform"] == "cpu"
    # A context, not a global setting: the caller's precision is back afterwards.
    assert jax.config.jax_default_matmul_precision == before != "bfloat16"
