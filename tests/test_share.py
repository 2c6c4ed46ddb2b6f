"""Sharing a prompt: `jaxprompt export`, `jp.load_prompt` in a fresh process, `predict`."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_WORDS

import jaxprompt as jp
from jaxprompt import checkpoint, cli, data, methods, share

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "base2new.py")
NAME = "prompt.safetensors"  # what `jaxprompt export` writes by default


@pytest.fixture(scope="module")
def run(tiny_clip_dir, tmp_path_factory):
    """A tiny CoOp base-to-novel run on the toy world, exported with the command."""
    root = tmp_path_factory.mktemp("share")
    workdir = str(root / "coop")
    code = cli.main(
        [
            "jaxprompt", "train", "--config", f"{CONFIG}:coop,runlocal=true",
            f"--config.clip.name={tiny_clip_dir}", "--config.method.kw.n_ctx=4",
            "--workdir", workdir,
        ]
    )  # fmt: skip
    assert code == 0
    assert cli.main(["jaxprompt", "export", "--workdir", workdir]) == 0
    return workdir


@pytest.fixture(scope="module")
def toy():
    """The toy dataset, its base and new class names, and a few test images."""
    ds = data.load_dataset("toy_textures")
    _, base = data.apply_protocol(ds, shots=1, seed=1, subset="base")
    _, new = data.apply_protocol(ds, shots=1, seed=1, subset="new")
    return ds, list(base), list(new), ds.split["test"][:6]


def _header(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n])


@pytest.mark.slow
def test_safetensors_file_has_no_pickle_and_the_specified_header(run, tiny_clip, toy):
    path = os.path.join(run, NAME)
    raw, n, header = _header(path)
    # A safetensors file is exactly: header length, JSON header, raw float32 buffers.
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert {v["dtype"] for v in tensors.values()} == {"F32"}
    assert len(raw) == 8 + n + max(v["data_offsets"][1] for v in tensors.values())
    assert not raw.startswith(b"PK") and b"\x80\x04\x95" not in raw[: 8 + n]
    assert set(header["__metadata__"]) == {share.META_KEY}
    meta = json.loads(header["__metadata__"][share.META_KEY])
    assert meta["format_version"] == share.FORMAT_VERSION
    assert meta["method"] == "coop" and meta["method_config"]["n_ctx"] == 4
    assert meta["backbone"]["fingerprint"] == share.backbone_fingerprint(tiny_clip)
    assert (
        meta["backbone"]["name"]
        == json.load(open(os.path.join(run, "config.json")))["clip"]["name"]
    )
    assert meta["classnames"] == toy[1]
    assert meta["protocol"] == "base2new" and meta["dataset"] == "toy_textures"
    assert meta["template"] == toy[0].spec.template
    assert meta["shots"] == 2 and meta["seed"] == 1
    assert meta["results"] == json.load(open(os.path.join(run, "results.json")))["accuracy"]
    # The arrays are the checkpoint's prompt, keyed by their pytree path.
    prompt, _ = checkpoint.load_prompt(run)
    assert set(tensors) == set(checkpoint.flatten(prompt))


@pytest.mark.slow
def test_fresh_process_without_the_run_gives_the_runs_logits(run, tiny_clip, toy, tmp_path):
    ds, base, new, examples = toy
    images = np.stack(
        [data.eval_transform(ds.fetch(x), tiny_clip.spec.image_size) for x in examples]
    )
    np.save(tmp_path / "images.npy", images)
    shutil.copy(os.path.join(run, NAME), tmp_path / "p.safetensors")
    # The reference: the run's own checkpoint and method, in this process.
    prompt, meta = checkpoint.load_prompt(run)
    method = methods.get(meta["method"], **meta["method_config"])
    want = {
        k: np.asarray(method.logits(prompt, tiny_clip, jp.make_task(tiny_clip, names), images))
        for k, names in (("base", base), ("new", new))
    }
    script = (
        "import json, sys, numpy as np, jax\n"
        "jax.config.update('jax_default_matmul_precision', 'highest')\n"
        "import jaxprompt as jp\n"
        "clip = jp.load_clip(sys.argv[1])\n"
        "method, prompt, meta = jp.load_prompt('p.safetensors', clip=clip)\n"
        "x = np.load('images.npy')\n"
        "names = json.loads(sys.argv[2])\n"
        "out = {k: np.asarray(method.logits(prompt, clip, jp.make_task(clip, v), x))"
        " for k, v in names.items()}\n"
        "np.savez('logits.npz', **out)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    away = run + ".away"
    os.rename(run, away)  # the run directory is not there for the fresh process
    try:
        out = subprocess.run(
            [sys.executable, "-c", script, os.fspath(tiny_clip.spec.name),
             json.dumps({"base": base, "new": new})],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        os.rename(away, run)
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.load(tmp_path / "logits.npz")
    for k in ("base", "new"):
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_old_npz_export_still_loads(run, tiny_clip, tmp_path):
    old = checkpoint.export(run, tmp_path / "old.npz")
    method, prompt, meta = jp.load_prompt(old, clip=tiny_clip)  # no fingerprint: not checked
    ref, _ = checkpoint.load_prompt(run)
    assert method.name == "coop" and meta["method"] == "coop"
    np.testing.assert_array_equal(prompt["ctx"], ref["ctx"])
    _, new_prompt, _ = jp.load_prompt(os.path.join(run, NAME))
    np.testing.assert_array_equal(new_prompt["ctx"], ref["ctx"])


@pytest.mark.slow
def test_predict_prints_top_k_json_over_the_given_names(run, toy, tmp_path, capsys):
    ds, _, new, examples = toy
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, x in enumerate(examples):
        data.pipeline.to_pil_rgb(ds.fetch(x)).save(folder / f"{i}.png")
    prompt = os.path.join(run, NAME)
    capsys.readouterr()
    code = cli.main(
        ["jaxprompt", "predict", "--prompt", prompt, "--classes", ",".join(new),
         "--top_k", "3", "--json", str(folder)]
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == len(examples)
    for rec in lines:
        assert os.path.dirname(rec["image"]) == str(folder)
        assert len(rec["top_k"]) == 3
        assert {t["label"] for t in rec["top_k"]} <= set(new)
        probs = [t["prob"] for t in rec["top_k"]]
        assert probs == sorted(probs, reverse=True)
        assert set(rec["probs"]) == set(new)
        assert abs(sum(rec["probs"].values()) - 1.0) < 1e-4
    # The class names may come from a file; the table form prints one line per image.
    (tmp_path / "classes.txt").write_text("\n".join(new) + "\n")
    assert cli.main(
        ["jaxprompt", "predict", "--prompt", prompt, "--classes", str(tmp_path / "classes.txt"),
         "--top_k", "2", str(folder / "0.png")]
    ) == 0  # fmt: skip
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 1 and table[0].startswith(str(folder / "0.png"))
    # A file that is not an image, or a path that does not exist: one line, exit 2.
    (tmp_path / "notes.png").write_text("not an image")
    for bad in (str(tmp_path / "notes.png"), str(tmp_path / "missing.png")):
        code = cli.main(["jaxprompt", "predict", "--prompt", prompt, "--classes", "a,b", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and bad in err[0], err


@pytest.fixture(scope="module")
def other_clip_dir(tmp_path_factory):
    """A second tiny random CLIP with another architecture (3 text layers)."""
    from jaxprompt import testing

    d = tmp_path_factory.mktemp("other_clip")
    return testing.save_random_clip(d, words=TINY_WORDS, preset="tiny", seed=1, text_layers=3)


@pytest.mark.slow
def test_another_backbone_is_a_one_line_error(run, toy, other_clip_dir, tmp_path, capsys):
    prompt = os.path.join(run, NAME)
    other = jp.load_clip(other_clip_dir)
    with pytest.raises(ValueError) as e:
        jp.load_prompt(prompt, clip=other)
    msg = str(e.value)
    assert "\n" not in msg and other_clip_dir in msg
    assert json.load(open(os.path.join(run, "config.json")))["clip"]["name"] in msg
    img = tmp_path / "x.png"
    data.pipeline.to_pil_rgb(toy[0].fetch(toy[3][0])).save(img)
    capsys.readouterr()
    code = cli.main(
        ["jaxprompt", "predict", "--prompt", prompt, "--classes", "a,b", "--clip",
         other_clip_dir, str(img)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "backbone" in err, err


def test_export_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["jaxprompt", "export", "--workdir", str(missing)]) == 2
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["jaxprompt", "export", "--workdir", str(empty)]) == 2
    assert cli.main(["jaxprompt", "export"]) == 2
    assert os.listdir(empty) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(ln.startswith("jaxprompt: error: ") for ln in err), err
    assert "no run directory" in err[0] and "no checkpoint" in err[1]


@pytest.mark.parametrize("cmd", ["export", "predict"])
def test_help_exits_0(cmd, capsys):
    assert cli.main(["jaxprompt", cmd, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: jaxprompt {cmd}")


def test_prompt_file_on_a_bucket(gcs, tmp_path):
    """save_prompt and read_prompt_file through etils.epath on gs:// (a fake GCS)."""
    script = (
        "import numpy as np; from jaxprompt import share\n"
        "p = 'gs://bucket/shared/p.safetensors'\n"
        "share.save_prompt(p, {'ctx': np.arange(6.0).reshape(2, 3)}, {'method': 'coop'})\n"
        "prompt, meta = share.read_prompt_file(p)\n"
        "assert prompt['ctx'].dtype == np.float32 and prompt['ctx'][1, 2] == 5, prompt\n"
        "assert meta == {'method': 'coop'}, meta\n"
    )
    env = {**os.environ, **gcs.env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert gcs.exists("gs://bucket/shared/p.safetensors")
    assert not gcs.exists("gs://bucket/shared/p.safetensors.tmp")
