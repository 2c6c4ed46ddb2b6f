"""The paper's table from a root of runs, with the published numbers beside ours.

    jaxprompt table ROOT [--protocol base2new]

reads every run under ``ROOT/<protocol>/<method>/<dataset>/[<shots>s/]seed<n>`` (the layout
``jaxprompt reproduce`` and ``jaxprompt sweep`` write; local or ``gs://``) and writes, per
protocol, ``ROOT/<protocol>/table.md``, ``table.csv``, ``table.tex`` (booktabs) and
``figure.png``. Nothing is trained: only finished runs (with ``results.json``) give numbers, so
the tables can be looked at while a reproduction runs, and run directories copied in from
other machines merge into one root.

Layouts, as the papers print them:

* base2new: per dataset and method, base / new / HM; the Average row averages base and new
  over the datasets and takes the HM of those averages (not the mean of the per-dataset HMs).
* fewshot: accuracy per dataset and shot count, the average over datasets, and the few-shot
  curves (one panel per dataset and the average, one line per method).
* xdomain: per source, a cross-dataset table (the source and every other label space, average
  over those targets) and a domain-generalisation table (the source and its shifted domains).
* adapt: per method, the accuracy before (zero_shot) and after adaptation on every dataset.

Each of our cells (mean ± population std over seeds, ``np.std`` as the papers' scripts) sits
beside the published number (``jaxprompt/assets/published.json``: every value with its paper,
table, backbone and provenance) and the difference; "–" marks a cell with no published value.
A cell is reproduced only when every planned seed finished; a failed run is named in its row.

Pure Python and numpy (matplotlib for the figure only): no jax, no model.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
from etils import epath

__all__ = [
    "PROTOCOLS",
    "Cell",
    "Published",
    "Row",
    "Run",
    "Table",
    "backbone_label",
    "build",
    "collect",
    "load_published",
    "main",
    "render_csv",
    "render_markdown",
    "render_tex",
    "write",
]

log = logging.getLogger("jaxprompt")

PROTOCOLS = ("base2new", "fewshot", "xdomain", "adapt")
RESULTS = "results.json"  # a finished run (jaxprompt.app.rundir.RESULTS)
CONFIG = "config.json"  # a started run
FAILED = "failed.json"  # a run that raised (written by `jaxprompt reproduce`)
PLAN = "plan.json"  # the runs `jaxprompt reproduce` planned under ROOT/<protocol>
AVERAGE = "Average"

# The shifted domains of a source (same label space): domain generalisation; every other
# target of an xdomain run is another label space (cross-dataset transfer).
DOMAIN_SHIFTS = {
    "ImageNet": ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"),
    "toy_textures": ("toy_textures_sketch", "toy_textures_night", "toy_textures_cartoon"),
}
XDOMAIN_AVERAGES = {
    "cross-dataset": "average:cross-dataset",
    "domain-generalisation": "average:domain-generalisation",
}


# ---------------------------------------------------------------------------- published numbers
@dataclasses.dataclass(frozen=True)
class Published:
    """One published number and where it comes from."""

    value: float
    paper: str
    table: str
    backbone: str
    provenance: str  # verified | third_party | recalled (see published.json)
    note: str = ""
    average_over: tuple[str, ...] = ()  # an average's datasets

    @property
    def source(self) -> str:
        """``paper, table, backbone [provenance]`` in one line."""
        paper = self.paper.split(":")[0]
        note = f"; {self.note}" if self.note else ""
        return f"{paper}, {self.table}, {self.backbone} [{self.provenance}{note}]"


# (protocol, method, backbone, dataset, metric, shots)
Key = tuple[str, str, str, str, str, int | None]


def load_published(text: str | None = None) -> dict[Key, Published]:
    """The published numbers by ``(protocol, method, backbone, dataset, metric, shots)``.

    Args:
      text: the JSON text (default: the packaged ``jaxprompt/assets/published.json``).

    ``shots`` is kept for the few-shot protocol only (None elsewhere).

    Raises:
      ValueError: a value without paper, table, backbone or provenance, or a key given twice.
    """
    if text is None:
        text = resources.files("jaxprompt").joinpath("assets", "published.json").read_text()
    doc = json.loads(text)
    out: dict[Key, Published] = {}
    for block in doc["tables"]:
        for row in block["rows"]:
            if len(row["values"]) != len(block["columns"]):
                raise ValueError(f"{block['table']}: {row} has not one value per column")
            for col, value in zip(block["columns"], row["values"], strict=True):
                if value is None:
                    continue
                f = {**block, **col, **row}  # the most specific level wins
                protocol = f["protocol"]
                shots = int(f["shots"]) if protocol == "fewshot" else None
                key = (protocol, f["method"], f["backbone"], f["dataset"], f["metric"], shots)
                pub = Published(
                    float(value),
                    f["paper"],
                    f["table"],
                    f["backbone"],
                    f["provenance"],
                    row.get("note", ""),
                    tuple(f.get("average_over", ())),
                )
                if not all((pub.paper, pub.table, pub.backbone, pub.provenance)):
                    raise ValueError(f"{key}: a published value needs paper, table and backbone")
                if pub.provenance not in doc["provenance"]:
                    raise ValueError(f"{key}: unknown provenance {pub.provenance!r}")
                if key in out and out[key].value != pub.value:
                    raise ValueError(f"{key} has two different published values")
                out.setdefault(key, pub)  # the same number in two tables: the first source
    return out


def backbone_label(model: str) -> str:
    """The papers' name of the backbone a run used (``openai/clip-vit-base-patch16`` and
    ``/x/ViT-B-16.pt`` -> ``ViT-B/16``, ``rn50`` -> ``RN50``); other names unchanged."""
    from jaxprompt import backbones

    name = str(model)
    for openai_name, hub in backbones.HUB_IDS.items():
        if name.rstrip("/").endswith(hub):
            return openai_name
    stem = re.sub(r"\.pt$", "", name.rstrip("/").rsplit("/", 1)[-1])
    return backbones.canonical(name) or backbones.canonical(stem) or name


# ---------------------------------------------------------------------------- runs on disk
@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory under a root, as the table sees it.

    ``state``: ``done`` (results.json), ``failed`` (failed.json, no results) or ``started``
    (a config, no results: running, or interrupted and resumable).
    """

    protocol: str
    method: str
    dataset: str
    shots: int | None
    seed: int
    state: str
    accuracy: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model: str = ""
    error: str = ""
    workdir: str = ""


def _canonical(name: str) -> str:
    from jaxprompt.data import catalog

    try:
        return catalog.canonical_name(name) or name
    except KeyError:
        return name


def read_run(path: epath.Path, *, protocol: str, method: str, dataset: str, shots, seed) -> Run:
    """The state of one run directory (see :class:`Run`)."""
    ident = dict(protocol=protocol, method=method, shots=shots, seed=seed, workdir=str(path))
    if (path / RESULTS).exists():
        rec = json.loads((path / RESULTS).read_text())
        acc = {_canonical(k): float(v) for k, v in rec["accuracy"].items()}
        return Run(
            dataset=_canonical(rec.get("dataset") or dataset),
            state="done",
            accuracy=acc,
            model=str(rec.get("model", "")),
            **ident,
        )
    model = ""
    if (path / CONFIG).exists():
        model = str(json.loads((path / CONFIG).read_text()).get("clip", {}).get("name", ""))
    if (path / FAILED).exists():
        err = json.loads((path / FAILED).read_text()).get("error", "")
        return Run(dataset=_canonical(dataset), state="failed", error=err, model=model, **ident)
    return Run(dataset=_canonical(dataset), state="started", model=model, **ident)


def collect(root: str, protocol: str) -> list[Run]:
    """Every run directory under ``root/<protocol>`` (``<method>/<dataset>/[<k>s/]seed<n>``)."""
    base = epath.Path(root) / protocol
    if not base.exists():
        return []
    runs = []
    for m in sorted(p for p in base.iterdir() if p.is_dir()):
        for d in sorted(p for p in m.iterdir() if p.is_dir()):
            for path, shots in _seed_dirs(d):
                seed = int(path.name[len("seed") :])
                runs.append(
                    read_run(
                        path, protocol=protocol, method=m.name, dataset=d.name, shots=shots,
                        seed=seed,
                    )
                )  # fmt: skip
    return runs


def _seed_dirs(d: epath.Path) -> Iterable[tuple[epath.Path, int | None]]:
    for p in sorted(d.iterdir()):
        if re.fullmatch(r"seed\d+", p.name) and p.is_dir():
            yield p, None
        elif re.fullmatch(r"\d+s", p.name) and p.is_dir():
            for q in sorted(p.iterdir()):
                if re.fullmatch(r"seed\d+", q.name) and q.is_dir():
                    yield q, int(p.name[:-1])


def read_plan(root: str, protocol: str) -> list[dict[str, Any]]:
    """The runs ``jaxprompt reproduce`` planned under ``root/<protocol>`` ([] when none)."""
    path = epath.Path(root) / protocol / PLAN
    return json.loads(path.read_text())["runs"] if path.exists() else []


# ---------------------------------------------------------------------------- the table model
@dataclasses.dataclass
class Cell:
    """One number of ours beside the published one.

    ``mean`` / ``std`` are None when no run of the cell finished (``std`` also for averages
    over datasets, which the papers give without one). ``finished`` / ``expected`` count runs
    (seeds, or every run an average covers).
    """

    mean: float | None = None
    std: float | None = None
    finished: int = 0
    expected: int = 0
    failed: int = 0
    published: Published | None = None

    @property
    def complete(self) -> bool:
        """Every expected run finished (a reproduced number)."""
        return self.mean is not None and self.expected > 0 and self.finished == self.expected

    @property
    def delta(self) -> float | None:
        """Ours minus the published number (None unless both exist)."""
        if self.mean is None or self.published is None:
            return None
        return self.mean - self.published.value


@dataclasses.dataclass
class Row:
    """A row of a table: two label columns and one cell per column."""

    group: str
    label: str
    cells: list[Cell]
    status: str = ""
    average: bool = False


@dataclasses.dataclass
class Table:
    """One table of a protocol, in the paper's layout."""

    protocol: str
    title: str
    heads: tuple[str, str]  # the two label columns' names
    columns: list[str]
    rows: list[Row]
    notes: list[str]
    curves: bool = False  # columns are shot counts (the figure draws lines)


def _hm(b: float, n: float) -> float:
    return 0.0 if b + n == 0 else 2.0 * b * n / (b + n)


def _ordered(first: Iterable[Any], then: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for x in [*first, *then]:
        if x not in out:
            out.append(x)
    return out


class _Index:
    """The runs of one protocol by (method, dataset, shots): finished, failed and expected."""

    def __init__(self, runs: Sequence[Run], plan: Sequence[Mapping[str, Any]]):
        self.runs: dict[tuple, dict[int, Run]] = {}
        self.expected: dict[tuple, set[int]] = {}
        self.models: dict[tuple, str] = {}
        keys = []
        for p in plan:
            k = (p["method"], _canonical(p["dataset"]), p.get("shots"))
            self.expected.setdefault(k, set()).add(int(p["seed"]))
            self.models.setdefault(k, str(p.get("model", "")))
            keys.append(k)
        for r in runs:
            k = (r.method, r.dataset, r.shots)
            self.runs.setdefault(k, {})[r.seed] = r
            keys.append(k)
        if not plan:  # no plan: every seed seen in the protocol is expected everywhere
            seeds = {r.seed for r in runs}
            for k in keys:
                self.expected[k] = set(seeds)
        for k in keys:
            self.expected.setdefault(k, set()).update(self.runs.get(k, {}))
            done = [r for r in self.runs.get(k, {}).values() if r.state == "done" and r.model]
            if done:
                self.models[k] = done[0].model
        self.keys = _ordered(keys, [])
        self.methods = _ordered((k[0] for k in self.keys), [])
        self.datasets = _ordered((k[1] for k in self.keys), [])
        shots = {k[2] for k in self.keys if k[2] is not None}
        self.shots = sorted(shots)

    def done(self, key: tuple) -> list[Run]:
        return [r for _, r in sorted(self.runs.get(key, {}).items()) if r.state == "done"]

    def failed(self, key: tuple) -> list[Run]:
        return [r for _, r in sorted(self.runs.get(key, {}).items()) if r.state == "failed"]

    def n_expected(self, key: tuple) -> int:
        return len(self.expected.get(key, ()))

    def backbone(self, key: tuple) -> str:
        return backbone_label(self.models.get(key, ""))

    def status(self, keys: Sequence[tuple]) -> str:
        """``3/3 runs`` (reproduced), ``2/3 runs``, plus the failed seeds and their errors."""
        done = sum(len(self.done(k)) for k in keys)
        expected = sum(self.n_expected(k) for k in keys)
        out = f"{done}/{expected} runs" + (" ✓" if done == expected and expected else "")
        several_datasets = len({k[1] for k in keys}) > 1
        several_shots = len({k[2] for k in keys}) > 1
        for k in keys:
            for r in self.failed(k):
                err = (r.error[:80] + "...") if len(r.error) > 80 else r.error
                where = f" {r.dataset}" if several_datasets else ""
                where += f" {r.shots} shots" if several_shots else ""
                out += f";{where} seed {r.seed} failed: {err}"
        return out


def _seed_cell(index: _Index, key: tuple, values: Sequence[float], pub: Published | None) -> Cell:
    cell = Cell(
        finished=len(values),
        expected=index.n_expected(key),
        failed=len(index.failed(key)),
        published=pub,
    )
    if values:
        cell.mean = float(np.mean(values))
        if len(values) > 1:  # population std over seeds (np.std), as the papers; none of one
            cell.std = float(np.std(values))
    return cell


def _average_cell(cells: Sequence[Cell], mean: float | None, pub: Published | None) -> Cell:
    """A cell averaging other cells: a number only when each has one; complete when all are."""
    cell = Cell(
        finished=sum(c.finished for c in cells),
        expected=sum(c.expected for c in cells),
        failed=sum(c.failed for c in cells),
        published=pub,
    )
    if cells and all(c.mean is not None for c in cells):
        cell.mean = mean
    return cell


def _published_average(
    published: Mapping[Key, Published],
    key: Key,
    over: Sequence[str],
    parts: Sequence[Key],
) -> Published | None:
    """The paper's average of ``key``'s protocol, method, backbone, metric and shots when it
    is over the same datasets as ours; else the mean of the paper's per-dataset values when
    every one is published; else None."""
    for k, pub in published.items():
        same = (k[0], k[1], k[2], k[4], k[5]) == (key[0], key[1], key[2], key[4], key[5])
        if same and pub.average_over and set(pub.average_over) == set(over):
            return pub
    values = [published.get(k) for k in parts]
    if not parts or any(v is None for v in values):
        return None
    first = values[0]
    return Published(
        float(np.mean([v.value for v in values])),
        first.paper,
        first.table,
        first.backbone,
        first.provenance,
        f"mean of the paper's values for these {len(parts)} datasets",
        tuple(over),
    )


def build(
    protocol: str,
    runs: Sequence[Run],
    *,
    plan: Sequence[Mapping[str, Any]] = (),
    published: Mapping[Key, Published] | None = None,
) -> list[Table]:
    """The protocol's tables from its runs (finished ones give numbers).

    Args:
      protocol: base2new, fewshot, xdomain or adapt.
      runs: the protocol's run directories (:func:`collect`).
      plan: the planned runs (:func:`read_plan`): their seeds are the ones a cell needs;
        without a plan, every seed seen in the protocol is expected in every cell.
      published: the published numbers (default: :func:`load_published`).
    """
    published = load_published() if published is None else published
    index = _Index(runs, plan)
    if not index.keys:
        return []
    builders = {
        "base2new": _base2new,
        "fewshot": _fewshot,
        "xdomain": _xdomain,
        "adapt": _adapt,
    }
    if protocol not in builders:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return builders[protocol](index, published)


_STD_NOTE = (
    "Ours: mean ± population std (np.std) over the seeds; a trailing * marks a number from "
    "only some of its seeds (not reproduced yet). Paper: the published number (sources below; "
    "– none published for this method, dataset and backbone). Δ = ours − paper."
)


def _base2new(index: _Index, published) -> list[Table]:
    metrics = ["base", "new", "hm"]
    rows, per_method = [], {m: [] for m in index.methods}
    for d in index.datasets:
        for m in index.methods:
            key = (m, d, _one_shots(index, m, d))
            if key not in index.expected:
                continue
            done = index.done(key)
            bb = index.backbone(key)
            pub = {x: published.get(("base2new", m, bb, d, x, None)) for x in metrics}
            b = [r.accuracy["base"] for r in done]
            n = [r.accuracy["new"] for r in done]
            # The per-seed HMs as the runs reported them (their std is the HM's)
            hms = [r.accuracy.get("hm", _hm(x, y)) for r, x, y in zip(done, b, n, strict=True)]
            cb, cn = _seed_cell(index, key, b, pub["base"]), _seed_cell(index, key, n, pub["new"])
            ch = _seed_cell(index, key, hms, pub["hm"])
            if done:  # the HM of the seed-averaged base and new; its std is the per-seed HMs'
                ch.mean = _hm(cb.mean, cn.mean)
            rows.append(Row(d, m, [cb, cn, ch], index.status([key])))
            per_method[m].append((d, bb, key, cb, cn))
    averages = []
    for m, parts in per_method.items():
        if len(parts) < 2:
            continue
        datasets = [p[0] for p in parts]
        bb = parts[0][1]
        cb = [p[3] for p in parts]
        cn = [p[4] for p in parts]
        mb = float(np.mean([c.mean for c in cb])) if all(c.mean is not None for c in cb) else None
        mn = float(np.mean([c.mean for c in cn])) if all(c.mean is not None for c in cn) else None

        def pub_of(metric, m=m, bb=bb, datasets=datasets):
            return _published_average(
                published,
                ("base2new", m, bb, AVERAGE, metric, None),
                datasets,
                [("base2new", m, bb, d, metric, None) for d in datasets],
            )

        pb, pn = pub_of("base"), pub_of("new")
        ph = _published_average(published, ("base2new", m, bb, AVERAGE, "hm", None), datasets, [])
        if ph is None and pb is not None and pn is not None:  # the HM of the averages
            ph = dataclasses.replace(pb, value=_hm(pb.value, pn.value))
        hm = _hm(mb, mn) if mb is not None and mn is not None else None
        cells = [_average_cell(cb, mb, pb), _average_cell(cn, mn, pn)]
        cells.append(_average_cell(cb + cn, hm, ph))
        cells[2].finished, cells[2].expected = cells[0].finished, cells[0].expected
        cells[2].failed = cells[0].failed
        label = f"{AVERAGE} ({len(parts)} datasets)"
        averages.append(Row(label, m, cells, index.status([p[2] for p in parts]), average=True))
    notes = [
        "Base and new: top-1 % on the base and the new classes; HM = 2·base·new/(base+new) of "
        "the seed-averaged base and new (± the std of the per-seed HMs).",
        "Average rows (as the papers compute them): base and new averaged over the datasets, "
        "HM = the harmonic mean of those two averages, not the mean of the per-dataset HMs.",
        _STD_NOTE,
    ]
    title = "Base-to-novel generalisation: base / new / HM, top-1 %"
    return [Table("base2new", title, ("dataset", "method"), metrics, averages + rows, notes)]


def _one_shots(index: _Index, method: str, dataset: str) -> int | None:
    for k in index.keys:
        if k[0] == method and k[1] == dataset:
            return k[2]
    return None


def _fewshot(index: _Index, published) -> list[Table]:
    shots = index.shots
    rows, per_method = [], {m: {} for m in index.methods}
    for d in index.datasets:
        for m in index.methods:
            keys = [(m, d, k) for k in shots if (m, d, k) in index.expected]
            if not keys:
                continue
            cells = []
            for k in shots:
                key = (m, d, k)
                if key not in index.expected:
                    cells.append(Cell())
                    continue
                bb = index.backbone(key)
                pub = published.get(("fewshot", m, bb, d, "test", k))
                values = [r.accuracy["test"] for r in index.done(key)]
                cell = _seed_cell(index, key, values, pub)
                cells.append(cell)
                per_method[m].setdefault(k, []).append((d, bb, key, cell))
            rows.append(Row(d, m, cells, index.status(keys)))
    averages = []
    for m, by_shots in per_method.items():
        datasets = _ordered((p[0] for parts in by_shots.values() for p in parts), [])
        if len(datasets) < 2:
            continue
        cells, keys = [], []
        for k in shots:
            parts = by_shots.get(k, [])
            keys += [p[2] for p in parts]
            if len(parts) != len(datasets):
                cells.append(Cell())
                continue
            cs = [p[3] for p in parts]
            mean = (
                float(np.mean([c.mean for c in cs]))
                if all(c.mean is not None for c in cs)
                else None
            )
            bb = parts[0][1]
            pub = _published_average(
                published,
                ("fewshot", m, bb, AVERAGE, "test", k),
                datasets,
                [("fewshot", m, bb, d, "test", k) for d in datasets],
            )
            cells.append(_average_cell(cs, mean, pub))
        label = f"{AVERAGE} ({len(datasets)} datasets)"
        averages.append(Row(label, m, cells, index.status(keys), average=True))
    notes = [
        "Top-1 % on all classes of each dataset's test split after training on K shots of "
        "every class; the Average rows are the mean over the datasets.",
        _STD_NOTE,
    ]
    title = "Few-shot classification: top-1 % by shots per class"
    cols = [str(k) for k in shots]
    return [Table("fewshot", title, ("dataset", "method"), cols, averages + rows, notes, True)]


def _xdomain(index: _Index, published) -> list[Table]:
    tables = []
    for source in index.datasets:
        keys = [(m, source, s) for m in index.methods for s in [None, *index.shots]]
        keys = [k for k in keys if k in index.expected]
        targets: list[str] = []
        for k in keys:
            for r in index.done(k):
                targets = _ordered(targets, [t for t in r.accuracy if t != source])
        shifts = DOMAIN_SHIFTS.get(source, ())
        groups = {
            "cross-dataset": [t for t in targets if t not in shifts],
            "domain-generalisation": [t for t in targets if t in shifts],
        }
        for name, tgts in groups.items():
            if not tgts and targets:
                continue
            cols = [source, *tgts, AVERAGE]
            rows = []
            for key in keys:
                m, bb = key[0], index.backbone(key)
                done = index.done(key)
                cells = []
                for t in [source, *tgts]:
                    pub = published.get(("xdomain", m, bb, source, t, None))
                    vals = [r.accuracy[t] for r in done if t in r.accuracy]
                    cells.append(_seed_cell(index, key, vals, pub))
                tcells = cells[1:]
                mean = None
                if tcells and all(c.mean is not None for c in tcells):
                    mean = float(np.mean([c.mean for c in tcells]))
                avg_key = ("xdomain", m, bb, source, XDOMAIN_AVERAGES[name], None)
                pub = _published_average(
                    published, avg_key, tgts, [("xdomain", m, bb, source, t, None) for t in tgts]
                )
                avg = _average_cell(tcells, mean, pub)
                avg.finished, avg.expected, avg.failed = (
                    cells[0].finished,
                    cells[0].expected,
                    cells[0].failed,
                )
                cells.append(avg)
                rows.append(Row(source, m, cells, index.status([key])))
            what = (
                "another label space (cross-dataset transfer)"
                if name == "cross-dataset"
                else "shifted domains of the source's classes (domain generalisation)"
            )
            notes = [
                f"Trained on {source} (first column); every other column is {what}. "
                "Average: the mean over those targets (the source excluded), as the papers.",
                _STD_NOTE,
            ]
            title = f"{name.capitalize()}: trained on {source}, top-1 %"
            tables.append(Table("xdomain", title, ("source", "method"), cols, rows, notes))
    return tables


def _adapt(index: _Index, published) -> list[Table]:
    datasets = index.datasets
    rows = []
    for m in index.methods:
        keys = [
            (m, d, s) for d in datasets for s in [None, *index.shots] if (m, d, s) in index.expected
        ]
        metrics: list[str] = []
        for k in keys:
            for r in index.done(k):
                metrics = _ordered(metrics, sorted(r.accuracy, key=lambda x: x != "zero_shot"))
        for metric in metrics or ["(pending)"]:
            cells = []
            for d in datasets:
                key = next((k for k in keys if k[1] == d), None)
                if key is None:
                    cells.append(Cell())
                    continue
                bb = index.backbone(key)
                pub = published.get(("adapt", m, bb, d, metric, None))
                vals = [r.accuracy[metric] for r in index.done(key) if metric in r.accuracy]
                cells.append(_seed_cell(index, key, vals, pub))
            ds = [d for d, c in zip(datasets, cells, strict=True) if c.expected]
            if len(ds) >= 2:
                real = [c for c in cells if c.expected]
                mean = None
                if all(c.mean is not None for c in real):
                    mean = float(np.mean([c.mean for c in real]))
                bb = index.backbone(keys[0])
                pub = _published_average(
                    published,
                    ("adapt", m, bb, AVERAGE, metric, None),
                    ds,
                    [("adapt", m, bb, d, metric, None) for d in ds],
                )
                cells.append(_average_cell(real, mean, pub))
            else:
                cells.append(Cell())
            rows.append(Row(m, metric, cells, index.status(keys)))
    notes = [
        "Label-free adaptation on each dataset's test images: zero_shot is the prompt before "
        "adaptation, the other rows after (tpt: test-time prompt tuning, pouf: unsupervised "
        "fine-tuning). Average: the mean over the datasets.",
        _STD_NOTE,
    ]
    title = "Label-free adaptation: top-1 % before and after"
    return [Table("adapt", title, ("method", "accuracy"), [*datasets, AVERAGE], rows, notes)]


# ---------------------------------------------------------------------------- rendering
def _fmt(x: float | None, sign: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _label(column: str, curves: bool) -> str:
    return f"{column} shots" if curves else {"hm": "HM"}.get(column, column)


def _ours(c: Cell) -> str:
    if c.mean is None:
        if c.failed:
            return "failed"
        return "pending" if c.expected else ""
    text = _fmt(c.mean) + (f" ± {c.std:.2f}" if c.std is not None else "")
    return text if c.complete else text + "*"


class _Sources:
    """Numbers the sources of the published values in order of first use."""

    def __init__(self):
        self.names: list[str] = []

    def ref(self, p: Published) -> int:
        if p.source not in self.names:
            self.names.append(p.source)
        return self.names.index(p.source) + 1


def render_markdown(tables: Sequence[Table]) -> str:
    """The tables as markdown, each with its notes and numbered sources."""
    out = []
    for t in tables:
        src = _Sources()
        head = [*t.heads]
        for c in t.columns:
            head += [_label(c, t.curves), "paper", "Δ"]
        head.append("runs")
        lines = [f"## {t.title}", "", *t.notes, ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append(
            "|" + "|".join(["---", "---"] + ["---:"] * (3 * len(t.columns)) + ["---"]) + "|"
        )
        for r in t.rows:
            cells = []
            for c in r.cells:
                paper = "–"
                if c.published is not None:
                    paper = f"{c.published.value:.2f}<sup>{src.ref(c.published)}</sup>"
                cells += [_ours(c), paper, _fmt(c.delta, sign=True)]
            group = f"**{r.group}**" if r.average else r.group
            lines.append("| " + " | ".join([group, r.label, *cells, r.status]) + " |")
        if src.names:
            lines += ["", "Sources of the paper columns:", ""]
            lines += [f"{i}. {s}" for i, s in enumerate(src.names, 1)]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def render_csv(tables: Sequence[Table]) -> str:
    """The tables as one CSV: a row per table row, four fields per column (ours, its std,
    the paper's number and the difference) plus the paper's source."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for t in tables:
        head = ["table", *t.heads]
        for c in t.columns:
            head += [c, f"{c}_std", f"{c}_paper", f"{c}_delta", f"{c}_paper_source"]
        head += ["runs_finished", "runs_expected", "reproduced", "status"]
        w.writerow(head)
        for r in t.rows:
            row = [t.title, r.group, r.label]
            for c in r.cells:
                p = c.published
                row += [
                    "" if c.mean is None else round(c.mean, 4),
                    "" if c.std is None else round(c.std, 4),
                    "" if p is None else p.value,
                    "" if c.delta is None else round(c.delta, 4),
                    "" if p is None else p.source,
                ]
            real = [c for c in r.cells if c.expected]
            finished = max((c.finished for c in real), default=0)
            expected = max((c.expected for c in real), default=0)
            reproduced = bool(real) and all(c.complete for c in real)
            row += [finished, expected, reproduced, r.status]
            w.writerow(row)
    return buf.getvalue()


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                 ("#", r"\#"), ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("−", "-"),
                 ("✓", r"\checkmark"), ("–", "--"), ("·", r"$\cdot$")):  # fmt: skip
        s = s.replace(a, b)
    return s


def render_tex(tables: Sequence[Table]) -> str:
    """The tables as LaTeX (booktabs; ``\\usepackage{booktabs}``), sources as footnote marks."""
    out = ["% jaxprompt table: \\usepackage{booktabs}"]
    for t in tables:
        src = _Sources()
        n = len(t.columns)
        spec = "ll" + "rrr" * n + "l"
        lines = [f"% {t.title}", "\\begin{tabular}{" + spec + "}", "\\toprule"]
        head = [f"\\multicolumn{{3}}{{c}}{{{_tex(_label(c, t.curves))}}}" for c in t.columns]
        lines.append(" & ".join(["", "", *head, ""]) + " \\\\")
        rules = " ".join(f"\\cmidrule(lr){{{3 + 3 * i}-{5 + 3 * i}}}" for i in range(n))
        lines.append(rules)
        sub = [_tex(t.heads[0]), _tex(t.heads[1])] + ["ours", "paper", r"$\Delta$"] * n + ["runs"]
        lines += [" & ".join(sub) + " \\\\", "\\midrule"]
        was_average = None
        for r in t.rows:
            if was_average and not r.average:
                lines.append("\\midrule")
            was_average = r.average
            cells = []
            for c in r.cells:
                paper = "--"
                if c.published is not None:
                    paper = f"{c.published.value:.2f}$^{{{src.ref(c.published)}}}$"
                cells += [_tex(_ours(c)), paper, _tex(_fmt(c.delta, sign=True))]
            label = [_tex(r.group), _tex(r.label)]
            lines.append(" & ".join([*label, *cells, _tex(r.status)]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        lines += [f"% {i}: {_tex(s)}" for i, s in enumerate(src.names, 1)]
        lines += [f"% {_tex(note)}" for note in t.notes]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def plot(tables: Sequence[Table], path: str) -> bool:
    """The figure: one panel per group (a dataset, an average, a method); few-shot tables as
    curves over the shots, the others as bars per column, one colour per row label, the
    published numbers as black marks. False (and one log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("no figure: matplotlib is not installed (pip install matplotlib)")
        return False
    panels: list[tuple[Table, str, list[Row]]] = []
    for t in tables:
        groups = _ordered((r.group for r in t.rows), [])
        for g in groups:
            panels.append((t, g, [r for r in t.rows if r.group == g]))
    if not panels:
        return False
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(max(4.2 * ncol, 8.0), 3.4 * nrow + 0.6), squeeze=False
    )
    labels = _ordered((r.label for _, _, rows in panels for r in rows), [])
    colours = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    for ax, (t, g, rows) in zip(axes.flat, panels, strict=False):
        if t.curves:
            xs = [int(c) for c in t.columns]
            for r in rows:
                pts = [(x, c) for x, c in zip(xs, r.cells, strict=True) if c.mean is not None]
                if pts:
                    stds = [p[1].std or 0.0 for p in pts]
                    ax.errorbar(
                        [p[0] for p in pts], [p[1].mean for p in pts],
                        yerr=stds if any(stds) else None, marker="o", capsize=2,
                        color=colours[r.label], label=r.label,
                    )  # fmt: skip
                pub = [(x, c.published.value) for x, c in zip(xs, r.cells, strict=True)
                       if c.published is not None]  # fmt: skip
                if pub:
                    ax.plot(*zip(*pub, strict=True), ls="--", marker="x",
                            color=colours[r.label], alpha=0.6)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("shots per class")
        else:
            width = 0.8 / max(1, len(rows))
            for i, r in enumerate(rows):
                for j, c in enumerate(r.cells):
                    x = j - 0.4 + width * (i + 0.5)
                    if c.mean is not None:
                        ax.bar(
                            x, c.mean, width, yerr=c.std, capsize=2,
                            color=colours[r.label], label=r.label if j == 0 else None,
                        )  # fmt: skip
                    if c.published is not None:
                        ax.plot([x - width / 2, x + width / 2], [c.published.value] * 2, "k-")
            ticks = [_label(c, False).replace("_", " ") for c in t.columns]
            rotation = 30 if len(t.columns) > 3 else 0
            ax.set_xticks(range(len(t.columns)), ticks, rotation=rotation, fontsize=8)
        ax.set_title(g, fontsize=10)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)),
                   frameon=False)  # fmt: skip
    note = "ours: mean ± std over seeds; published: black marks (bars), dashed (curves)"
    fig.suptitle(f"{tables[0].title}\n{note}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    epath.Path(path).write_bytes(buf.getvalue())
    return True


# ---------------------------------------------------------------------------- files
FILES = ("table.md", "table.csv", "table.tex", "figure.png")


def write(root: str, protocol: str, *, published: Mapping[Key, Published] | None = None) -> str:
    """Writes ``root/<protocol>/table.{md,csv,tex}`` and ``figure.png`` from the finished
    runs there; returns the markdown ('' when the protocol has no runs and no plan)."""
    tables = build(
        protocol, collect(root, protocol), plan=read_plan(root, protocol), published=published
    )
    if not tables:
        return ""
    where = epath.Path(root) / protocol
    where.mkdir(parents=True, exist_ok=True)
    md = render_markdown(tables)
    (where / "table.md").write_text(md)
    (where / "table.csv").write_text(render_csv(tables))
    (where / "table.tex").write_text(render_tex(tables))
    plot(tables, str(where / "figure.png"))
    return md


def main(argv: Sequence[str]) -> int:
    """``jaxprompt table ROOT [--protocol P]``; returns the exit code."""
    import argparse

    from jaxprompt.app import flags as flags_lib

    ap = argparse.ArgumentParser(
        prog="jaxprompt table",
        description="Rebuilds the paper's tables from the finished runs under ROOT (no "
        "training): ROOT/<protocol>/table.md, table.csv, table.tex and figure.png.",
    )
    ap.add_argument("root", help="the root of the runs (local or gs://), as given to reproduce")
    ap.add_argument("--protocol", choices=PROTOCOLS, help="only this protocol")
    ns = ap.parse_args(list(argv))
    try:
        if not epath.Path(ns.root).is_dir():
            return flags_lib.fail(f"{ns.root} is not a directory: give the --root of the runs")
        protocols = [ns.protocol] if ns.protocol else PROTOCOLS
        written = []
        for p in protocols:
            md = write(ns.root, p)
            if md:
                print(md)
                written.append(p)
    except ImportError as e:  # gs:// without gcsfs
        return flags_lib.fail(f"{e} (pip install gcsfs)")
    if not written:
        what = f"{ns.protocol} " if ns.protocol else ""
        return flags_lib.fail(
            f"no {what}runs under {ns.root}: expected {ns.root}/<protocol>/<method>/<dataset>/"
            "[<shots>s/]seed<n> (the layout jaxprompt reproduce and sweep write)"
        )
    for p in written:
        print(f"table: {ns.root}/{p}/{{{','.join(FILES)}}}")
    return 0
