"""The README's "As a library" code blocks, run as written, offline, on the shipped toy CLIP.

The blocks are executed in order in one namespace from a fresh working directory, as a user
pasting them into a session would. The block that loads ``runs/demo/prompt.safetensors`` needs
the README's quick-start run: that file is written first from a prompt of the same method on the
same CLIP (the test is about the library calls, not about that run).
"""

import os
import re

import jax
import numpy as np

import jaxprompt as jp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_blocks() -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("## As a library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_library_blocks_run_offline(tmp_path, monkeypatch):
    blocks = library_blocks()
    assert len(blocks) >= 5, "the README's library section lost its examples"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, code in enumerate(blocks):
        if "runs/demo/prompt.safetensors" in code:
            clip, task, method = ns["clip"], ns["task"], ns["method"]
            meta = jp.share.prompt_meta(
                method=method.name,
                method_config=method.config,
                backbone_name=clip.spec.name,
                fingerprint=jp.share.backbone_fingerprint(clip),
                classnames=list(task.names),
            )
            os.makedirs("runs/demo")
            jp.share.save_prompt("runs/demo/prompt.safetensors", ns["state"].prompt, meta)
        exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)  # noqa: S102

    # What the blocks claim, checked on what they computed.
    assert ns["clip"].spec.name == "toy"
    assert ns["prompt"]["ctx"].shape == (4, ns["clip"].spec.text_width) == (4, 128)
    assert np.isfinite(float(ns["loss"]))
    assert ns["logits"].shape == (8, 2)
    assert jax.tree.structure(ns["grads"]) == jax.tree.structure(ns["state"].prompt)
    assert ns["state"].step == 10
    assert os.path.isdir("runs/mine") and os.listdir("runs/mine")
    # The prompt read back from the file is the trained one, and the method is rebuilt.
    np.testing.assert_array_equal(ns["prompt"]["ctx"], np.asarray(ns["state"].prompt["ctx"]))
    assert ns["method"].name == "coop" and ns["meta"]["backbone"]["name"] == "toy"
