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


def _image_files(ds, examples, folder) -> list[str]:
    """The examples' images as PNG files in ``folder`` (what `predict` reads), sorted."""
    folder.mkdir()
    for i, x in enumerate(examples):
        data.pipeline.to_pil_rgb(ds.fetch(x)).save(folder / f"{i}.png")
    return sorted(str(p) for p in folder.iterdir())


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
    # The reference's prompt is read before the run directory goes away; its (eager, slow)
    # logits are computed while the fresh process starts and computes its own, so the two
    # overlap on a multi-core machine instead of running one after the other.
    prompt, meta = checkpoint.load_prompt(run)
    method = methods.get(meta["method"], **meta["method_config"])
    away = run + ".away"
    os.rename(run, away)  # the run directory is not there for the fresh process
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, os.fspath(tiny_clip.spec.name),
             json.dumps({"base": base, "new": new})],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            want = {
                k: np.asarray(
                    method.logits(prompt, tiny_clip, jp.make_task(tiny_clip, names), images)
                )
                for k, names in (("base", base), ("new", new))
            }
            _, stderr = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.rename(away, run)
    assert proc.returncode == 0, stderr[-3000:]
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
    _image_files(ds, examples, folder)  # predict is given the folder
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


@pytest.mark.parametrize("cmd", ["export", "push", "predict"])
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


# ------------------------------------------------------------------------------------------------
# The Hugging Face Hub, stood in for at the client boundary (no network)
# ------------------------------------------------------------------------------------------------


def _hub_error(cls, message, status):
    """A huggingface_hub HTTP error as the Hub client raises it: before huggingface_hub 1.0 from
    a message alone, since then with the HTTP response it came with (a keyword argument)."""
    try:
        return cls(message)
    except TypeError:
        import importlib

        from huggingface_hub import errors

        http = importlib.import_module(errors.Response.__module__.split(".")[0])  # httpx(2)
        request = http.Request("GET", "https://huggingface.co/api/models")
        return cls(message, response=errors.Response(status, request=request))


class FakeHub:
    """A local Hub: files under ``root/<user>/<name>/<revision>/``, and every call recorded.

    It replaces exactly what jaxprompt calls: ``HfApi.create_repo``, ``HfApi.create_branch``,
    ``HfApi.upload_folder`` and ``huggingface_hub.hf_hub_download`` (looked up on the module at
    call time), with the real ones' keyword arguments.
    """

    def __init__(self, root):
        self.root = root
        self.calls = []
        self.repos = {}  # repo_id -> private

    def files(self, repo_id, revision="main"):
        d = self.root / repo_id / revision
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def install(self, monkeypatch):
        import huggingface_hub
        from huggingface_hub import utils as hf_utils

        hub = self

        def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kw):
            hub.calls.append(("create_repo", repo_id))
            assert repo_type == "model"
            if repo_id in hub.repos and not exist_ok:
                raise _hub_error(hf_utils.HfHubHTTPError, f"409 {repo_id} exists", 409)
            hub.repos.setdefault(repo_id, bool(private))
            (hub.root / repo_id / "main").mkdir(parents=True, exist_ok=True)
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, **kw):
            hub.calls.append(("create_branch", repo_id, branch))
            dst = hub.root / repo_id / branch
            if not dst.exists():
                shutil.copytree(hub.root / repo_id / "main", dst)

        def upload_folder(self, *, repo_id, folder_path, repo_type=None, revision=None, **kw):
            hub.calls.append(("upload_folder", repo_id, revision))
            assert repo_id in hub.repos, "upload before create_repo"
            dst = hub.root / repo_id / (revision or "main")
            assert dst.is_dir(), f"no branch {revision}"
            shutil.copytree(folder_path, dst, dirs_exist_ok=True)

        def hf_hub_download(repo_id, filename, *, revision=None, repo_type=None, **kw):
            hub.calls.append(("download", repo_id, filename, revision))
            if repo_id not in hub.repos:
                raise _hub_error(hf_utils.RepositoryNotFoundError, f"404 {repo_id}", 404)
            path = hub.root / repo_id / (revision or "main") / filename
            if not path.exists():
                raise _hub_error(hf_utils.EntryNotFoundError, f"404 {filename}", 404)
            return str(path)

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        return self


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "hub").install(monkeypatch)


def _front_matter(card):
    assert card.startswith("---\n")
    text = card.split("---\n")[1]
    try:
        import yaml
    except ImportError:  # the card is still checked line by line below
        return None
    return yaml.safe_load(text)


@pytest.mark.slow
def test_push_uploads_prompt_card_and_config_and_loads_back(run, hub, tiny_clip, toy, capsys):
    capsys.readouterr()
    assert cli.main(["jaxprompt", "push", "--workdir", run, "--repo", "user/name"]) == 0
    assert capsys.readouterr().out.strip() == "hf://user/name"
    assert hub.files("user/name") == ["README.md", "config.json", NAME]
    assert hub.repos == {"user/name": False}
    main = hub.root / "user" / "name" / "main"
    assert json.loads((main / "config.json").read_text()) == json.load(
        open(os.path.join(run, "config.json"))
    )
    # The card: front matter, the run's fields, its results as results.json has them, citations.
    card = (main / "README.md").read_text()
    record = json.load(open(os.path.join(run, "results.json")))
    backbone = json.load(open(os.path.join(run, "config.json")))["clip"]["name"]
    front = _front_matter(card)
    if front is not None:
        assert front["library_name"] == "jaxprompt"
        assert front["tags"] == ["prompt-learning", "clip", "coop"]
        assert front["datasets"] == ["toy_textures"]
        assert "base_model" not in front  # the tiny CLIP is a local folder, not a Hub id
    assert "| method | `coop` |" in card and f"| backbone | `{backbone}` |" in card
    assert "| protocol | `base2new` |" in card and "| shots | `2` |" in card
    assert "| seed | `1` |" in card
    rows = dict(
        ln.strip("|").replace(" ", "").split("|")
        for ln in card.split("## Results")[1].split("##")[0].splitlines()
        if ln.startswith("| ") and "accuracy" not in ln
    )
    assert {k: float(v) for k, v in rows.items()} == {
        k: round(float(v), 2) for k, v in record["accuracy"].items()
    }
    assert "@article{zhou2022coop" in card and "Learning to Prompt for Vision-Language" in card
    assert "@inproceedings{radford2021clip" in card
    assert 'jp.load_prompt("hf://user/name"' in card and "--prompt hf://user/name" in card
    # The round trip: the Hub's prompt is the local export's, arrays and header.
    method, prompt, meta = jp.load_prompt("hf://user/name", clip=tiny_clip)
    _, local, local_meta = jp.load_prompt(os.path.join(run, NAME))
    assert method.name == "coop" and meta == local_meta
    assert checkpoint.flatten(prompt).keys() == checkpoint.flatten(local).keys()
    for k, v in checkpoint.flatten(local).items():
        np.testing.assert_array_equal(checkpoint.flatten(prompt)[k], v)
    # Another branch: created, pushed to, loaded by @revision; predict reads hf:// too.
    assert cli.main(
        ["jaxprompt", "push", "--workdir", run, "--repo", "user/name", "--revision", "v1"]
    ) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == "hf://user/name@v1"
    assert hub.files("user/name", "v1") == ["README.md", "config.json", NAME]
    assert "hf://user/name@v1" in (hub.root / "user/name/v1/README.md").read_text()
    _, p1, _ = jp.load_prompt("hf://user/name@v1")
    np.testing.assert_array_equal(p1["ctx"], local["ctx"])
    ds, _, new, examples = toy
    img = hub.root.parent / "x.png"
    data.pipeline.to_pil_rgb(ds.fetch(examples[0])).save(img)
    code = cli.main(
        ["jaxprompt", "predict", "--prompt", "hf://user/name@v1", "--classes", ",".join(new),
         "--json", str(img)]
    )  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out)["image"] == str(img)
    # A repository or revision the Hub does not have: one line, exit 2.
    code = cli.main(["jaxprompt", "predict", "--prompt", "hf://user/other", "--classes", "a,b",
                     str(img)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "hf://user/other" in err[0], err


def test_push_bad_input_is_one_line_exit_2_and_uploads_nothing(hub, tmp_path, capsys):
    capsys.readouterr()
    for repo in ("noslash", "a/b/c", "user/na me", "-user/name", "user/name@v1", "us--er/x"):
        code = cli.main(["jaxprompt", "push", "--workdir", str(tmp_path), f"--repo={repo}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and repr(repo) in err[0], (repo, err)
    missing = tmp_path / "nope"
    assert cli.main(["jaxprompt", "push", "--workdir", str(missing), "--repo", "u/n"]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert cli.main(["jaxprompt", "push", "--workdir", str(tmp_path), "--repo", "u/n"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli.main(["jaxprompt", "push", "--repo", "u/n"]) == 2
    assert hub.calls == [] and not hub.root.exists()
    assert not missing.exists()


def test_hub_references_parse_and_a_bad_one_is_a_value_error():
    assert share.parse_hub_ref("hf://user/name") == ("user/name", None)
    assert share.parse_hub_ref("hf://org-1/clip.coop_v2@v1.0") == ("org-1/clip.coop_v2", "v1.0")
    assert share.is_hub_ref("hf://a/b") and not share.is_hub_ref("a/b.safetensors")
    for bad in ("hf://", "hf://name", "hf://a/b/c", "hf://a/b@", "hf://a/../b"):
        with pytest.raises(ValueError, match="hf://"):
            share.parse_hub_ref(bad)


def test_an_unreachable_hub_fails_at_once_in_one_line(run, hub, monkeypatch, capsys):
    # Online settings, but the Hub's address refuses connections (the discard port): the hub
    # client would retry for ~26 s and log every try; jaxprompt asks once and stops.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    capsys.readouterr()
    assert cli.main(["jaxprompt", "push", "--workdir", run, "--repo", "user/name"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "jaxprompt: error: cannot reach the Hugging Face Hub (http://127.0.0.1:9): nothing was "
        "uploaded; check the network (or HF_ENDPOINT) and push again"
    ]
    assert hub.calls == []
    kw = {}

    def cache_only(repo_id, filename, **k):
        kw.update(k)
        from huggingface_hub import utils as hf_utils

        raise hf_utils.LocalEntryNotFoundError("not cached")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    with pytest.raises(FileNotFoundError, match="not in the Hub cache"):
        jp.load_prompt("hf://user/name")
    assert kw["local_files_only"] is True  # the cache only: no retries against a dead address


def _dropped_connection():
    """What the installed hub client raises when the Hub drops the connection mid-request:
    requests' ConnectionError around urllib3's MaxRetryError (huggingface_hub<1, the raw repr
    `push` used to print), or httpx(2)'s RemoteProtocolError (huggingface_hub>=1)."""
    import importlib

    from huggingface_hub import errors

    root = errors.HfHubHTTPError.__mro__[1].__module__.split(".")[0]  # requests, httpx, httpx2
    http = importlib.import_module(root)
    if root == "requests":
        import urllib3

        reset = ConnectionResetError(104, "Connection reset by peer")
        return http.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/api", reason=reset))
    return http.RemoteProtocolError("Server disconnected without sending a response.")


def _token_missing():
    from huggingface_hub import errors

    return errors.LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")


HUB_FAILURES = [
    # (the exception, what the one line must say after "<what failed>: ")
    (_dropped_connection, "the connection to the Hugging Face Hub (https://huggingface.co) "
     "failed ("),
    (lambda: _hub_error(share_errors().HfHubHTTPError, "401 Client Error", 401),
     "the Hub refused the token (401 Unauthorized): log in with `hf auth login`"),
    (lambda: _hub_error(share_errors().HfHubHTTPError, "403 Client Error", 403),
     "the Hub refused access (403 Forbidden)"),
    (lambda: _hub_error(share_errors().HfHubHTTPError, "500 Server Error", 500),
     "the Hub failed (500 server error)"),
    (_token_missing, "no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN)"),
]  # fmt: skip


def share_errors():
    from huggingface_hub import errors

    return errors


@pytest.mark.parametrize("make,expect", HUB_FAILURES, ids=["dropped", "401", "403", "500", "token"])
def test_a_hub_failing_mid_push_or_download_is_one_line_naming_the_fix(
    run, hub, monkeypatch, capsys, tmp_path, make, expect
):
    import huggingface_hub

    from jaxprompt import hf_checkpoint

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(hf_checkpoint, "hub_reachable", lambda timeout=3.0: True)

    def fail(*args, **kwargs):
        raise make()

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fail)  # after create_repo
    capsys.readouterr()
    assert cli.main(["jaxprompt", "push", "--workdir", run, "--repo", "user/name"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxprompt: error: push to user/name failed: ")
    assert expect in err[0], err[0]
    assert "run the same push again (nothing is published before the upload's commit)" in err[0]
    assert "Error(" not in err[0]  # no exception repr

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    code = cli.main(
        ["jaxprompt", "predict", "--prompt", "hf://user/name", "--classes", "a,b",
         str(tmp_path / "img.png")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("jaxprompt: error: cannot download hf://user/name: ")
    assert expect in err[0]


def test_hub_download_errors_are_one_line_file_not_found(monkeypatch):
    import huggingface_hub
    from huggingface_hub import utils as hf_utils

    def offline(repo_id, filename, **kw):
        raise hf_utils.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="not in the Hub cache") as e:
        jp.load_prompt("hf://user/name")
    assert "\n" not in str(e.value) and "hf://user/name" in str(e.value)


# ------------------------------------------------------------------------------------------------
# TPT prompts: an adapt run exported, then predict tunes per image
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpt_export(run, tiny_clip_dir, tmp_path_factory):
    """TPT + CoOp on the toy world (the trained CoOp run as the base), exported."""
    root = tmp_path_factory.mktemp("tpt_share")
    workdir = str(root / "tpt_coop")
    adapt_config = os.path.join(REPO, "configs", "adapt.py")
    code = cli.main(
        [
            "jaxprompt", "adapt", "--config",
            f"{adapt_config}:tpt_coop,dataset=toy_textures,runlocal=true",
            f"--config.clip.name={tiny_clip_dir}", f"--config.init_from={run}",
            "--config.data.limit=0", "--config.data.every=100", "--workdir", workdir,
        ]
    )  # fmt: skip
    assert code == 0
    out = str(root / "tpt.safetensors")
    assert cli.main(["jaxprompt", "export", "--workdir", workdir, "--out", out]) == 0
    return workdir, out


@pytest.mark.slow
def test_tpt_export_names_tpt_around_the_trained_base(run, tpt_export):
    _, path = tpt_export
    prompt, meta = share.read_prompt_file(path)
    assert meta["method"] == "tpt" and meta["protocol"] == "adapt"
    cfg = meta["method_config"]
    assert cfg["base"]["method"] == "coop" and cfg["base"]["method_config"]["n_ctx"] == 4
    assert (cfg["views"], cfg["keep"], cfg["steps"], cfg["reset"]) == (16, 0.1, 1, "episodic")
    assert cfg["optimizer"]["name"] == "adamw" and cfg["optimizer"]["weight_decay"] == 0.01
    assert set(meta["results"]) == {"zero_shot", "tpt"}
    # The prompt is the trained CoOp context every episode starts from.
    trained, _ = checkpoint.load_prompt(run)
    np.testing.assert_array_equal(prompt["ctx"], np.asarray(trained["ctx"]))
    method, _, _ = share.load_prompt(path)
    assert method.name == "tpt" and method.config["base"].name == "coop"


@pytest.mark.slow
def test_predict_on_a_tpt_prompt_equals_the_library_episode(run, tpt_export, toy, tmp_path):
    """predict tunes the base prompt on each image's views; the same episode through the
    library (views from fold_in(key(0), i), episode(), the trained ctx read from the run's
    checkpoint, not the exported file) gives the same top-k and probabilities."""
    import jax

    from jaxprompt.methods.tpt import adamw_torch, episode, views_from_images

    _, path = tpt_export
    ds, _, new, examples = toy
    files = _image_files(ds, examples[:3], tmp_path / "imgs")
    # The command runs in a fresh process while this one compiles and runs the library's
    # episodes: the two overlap on a multi-core machine instead of running one after the other.
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxprompt", "predict", "--prompt", path, "--classes",
         ",".join(new), "--top_k", "3", "--json", *files],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    try:
        clip = jp.load_clip(share.read_prompt_file(path)[1]["backbone"]["name"])
        trained, _ = checkpoint.load_prompt(run)
        base = methods.coop(n_ctx=4, remat=True)
        task = jp.make_task(clip, new, template=ds.spec.template)
        tx = adamw_torch(5e-3, weight_decay=0.01)
        size = clip.spec.image_size

        @jax.jit
        def library(x, i):
            key = jax.random.fold_in(jax.random.key(0), i)
            views = views_from_images(key, x[None], 16, True)[0]
            tuned = episode(base, tx, trained, clip, task, views, steps=1, keep=0.1)
            return tuned, base.logits(trained, clip, task, views[:1])[0]

        expected = []
        for i, f in enumerate(files):
            x = data.eval_transform(open(f, "rb").read(), size)
            logits, untuned = library(np.asarray(x), i)
            expected.append((np.asarray(jax.nn.softmax(logits)), np.asarray(untuned)))
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    recs = [json.loads(ln) for ln in stdout.splitlines() if ln.strip()]
    assert [r["image"] for r in recs] == files
    for r in recs:
        assert len(r["top_k"]) == 3 and set(r["probs"]) == set(new)
        assert abs(sum(r["probs"].values()) - 1.0) < 1e-4

    for r, (probs, untuned) in zip(recs, expected, strict=True):
        order = np.argsort(-probs)[:3]
        assert [t["label"] for t in r["top_k"]] == [new[j] for j in order]
        np.testing.assert_allclose([t["prob"] for t in r["top_k"]], probs[order], atol=1e-4)
        # Tuning moved the prediction off the untuned CoOp one (the episode ran).
        assert not np.allclose(np.asarray(jax.nn.softmax(untuned)), probs, atol=1e-6)


@pytest.mark.slow
def test_predict_tpt_tunes_a_plain_coop_export_like_the_library_episode(run, toy, tmp_path, capsys):
    """`jaxprompt predict --tpt` on a CoOp export: TPT + CoOp with the paper's settings (64
    views from fold_in(key(0), i), 6 kept, one AdamW step, lr 5e-3, weight decay 0.01) equals
    the library's episode on the trained context read from the run's checkpoint."""
    import jax

    from jaxprompt.methods.tpt import adamw_torch, episode, views_from_images

    ds, _, new, examples = toy
    files = _image_files(ds, examples[:2], tmp_path / "imgs")
    path = os.path.join(run, NAME)
    args = ["--prompt", path, "--classes", ",".join(new), "--top_k", "3", "--json", *files]
    assert cli.main(["jaxprompt", "predict", *args, "--tpt"]) == 0
    tuned = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert cli.main(["jaxprompt", "predict", *args]) == 0
    plain = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [r["image"] for r in tuned] == files

    clip = jp.load_clip(share.read_prompt_file(path)[1]["backbone"]["name"])
    trained, _ = checkpoint.load_prompt(run)
    base = methods.coop(n_ctx=4)
    task = jp.make_task(clip, new, template=ds.spec.template)
    tx = adamw_torch(5e-3, weight_decay=0.01)
    size = clip.spec.image_size

    @jax.jit
    def library(x, i):
        views = views_from_images(jax.random.fold_in(jax.random.key(0), i), x[None], 64, False)
        return episode(base, tx, trained, clip, task, views[0], steps=1, keep=0.1)

    for i, (f, r, p) in enumerate(zip(files, tuned, plain, strict=True)):
        x = data.eval_transform(open(f, "rb").read(), size)
        probs = np.asarray(jax.nn.softmax(library(np.asarray(x), i)))
        got = np.array([r["probs"][n] for n in new])
        np.testing.assert_allclose(got, probs, atol=1e-4)
        # The episode ran: the tuned prediction is not the plain CoOp one.
        assert not np.allclose(got, [p["probs"][n] for n in new], atol=1e-5)
