"""Repository contracts: CI runs the README's commands; the library's import boundary."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    cmds = _readme_commands()
    install = 'pip install -e ".[test]"'
    test = "python -m pytest -q"
    # The README's second set-up command is exactly these two lines, in this order ...
    i = cmds.index(install)
    assert cmds[i + 1] == test
    # ... and CI runs them, in the same order, in a fresh virtual environment.
    ci = [ln.strip() for ln in open(os.path.join(REPO, ".ci", "run")).read().splitlines()]
    assert ci.index(test) > ci.index(install)
    assert any("venv" in ln for ln in ci[: ci.index(install)])


def test_methods_do_not_import_tensorflow_or_data_stack():
    code = (
        "import sys, jaxprompt, jaxprompt.methods, jaxprompt.losses, jaxprompt.gpa;"
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'orbax', 'grain') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_reading_data_does_not_import_tensorflow():
    code = (
        "import sys; from jaxprompt import data;"
        "ds = data.load_dataset('toy_textures'); next(iter(data.eval_iterator("
        "ds.split['test'][:4], ds.fetch, batch_size=4, image_size=32)));"
        "print('tensorflow' in sys.modules); sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------
# The import graph: three layers, no cycles
# ------------------------------------------------------------------------------------------------

PKG = os.path.join(REPO, "jaxprompt")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _import_graph() -> dict[str, set[str]]:
    """Every jaxprompt module -> the jaxprompt modules it imports anywhere (functions too)."""
    import ast

    files = [
        os.path.join(root, f) for root, _, names in os.walk(PKG) for f in names if f.endswith(".py")
    ]
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _layer(module: str) -> str:
    if module.startswith("jaxprompt.app") or module in ("jaxprompt.cli", "jaxprompt.__main__"):
        return "application"
    if module.startswith("jaxprompt.side"):
        return "side"
    return "library"


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "jaxprompt.app.experiment" in graph and "jaxprompt.clip" in graph
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n) :] + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_library_never_imports_the_application_or_side_projects():
    graph = _import_graph()
    bad = [
        f"{m} imports {n}"
        for m, edges in sorted(graph.items())
        for n in sorted(edges)
        if _layer(m) == "library"
        and _layer(n) != "library"
        or _layer(m) == "side"
        and _layer(n) == "application"
    ]
    assert not bad, bad


def test_the_import_graph_test_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import inside a function is an edge."""
    graph = _import_graph()
    # cli imports the runners only inside a function (so --help stays fast).
    assert "jaxprompt.app.runners" in graph["jaxprompt.cli"]


def _flax_model_uses(source: str, path: str) -> list[str]:
    """``Flax*`` names taken from transformers (imported or as attributes) and imports of its
    ``modeling_flax*`` modules, found in the syntax tree (comments and docstrings don't count)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            if "modeling_flax" in (node.module or ""):
                found.append(f"from {node.module} import ...")
            found += [
                f"import {a.name}"
                for a in node.names
                if a.name.startswith("Flax") or "modeling_flax" in a.name
            ]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if "modeling_flax" in a.name]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("Flax"):
            found.append(f".{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("modeling_flax"):
            found.append(f".{node.attr}")
    return found


def test_no_module_uses_transformers_flax_models():
    """transformers 5 deleted its Flax models: the towers and the masked LM are ours, and
    transformers serves tokenizers only (and the tests' PyTorch reference models)."""
    bad = []
    for root, _, names in os.walk(PKG):
        for f in names:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                bad += [f"{os.path.relpath(path, REPO)}: {u}" for u in _flax_model_uses(
                    open(path).read(), path
                )]  # fmt: skip
    assert not bad, bad
    # The checker itself sees each form.
    planted = (
        "import transformers\nfrom transformers import FlaxCLIPModel\n"
        "m = transformers.FlaxRobertaForMaskedLM\n"
        "from transformers.models.clip import modeling_flax_clip\n"
    )
    assert len(_flax_model_uses(planted, "planted.py")) == 3
