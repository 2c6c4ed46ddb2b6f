"""The `jaxprompt` command end to end on the toy world, and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest

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
    assert "| coop |" in open(os.path.join(trained, "results.md")).read()


@pytest.mark.slow
def test_finished_run_is_skipped_and_eval_needs_no_config(trained, capsys):
    before = _snapshot(trained)
    assert cli.main(["jaxprompt", "train", "--config", f"{CONFIG}:coop", "--workdir", trained]) == 0
    assert _snapshot(trained) == before
    assert cli.main(["jaxprompt", "eval", "--workdir", trained]) == 0
    res = json.load(open(os.path.join(trained, "eval_results.json")))
    first = json.load(open(os.path.join(trained, "results.json")))
    assert res["accuracy"] == first["accuracy"]


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
    ],
)
def test_bad_input_is_one_line_exit_2(args, expect, tmp_path, capsys):
    wd = tmp_path / "wd"
    code = cli.main(["jaxprompt", "train", *args, "--workdir", str(wd)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) >= 1 and err[-1].startswith("jaxprompt: error:")
    assert expect in err[-1]
    assert not (wd / "results.json").exists()


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
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
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
