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
