"""`jaxprompt reproduce` and `jaxprompt table`: the paper's table from a root of runs.

The table's numbers are checked against an independent computation (numpy, in the test) from
results.json files written by hand with known numbers, for all four protocols; the run loop
with a stand-in runner (resume, failure); the published numbers' file; and one cheap toy
reproduction through the installed console script from a temporary directory.
"""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_COMPILE

from jaxprompt import cli
from jaxprompt.app import reproduce
from jaxprompt.app import table as table_lib

SCRIPT = os.path.join(os.path.dirname(sys.executable), "jaxprompt")  # the installed command
VIT = "openai/clip-vit-base-patch16"
# Rounding: the table's CSV keeps 4 decimals, so an independent value agrees to 5e-5.
TOL = 1e-4


def _write_run(root, protocol, method, dataset, seed, accuracy, *, shots=16, model=VIT):
    parts = [root, protocol, method, dataset] + ([f"{shots}s"] if shots is not None else [])
    d = os.path.join(*parts, f"seed{seed}")
    os.makedirs(d, exist_ok=True)
    rec = {"accuracy": accuracy, "protocol": protocol, "method": method, "model": model,
           "dataset": dataset, "shots": shots, "seed": seed}  # fmt: skip
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(rec, f)
    return d


def _csv(root, protocol):
    """{(table title, group, label): row} of ROOT/<protocol>/table.csv."""
    text = open(os.path.join(root, protocol, "table.csv")).read()
    out, head = {}, None
    for row in csv.reader(io.StringIO(text)):
        if row[0] == "table":
            head = row
            continue
        rec = dict(zip(head, row, strict=True))
        out[(rec["table"], rec[head[1]], rec[head[2]])] = rec
    return out


def _num(s):
    return None if s == "" else float(s)


def _hm(b, n):
    return 2 * b * n / (b + n)


# ----------------------------------------------------------------------------- published file
def test_published_numbers_parse_and_every_value_carries_a_source():
    from importlib import resources

    raw = json.loads(resources.files("jaxprompt").joinpath("assets/published.json").read_text())
    pub = table_lib.load_published()
    n_raw = sum(v is not None for t in raw["tables"] for r in t["rows"] for v in r["values"])
    # Every value is loaded (the ImageNet source column of the cross-dataset and the DG
    # tables gives the same number twice: 4 methods).
    assert len(pub) == n_raw - 4
    for key, p in pub.items():
        assert p.paper and p.table and p.backbone in ("ViT-B/16", "RN50"), key
        assert p.provenance in raw["provenance"], key
        assert 0 < p.value < 100, key
    # The main table of every seed method that has one, on ViT-B/16.
    for m in ("zeroshot", "coop", "cocoop", "maple", "promptsrc"):
        for d in reproduce.COOP11:
            for x in ("base", "new", "hm"):
                assert ("base2new", m, "ViT-B/16", d, x, None) in pub, (m, d, x)
    for m in ("zeroshot", "coop", "cocoop", "maple", "ivlp", "promptsrc"):
        assert ("base2new", m, "ViT-B/16", "Average", "hm", None) in pub
    for t in ("ImageNetA", "ImageNetR", "ImageNetV2", "ImageNetSketch"):
        assert ("xdomain", "promptsrc", "ViT-B/16", "ImageNet", t, None) in pub
        assert ("adapt", "tpt", "RN50", t, "tpt", None) in pub
    # Bayesian prompts' and POUF's tables could not be retrieved: absent, and said so.
    assert not [k for k in pub if k[1] in ("bayes", "pouf", "pouf_full")]
    absent = " ".join(a["paper"] for a in raw["absent"])
    assert "Bayesian" in absent and "POUF" in absent


def test_published_base2new_rows_are_consistent():
    """Each row's HM is 2BN/(B+N) of its own base and new, and the per-dataset means give the
    README's averages (an independent check of the transcription)."""
    pub = table_lib.load_published()
    for m in ("zeroshot", "coop", "cocoop", "maple", "promptsrc"):
        b = [pub[("base2new", m, "ViT-B/16", d, "base", None)].value for d in reproduce.COOP11]
        n = [pub[("base2new", m, "ViT-B/16", d, "new", None)].value for d in reproduce.COOP11]
        h = [pub[("base2new", m, "ViT-B/16", d, "hm", None)].value for d in reproduce.COOP11]
        # two decimals in B and N move 2BN/(B+N) by at most ~0.005; the printed HM adds 0.005
        np.testing.assert_allclose(h, [_hm(x, y) for x, y in zip(b, n, strict=True)], atol=0.011)
        avg = [pub[("base2new", m, "ViT-B/16", "Average", x, None)].value for x in ("base", "new")]
        np.testing.assert_allclose([np.mean(b), np.mean(n)], avg, atol=0.006)


# ----------------------------------------------------------------------------- four protocols
B2N = {  # (method, dataset) -> per seed (base, new, hm as a run reports it)
    ("coop", "DescribableTextures"): [(80.0, 40.0, 53.33), (82.0, 44.0, 57.27),
                                      (78.5, 41.5, 54.29)],
    ("coop", "EuroSAT"): [(90.0, 50.0, 64.29), (93.0, 58.0, 71.44), (91.0, 55.0, 68.56)],
    ("promptsrc", "DescribableTextures"): [(83.0, 62.0, 70.98), (84.0, 63.5, 72.33),
                                           (83.5, 61.0, 70.5)],
    ("promptsrc", "EuroSAT"): [(92.0, 74.0, 82.02), (93.5, 72.0, 81.35), (92.5, 75.5, 83.14)],
}  # fmt: skip
# The published ViT-B/16 numbers of these cells (PromptSRC's Table 1), typed in here.
B2N_PAPER = {
    ("coop", "DescribableTextures"): (79.44, 41.18, 54.24),
    ("coop", "EuroSAT"): (92.19, 54.74, 68.69),
    ("promptsrc", "DescribableTextures"): (83.37, 62.97, 71.75),
    ("promptsrc", "EuroSAT"): (92.90, 73.90, 82.32),
}


@pytest.fixture(scope="module")
def b2n_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("b2n"))
    for (m, d), seeds in B2N.items():
        for s, (b, n, h) in enumerate(seeds, 1):
            _write_run(root, "base2new", m, d, s, {"base": b, "new": n, "hm": h})
    assert cli.main(["jaxprompt", "table", root]) == 0
    return root


def test_base2new_table_equals_an_independent_computation(b2n_root):
    rows = _csv(b2n_root, "base2new")
    title = next(iter(rows))[0]
    for (m, d), seeds in B2N.items():
        a = np.array(seeds)
        r = rows[(title, d, m)]
        b, n = a[:, 0].mean(), a[:, 1].mean()
        assert abs(float(r["base"]) - b) < TOL and abs(float(r["new"]) - n) < TOL
        assert abs(float(r["base_std"]) - a[:, 0].std()) < TOL  # population std, np.std
        assert abs(float(r["hm"]) - _hm(b, n)) < TOL  # HM of the seed means
        assert abs(float(r["hm_std"]) - a[:, 2].std()) < TOL  # std of the per-seed HMs
        pb, pn, ph = B2N_PAPER[(m, d)]
        assert float(r["base_paper"]) == pb and float(r["hm_paper"]) == ph
        assert abs(float(r["base_delta"]) - (b - pb)) < TOL
        assert "PromptSRC" in r["base_paper_source"] and "ViT-B/16" in r["base_paper_source"]
        assert r["reproduced"] == "True" and r["runs_finished"] == "3"
    for m in ("coop", "promptsrc"):
        means = np.array(
            [np.array(B2N[(m, d)]).mean(0) for d in ("DescribableTextures", "EuroSAT")]
        )
        r = rows[(title, "Average (2 datasets)", m)]
        b, n = means[:, 0].mean(), means[:, 1].mean()
        assert abs(float(r["base"]) - b) < TOL and abs(float(r["new"]) - n) < TOL
        # The papers' average HM: of the averaged base and new, not the mean of the HMs.
        assert abs(float(r["hm"]) - _hm(b, n)) < TOL
        assert abs(float(r["hm"]) - np.mean([_hm(x, y) for x, y, _ in means])) > 0.01
        # Two of the paper's 11 datasets: its 11-dataset average is not comparable, the mean
        # of its values for these two is.
        p = np.array([B2N_PAPER[(m, d)] for d in ("DescribableTextures", "EuroSAT")])
        assert abs(float(r["base_paper"]) - p[:, 0].mean()) < TOL
        assert abs(float(r["hm_paper"]) - _hm(p[:, 0].mean(), p[:, 1].mean())) < TOL
    md = open(os.path.join(b2n_root, "base2new", "table.md")).read()
    assert "HM = the harmonic mean of those two averages" in md and "PromptSRC" in md
    tex = open(os.path.join(b2n_root, "base2new", "table.tex")).read()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "Describable" in tex
    assert tex.count("\\begin{tabular}") == 1 and "$\\pm$" in tex
    assert os.path.getsize(os.path.join(b2n_root, "base2new", "figure.png")) > 1000


def test_fewshot_table_and_curves(tmp_path):
    root = str(tmp_path)
    acc = {  # (method, dataset, shots) -> per seed
        ("coop", "EuroSAT", 1): [50.0, 54.0], ("coop", "EuroSAT", 4): [70.0, 71.0],
        ("coop", "DescribableTextures", 1): [44.0, 47.0],
        ("coop", "DescribableTextures", 4): [55.0, 58.5],
        ("promptsrc", "EuroSAT", 4): [85.0, 87.5],
        ("promptsrc", "EuroSAT", 1): [70.0, 72.0],
        ("promptsrc", "DescribableTextures", 1): [56.0, 57.0],
        ("promptsrc", "DescribableTextures", 4): [60.0, 62.0],
    }  # fmt: skip
    for (m, d, k), vals in acc.items():
        for s, v in enumerate(vals, 1):
            _write_run(root, "fewshot", m, d, s, {"test": v}, shots=k)
    assert cli.main(["jaxprompt", "table", root, "--protocol", "fewshot"]) == 0
    rows = _csv(root, "fewshot")
    title = next(iter(rows))[0]
    for (m, d, k), vals in acc.items():
        r = rows[(title, d, m)]
        assert abs(float(r[str(k)]) - np.mean(vals)) < TOL
        assert abs(float(r[f"{k}_std"]) - np.std(vals)) < TOL
    for m in ("coop", "promptsrc"):
        r = rows[(title, "Average (2 datasets)", m)]
        for k in (1, 4):
            want = np.mean([np.mean(acc[(m, d, k)]) for d in ("EuroSAT", "DescribableTextures")])
            assert abs(float(r[str(k)]) - want) < TOL
    # PromptSRC's supplementary cell (EuroSAT, 4 shots, third-party quote) sits beside ours.
    r = rows[(title, "EuroSAT", "promptsrc")]
    assert float(r["4_paper"]) == 86.30 and abs(float(r["4_delta"]) - (86.25 - 86.30)) < TOL
    assert r["1_paper"] == ""  # none published: marked
    assert "| – |" in open(os.path.join(root, "fewshot", "table.md")).read()
    assert os.path.getsize(os.path.join(root, "fewshot", "figure.png")) > 1000


def test_xdomain_splits_cross_dataset_and_domain_generalisation(tmp_path):
    root = str(tmp_path)
    per_seed = [
        {"ImageNet": 71.0, "Caltech101": 93.0, "EuroSAT": 45.0, "ImageNetV2": 64.0,
         "ImageNetA": 50.0},
        {"ImageNet": 72.0, "Caltech101": 94.5, "EuroSAT": 48.0, "ImageNetV2": 64.5,
         "ImageNetA": 51.5},
    ]  # fmt: skip
    for s, accuracy in enumerate(per_seed, 1):
        _write_run(root, "xdomain", "promptsrc", "ImageNet", s, accuracy)
    assert cli.main(["jaxprompt", "table", root]) == 0
    rows = _csv(root, "xdomain")
    titles = sorted({k[0] for k in rows})
    cross = next(t for t in titles if t.startswith("Cross-dataset"))
    dg = next(t for t in titles if t.startswith("Domain-generalisation"))
    c, g = rows[(cross, "ImageNet", "promptsrc")], rows[(dg, "ImageNet", "promptsrc")]
    mean = {k: np.mean([a[k] for a in per_seed]) for k in per_seed[0]}
    assert abs(float(c["Average"]) - np.mean([mean["Caltech101"], mean["EuroSAT"]])) < TOL
    assert abs(float(g["Average"]) - np.mean([mean["ImageNetV2"], mean["ImageNetA"]])) < TOL
    assert "ImageNetV2" not in c and "EuroSAT" not in g
    assert abs(float(g["ImageNetA_std"]) - np.std([50.0, 51.5])) < TOL
    assert float(g["ImageNetA_paper"]) == 50.90 and float(c["Caltech101_paper"]) == 93.60
    # The paper's averages are over 10 and 4 targets: over our 2 the mean of its 2 values.
    assert abs(float(g["Average_paper"]) - np.mean([64.35, 50.90])) < TOL


def test_adapt_table_before_and_after(tmp_path):
    root = str(tmp_path)
    acc = {"ImageNetA": [(47.5, 54.0), (48.0, 55.5)], "ImageNetR": [(74.0, 77.0), (73.5, 76.0)]}
    for d, seeds in acc.items():
        for s, (z, t) in enumerate(seeds, 1):
            _write_run(root, "adapt", "tpt", d, s, {"zero_shot": z, "tpt": t}, shots=None)
    assert cli.main(["jaxprompt", "table", root]) == 0
    rows = _csv(root, "adapt")
    title = next(iter(rows))[0]
    for j, metric in enumerate(("zero_shot", "tpt")):
        r = rows[(title, "tpt", metric)]
        for d, seeds in acc.items():
            assert abs(float(r[d]) - np.mean([x[j] for x in seeds])) < TOL
        want = np.mean([np.mean([x[j] for x in acc[d]]) for d in acc])
        assert abs(float(r["Average"]) - want) < TOL
    # TPT's Table 1, ViT-B/16 block: CLIP 47.87 / TPT 54.77 on ImageNet-A.
    assert float(rows[(title, "tpt", "zero_shot")]["ImageNetA_paper"]) == 47.87
    assert float(rows[(title, "tpt", "tpt")]["ImageNetA_paper"]) == 54.77


# ----------------------------------------------------------------------------- partial, failed
def test_table_on_a_partial_root_shows_only_finished_runs(tmp_path):
    root = str(tmp_path)
    plan = [{"method": "coop", "dataset": d, "shots": 16, "seed": s, "model": VIT}
            for d in ("DescribableTextures", "EuroSAT") for s in (1, 2, 3)]  # fmt: skip
    os.makedirs(os.path.join(root, "base2new"))
    with open(os.path.join(root, "base2new", "plan.json"), "w") as f:
        json.dump({"runs": plan}, f)
    _write_run(root, "base2new", "coop", "DescribableTextures", 1, {"base": 80.0, "new": 40.0})
    _write_run(root, "base2new", "coop", "DescribableTextures", 2, {"base": 82.0, "new": 44.0})
    started = os.path.join(root, "base2new/coop/DescribableTextures/16s/seed3")
    os.makedirs(started)
    with open(os.path.join(started, "config.json"), "w") as f:
        json.dump({"clip": {"name": VIT}}, f)  # running or interrupted: no number yet
    assert cli.main(["jaxprompt", "table", root]) == 0
    rows = _csv(root, "base2new")
    title = next(iter(rows))[0]
    dtd = rows[(title, "DescribableTextures", "coop")]
    assert abs(float(dtd["base"]) - 81.0) < TOL and dtd["reproduced"] == "False"
    assert dtd["runs_finished"] == "2" and dtd["runs_expected"] == "3"
    assert dtd["hm"] != "" and abs(float(dtd["hm"]) - _hm(81.0, 42.0)) < TOL
    eurosat = rows[(title, "EuroSAT", "coop")]
    assert eurosat["base"] == "" and eurosat["runs_finished"] == "0"
    assert float(eurosat["base_paper"]) == 92.19  # the published number waits beside it
    avg = rows[(title, "Average (2 datasets)", "coop")]
    assert avg["base"] == "" and avg["reproduced"] == "False"  # not until every cell has one
    md = open(os.path.join(root, "base2new", "table.md")).read()
    assert "81.00 ± 1.00*" in md and "| pending |" in md and "2/3 runs" in md


def _fake_runs(root):
    runs = []
    for d in ("DescribableTextures", "EuroSAT"):
        for s in (1, 2):
            wd = os.path.join(root, "base2new", "coop", d, "16s", f"seed{s}")
            runs.append(reproduce.PlannedRun("coop", d, 16, s, f"base2new:coop,dataset={d}",
                                             wd, "train", VIT))  # fmt: skip
    return runs


def test_plan_states_and_the_loop_resumes_skips_and_goes_on_after_a_failure(tmp_path, capsys):
    root = str(tmp_path)
    _write_run(root, "base2new", "coop", "DescribableTextures", 1, {"base": 80.0, "new": 40.0})
    interrupted = os.path.join(root, "base2new/coop/DescribableTextures/16s/seed2")
    os.makedirs(interrupted)
    with open(os.path.join(interrupted, "config.json"), "w") as f:
        json.dump({"clip": {"name": VIT}}, f)
    # The plan reads each run's state from its directory (configs parsed, nothing run).
    planned = reproduce.plan(
        "base2new", methods=["coop"], datasets=["DescribableTextures", "EuroSAT"],
        seeds=[1, 2], root=root,
    )  # fmt: skip
    states = [(r.dataset, r.seed, r.state) for r, _ in planned]
    assert states == [("DescribableTextures", 1, "done"), ("DescribableTextures", 2, "resume"),
                      ("EuroSAT", 1, "todo"), ("EuroSAT", 2, "todo")]  # fmt: skip
    assert [r.workdir for r, _ in planned] == [r.workdir for r in _fake_runs(root)]
    reproduce.write_plan(root, "base2new", [r for r, _ in planned])

    called = []

    def run_one(r, config):  # a stand-in for training: known numbers, one failure
        called.append((r.dataset, r.seed))
        if (r.dataset, r.seed) == ("EuroSAT", 1):
            raise FloatingPointError("loss is nan at step 12")
        return _write_run(root, "base2new", "coop", r.dataset, r.seed, {"base": 90.0, "new": 60.0})

    failures = reproduce.execute(
        "base2new", planned, root=root, run_one=run_one,
        write_tables=lambda: table_lib.write(root, "base2new"),
    )  # fmt: skip
    # The finished run is skipped, the interrupted one run (resumed), the failure does not
    # stop the last one.
    assert called == [("DescribableTextures", 2), ("EuroSAT", 1), ("EuroSAT", 2)]
    assert [(r.dataset, r.seed, msg) for r, msg in failures] == [
        ("EuroSAT", 1, "loss is nan at step 12")
    ]
    out = capsys.readouterr().out
    assert "about" in out and "left" in out  # the estimate after the first timed run
    failed = os.path.join(root, "base2new/coop/EuroSAT/16s/seed1/failed.json")
    assert json.load(open(failed))["error"] == "loss is nan at step 12"
    rows = _csv(root, "base2new")
    title = next(iter(rows))[0]
    eu = rows[(title, "EuroSAT", "coop")]
    assert eu["runs_finished"] == "1" and eu["reproduced"] == "False"
    assert "seed 1 failed: loss is nan at step 12" in eu["status"]
    assert rows[(title, "DescribableTextures", "coop")]["reproduced"] == "True"
    # Run again: only the failed run runs; on success its failure mark goes.
    planned = reproduce.plan(
        "base2new", methods=["coop"], datasets=["DescribableTextures", "EuroSAT"],
        seeds=[1, 2], root=root,
    )  # fmt: skip
    called.clear()
    assert reproduce.execute("base2new", planned, root=root, run_one=lambda r, c: (
        called.append((r.dataset, r.seed)),
        _write_run(root, "base2new", "coop", r.dataset, r.seed, {"base": 91.0, "new": 61.0}),
    )) == []  # fmt: skip
    assert called == [("EuroSAT", 1)] and not os.path.exists(failed)


def test_a_failed_cell_is_marked(tmp_path):
    root = str(tmp_path)
    run = os.path.join(root, "base2new/coop/EuroSAT/16s/seed1")
    os.makedirs(run)
    with open(os.path.join(run, "failed.json"), "w") as f:
        json.dump({"error": "out of memory"}, f)
    _write_run(root, "base2new", "coop", "DescribableTextures", 1, {"base": 80.0, "new": 40.0})
    md = table_lib.write(root, "base2new")
    line = next(ln for ln in md.splitlines() if ln.startswith("| EuroSAT | coop |"))
    assert "| failed |" in line and "seed 1 failed: out of memory" in line


# ----------------------------------------------------------------------------- the command
def _env():
    return {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # one device, as a user's machine


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    for args, expect in [
        (["reproduce", "base2new", "--methods", "coop", "--datasets", "toyx", "--root", "r"],
         "unknown dataset 'toyx'"),
        (["reproduce", "base2new", "--methods", "copo", "--datasets", "toy", "--root", "r"],
         "unknown method 'copo'"),
        (["reproduce", "adapt", "--methods", "tpt", "--shots", "4", "--root", "r"],
         "adapt has no shots"),
        (["table", "nowhere"], "nowhere is not a directory"),
    ]:  # fmt: skip
        out = subprocess.run([SCRIPT, *args], cwd=tmp_path, env=_env(), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        err = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(err) == 1, out.stderr[-2000:]
        assert err[0].startswith("jaxprompt: error:") and expect in err[0], err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_toy_reproduction_through_the_console_script(tmp_path):
    """One method, dataset and seed with a one-epoch schedule: plan, run, tables, figure; then
    the run is made interrupted (its results removed, its checkpoint kept) and the same
    command resumes it."""
    cmd = [SCRIPT, "reproduce", "base2new", "--methods", "coop", "--datasets", "toy_textures",
           "--seeds", "1", "--root", "runs", "--config.optim.epochs=1"]  # fmt: skip
    dry = subprocess.run([*cmd, "--dry-run"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert dry.returncode == 0 and "1 runs" in dry.stdout and "[todo]" in dry.stdout
    assert not (tmp_path / "runs").exists()
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    where = tmp_path / "runs/base2new"
    for name in table_lib.FILES:
        assert (where / name).stat().st_size > 0, name
    rec = json.load(open(where / "coop/toy_textures/16s/seed1/results.json"))
    rows = _csv(str(tmp_path / "runs"), "base2new")
    r = rows[(next(iter(rows))[0], "toy_textures", "coop")]
    assert float(r["base"]) == rec["accuracy"]["base"] and r["reproduced"] == "True"
    assert r["base_paper"] == ""  # no paper has a toy world
    os.remove(where / "coop/toy_textures/16s/seed1/results.json")
    again = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 done, 1 to resume, 0 to run" in again.stdout and "[resume]" in again.stdout
    assert "resum" in again.stderr.lower()
    again_rec = json.load(open(where / "coop/toy_textures/16s/seed1/results.json"))
    assert again_rec["accuracy"] == rec["accuracy"]
