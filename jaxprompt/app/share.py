"""``jaxprompt export``, ``push`` and ``predict``: a run's prompt as one file, published, used.

    jaxprompt export  --workdir DIR [--out FILE]
    jaxprompt push    --workdir DIR --repo USER/NAME [--private] [--revision main]
    jaxprompt predict --prompt FILE|hf://USER/NAME[@REV] --classes a,b,c|classes.txt
                      [--clip NAME] [--top_k 5] [--json] IMAGES_OR_FOLDER...

``export`` writes ``DIR/prompt.safetensors`` by default (format: :mod:`jaxprompt.share`).
``predict`` rebuilds the method from the file, loads the backbone the file names (or
``--clip``, which must be the same backbone), and prints each image's top-k classes among
the given names. ``push`` exports the prompt, writes a model card (``README.md``) and uploads
both with the run's ``config.json`` to a Hugging Face Hub model repository, from which
``jp.load_prompt("hf://USER/NAME")`` and ``predict --prompt hf://USER/NAME`` load it. Every bad
input is a one-line error with exit code 2, and nothing is written.

``predict`` on a TPT prompt (``jaxprompt export --workdir ADAPT_RUN``: TPT around the prompt the
run's episodes started from, a trained one with ``init_from``) tunes that base prompt on each
image as the run did: the file's ``views`` (view 0 the image's eval crop, the others random
resized crops + flips of it, AugMix when the file says so, made on device from
``fold_in(fold_in(key(seed), i), 0)`` for the i-th image), the confident ``keep`` fraction, the
file's optimiser and ``steps`` from the file's prompt, then top-k of view 0's tuned logits.
Each image starts from the file's prompt (an online run's file too: images on the command
line are not a test split to carry a prompt through).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from jaxprompt.app import flags as flags_lib

DEFAULT_NAME = "prompt.safetensors"
_BATCH = 32  # images per forward pass in predict


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line FlagErrors (argparse prints usage and exits)."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse's hook
        raise flags_lib.FlagError(message)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def export_meta(workdir: str, meta: Mapping[str, Any], clip: Any) -> dict[str, Any]:
    """The prompt file's header from a run's checkpoint meta, results and backbone.

    Args:
      workdir: the run directory (its ``results.json`` gives the accuracies when present).
      meta: the checkpoint meta (``method``, ``method_config``, ``config``, ...).
      clip: the run's backbone, for its fingerprint.
    """
    from jaxprompt import share

    cfg = meta.get("config") or {}
    data = cfg.get("data") or {}
    results_path = epath.Path(workdir) / "results.json"
    record = json.loads(results_path.read_text()) if results_path.exists() else {}
    dataset = meta.get("dataset", data.get("dataset"))
    extra = {
        "protocol": record.get("protocol", cfg.get("protocol")),
        "dataset": dataset,
        # The hand-crafted template the run's tasks carried (zero-shot with
        # templates="dataset" reads it), so predict builds the same task.
        "template": _dataset_template(dataset),
        "shots": data.get("shots"),
        "seed": cfg.get("seed"),
        "results": record.get("accuracy"),
        "step": meta.get("step"),
    }
    return share.prompt_meta(
        method=str(meta["method"]),
        method_config=dict(meta.get("method_config") or {}),
        backbone_name=str((cfg.get("clip") or {}).get("name") or meta.get("model") or ""),
        fingerprint=share.backbone_fingerprint(clip),
        classnames=list(meta.get("classnames") or []),
        extra={k: v for k, v in extra.items() if v is not None},
    )


def _dataset_template(name: str | None) -> str | None:
    from jaxprompt.data import catalog

    try:
        return catalog.get_dataset(str(name)).template if name else None
    except (KeyError, ValueError):  # a dataset this install does not know: no template
        return None


def export_run(workdir: str, out: str | None = None) -> str:
    """Exports the newest readable checkpoint of ``workdir`` as one ``.safetensors`` file.

    Everything is read and checked first (checkpoint, method, backbone); the file is
    written last, to a temporary name then renamed.

    Returns:
      The path written.

    Raises:
      FileNotFoundError: no run directory or no checkpoint in it.
      ValueError: a checkpoint that names no method.
      ClipLoadError: the backbone (needed for its fingerprint) cannot be loaded.
    """
    from jaxprompt import checkpoint, share
    from jaxprompt.app import experiment

    if not epath.Path(workdir).is_dir():
        raise FileNotFoundError(f"no run directory {workdir}")
    if checkpoint.latest_step(workdir) is None:
        # A test-time run (`jaxprompt adapt`, TPT) has no checkpoint: it writes its prompt
        # file itself when it finishes (TPT around the prompt its episodes started from).
        own = epath.Path(workdir) / DEFAULT_NAME
        if own.exists() and share.read_prompt_file(own)[1].get("protocol") == "adapt":
            if out is None or epath.Path(out) == own:
                return os.fspath(own)
            tmp = epath.Path(out).parent / (epath.Path(out).name + ".tmp")
            tmp.write_bytes(own.read_bytes())
            tmp.replace(out)
            return os.fspath(out)
        raise FileNotFoundError(f"{workdir} has no checkpoint: train the run first")
    prompt, meta = checkpoint.load_prompt(workdir)
    if "method" not in meta:
        raise ValueError(f"the checkpoint in {workdir} names no method: it cannot be exported")
    cfg_clip = (meta.get("config") or {}).get("clip") or {}
    name = cfg_clip.get("name") or meta.get("model")
    if not name:
        raise ValueError(f"the checkpoint in {workdir} names no backbone: it cannot be exported")
    clip = experiment.resolve_clip(str(name), str(cfg_clip.get("dtype") or "float32"))
    header = export_meta(workdir, meta, clip)
    out = out or os.fspath(epath.Path(workdir) / DEFAULT_NAME)
    return share.save_prompt(out, prompt, header)


def export_main(args: list[str]) -> int:
    """``jaxprompt export``: returns the exit code."""
    ap = _Parser(prog="jaxprompt export", description="Exports a run's prompt as one file.")
    ap.add_argument("--workdir", required=True, help="the run directory")
    ap.add_argument("--out", default=None, help=f"file to write (default DIR/{DEFAULT_NAME})")
    if any(a in ("-h", "--help") for a in args):
        ap.print_help()  # argparse's own --help would raise SystemExit inside cli.main
        return 0
    from jaxprompt.app import runners  # jax and the models: not needed for --help

    try:
        ns = ap.parse_args(args)
        path = export_run(ns.workdir, ns.out)
    except runners.USER_ERRORS as e:
        return flags_lib.fail(flags_lib.one_line(e))
    print(path)
    return 0


# ------------------------------------------------------------------------------------------------
# push (the Hugging Face Hub)
# ------------------------------------------------------------------------------------------------

# BibTeX of each method's paper, by registry name; the card cites it and CLIP. IVLP, the
# independent vision-language prompts baseline, is cited as the PromptSRC paper describes it
# (PromptSRC regularises IVLP's prompts).
_COOP = """@article{zhou2022coop,
  title   = {Learning to Prompt for Vision-Language Models},
  author  = {Zhou, Kaiyang and Yang, Jingkang and Loy, Chen Change and Liu, Ziwei},
  journal = {International Journal of Computer Vision (IJCV)},
  year    = {2022}
}"""
_COCOOP = """@inproceedings{zhou2022cocoop,
  title     = {Conditional Prompt Learning for Vision-Language Models},
  author    = {Zhou, Kaiyang and Yang, Jingkang and Loy, Chen Change and Liu, Ziwei},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""
_MAPLE = """@inproceedings{khattak2023maple,
  title     = {MaPLe: Multi-modal Prompt Learning},
  author    = {Khattak, Muhammad Uzair and Rasheed, Hanoona and Maaz, Muhammad and
               Khan, Salman and Khan, Fahad Shahbaz},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""
_PROMPTSRC = """@inproceedings{khattak2023promptsrc,
  title     = {Self-regulating Prompts: Foundational Model Adaptation without Forgetting},
  author    = {Khattak, Muhammad Uzair and Wasim, Syed Talal and Naseer, Muzammal and
               Khan, Salman and Yang, Ming-Hsuan and Khan, Fahad Shahbaz},
  booktitle = {IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""
_BAYES = """@inproceedings{derakhshani2023bayesian,
  title     = {Bayesian Prompt Learning for Image-Language Model Generalization},
  author    = {Derakhshani, Mohammad Mahdi and Sanchez, Enrique and Bulat, Adrian and
               da Costa, Victor Guilherme Turrisi and Snoek, Cees G. M. and
               Tzimiropoulos, Georgios and Martinez, Brais},
  booktitle = {IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""
_TPT = """@inproceedings{shu2022tpt,
  title     = {Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models},
  author    = {Shu, Manli and Nie, Weili and Huang, De-An and Yu, Zhiding and
               Goldstein, Tom and Anandkumar, Anima and Xiao, Chaowei},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}"""
_POUF = """@inproceedings{tanwisuth2023pouf,
  title     = {POUF: Prompt-Oriented Unsupervised Fine-tuning for Large Pre-trained Models},
  author    = {Tanwisuth, Korawat and Zhang, Shujian and Zheng, Huangjie and He, Pengcheng and
               Zhou, Mingyuan},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2023}
}"""
_KGCOOP = """@inproceedings{yao2023kgcoop,
  title     = {Visual-Language Prompt Tuning with Knowledge-guided Context Optimization},
  author    = {Yao, Hantao and Zhang, Rui and Xu, Changsheng},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""
_CLIP = """@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and
               Goh, Gabriel and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and
               Mishkin, Pamela and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2021}
}"""
CITATIONS: dict[str, str] = {
    "coop": _COOP,
    "cocoop": _COCOOP,
    "ivlp": _PROMPTSRC,
    "maple": _MAPLE,
    "promptsrc": _PROMPTSRC,
    # Self-regulation on other bases is PromptSRC's regularisation (the base's paper is in
    # the run's method config).
    "selfreg": _PROMPTSRC,
    "coop+src": _PROMPTSRC,
    "cocoop+src": _PROMPTSRC,
    "maple+src": _PROMPTSRC,
    "kgcoop": _KGCOOP,
    "bayes": _BAYES,
    "tpt": _TPT,
    "pouf": _POUF,
    "zeroshot": _CLIP,
}
CLIP_CITATION = _CLIP
CARD_NAME = "README.md"
CONFIG_NAME = "config.json"


def citations(method: str) -> list[str]:
    """The BibTeX entries a card of ``method`` cites: the method's paper, then CLIP's."""
    own = CITATIONS.get(method)
    return [own, CLIP_CITATION] if own and own != CLIP_CITATION else [CLIP_CITATION]


def hub_base_model(name: str) -> str | None:
    """``name`` when it is a Hub model id (``org/name``, not a local path), else ``None``; for
    one of OpenAI's names, the Hub copy of its weights (``ViT-B/16`` ->
    ``openai/clip-vit-base-patch16``; none for the ResNets), whatever file it was loaded from."""
    from jaxprompt import backbones, share

    known = backbones.canonical(name) if name else None
    if known is not None:  # "ViT-B/16" would otherwise pass for the repository "ViT-B/16"
        return backbones.HUB_IDS.get(known)
    if not name or os.path.exists(name) or "://" in name:
        return None
    try:
        repo_id, revision = share.parse_hub_ref(name)
    except ValueError:
        return None
    return repo_id if revision is None else None


def _yaml_scalar(value: Any) -> str:
    # A JSON string or number is a valid YAML flow scalar, so no YAML writer is needed.
    return json.dumps(value)


def _flat_results(results: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows += _flat_results(v, key + "/")
        else:
            rows.append((key, v))
    return rows


def results_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(split, accuracy)`` rows of a results.json ``accuracy`` (nested keys joined by ``/``;
    numbers to two decimals, as the run's own results.md prints them)."""
    return [
        (k, f"{float(v):.2f}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v))
        for k, v in _flat_results(results)
    ]


def model_card(
    *,
    repo_id: str,
    meta: Mapping[str, Any],
    record: Mapping[str, Any],
    revision: str | None = None,
) -> str:
    """The Hub model card (``README.md``) of a pushed prompt.

    Args:
      repo_id: ``USER/NAME``, for the loading examples.
      meta: the prompt file's header (:func:`export_meta`).
      record: the run's ``results.json`` (``{}`` when the run has none).
      revision: the branch pushed to (named in the loading examples unless ``main``).

    Returns:
      Markdown with YAML front matter (``library_name``, ``tags``, ``base_model`` when the
      backbone is a Hub id, ``datasets``).
    """
    method = str(meta.get("method", "unknown"))
    backbone = str((meta.get("backbone") or {}).get("name") or meta.get("model") or "unknown")
    dataset = meta.get("dataset") or record.get("dataset")
    ref = f"hf://{repo_id}" + (f"@{revision}" if revision and revision != "main" else "")
    front = ["---", "library_name: jaxprompt", "tags:"]
    front += [f"- {_yaml_scalar(t)}" for t in ("prompt-learning", "clip", method)]
    base = hub_base_model(backbone)
    if base:
        front.append(f"base_model: {_yaml_scalar(base)}")
    if dataset:
        front += ["datasets:", f"- {_yaml_scalar(str(dataset))}"]
    front.append("---")

    def field(key: str) -> str:
        value = meta.get(key, record.get(key))
        return "n/a" if value is None or value == "" else f"`{value}`"

    body = [
        f"# {repo_id}",
        "",
        f"A learned prompt for a frozen CLIP, trained with jaxprompt (method `{method}`). "
        "The prompt is one "
        f"`prompt.safetensors` file (no pickle); the run's full config is `config.json`.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{method}` |",
        f"| backbone | `{backbone}` |",
        f"| dataset | {field('dataset')} |",
        f"| protocol | {field('protocol')} |",
        f"| shots | {field('shots')} |",
        f"| seed | {field('seed')} |",
        "",
        "## Results",
        "",
    ]
    rows = results_rows(record.get("accuracy") or meta.get("results") or {})
    if rows:
        body += ["| split | accuracy (%) |", "|---|---|"]
        body += [f"| {k} | {v} |" for k, v in rows]
    else:
        body.append("The run has no results.json.")
    classes = list(meta.get("classnames") or [])
    body += [
        "",
        "## Use",
        "",
        "In Python (downloads the file once, into the Hugging Face cache):",
        "",
        "```python",
        "import jaxprompt as jp",
        "",
        f'clip = jp.load_clip("{backbone}")',
        f'method, prompt, meta = jp.load_prompt("{ref}", clip=clip)',
        'task = jp.make_task(clip, ["cat", "dog"], template=meta.get("template"))',
        "logits = method.logits(prompt, clip, task, images)  # images: [N, H, W, 3]",
        "```",
        "",
        "From the command line:",
        "",
        "```bash",
        f"jaxprompt predict --prompt {ref} --classes "
        f"{','.join(classes[:3]) or 'cat,dog'} --top_k 3 IMAGES_OR_FOLDER",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        "\n\n".join(citations(method)),
        "```",
        "",
    ]
    return "\n".join(front + [""] + body)


def push_run(
    *,
    workdir: str,
    repo: str,
    private: bool = False,
    revision: str | None = None,
) -> str:
    """Exports a run's prompt and uploads it, a model card and ``config.json`` to the Hub.

    Everything is checked and written to a temporary folder first (repo id, run directory,
    checkpoint, backbone); only then is the repository created (``exist_ok``: an existing one
    keeps its visibility) and the folder uploaded as one commit.

    Args:
      workdir: the run directory.
      repo: ``USER/NAME`` (``hf://`` prefix allowed).
      private: create the repository private.
      revision: the branch to push to (created from ``main`` when missing); ``None``: main.

    Returns:
      The ``hf://`` reference that loads the prompt.

    Raises:
      ValueError: a bad repo id, or a run that cannot be exported.
      FileNotFoundError: no run directory, checkpoint or config.json.
    """
    import huggingface_hub

    from jaxprompt import hf_checkpoint, share

    repo_id, rev_in_ref = share.parse_hub_ref(repo)
    if rev_in_ref:
        raise ValueError(f"--repo {repo!r}: give the branch with --revision, not '@'")
    run = epath.Path(workdir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory {workdir}")
    if not (run / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{workdir} has no {CONFIG_NAME}: train the run first")
    results_path = run / "results.json"
    record = json.loads(results_path.read_text()) if results_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="jaxprompt-push-") as tmp:
        prompt_path = export_run(workdir, os.path.join(tmp, share.HUB_FILENAME))
        meta = share.read_prompt_file(prompt_path)[1]
        card = model_card(repo_id=repo_id, meta=meta, record=record, revision=revision)
        with open(os.path.join(tmp, CARD_NAME), "w") as f:
            f.write(card)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            f.write((run / CONFIG_NAME).read_text())
        # Nothing has touched the Hub before this point: bad input never half-publishes.
        if not hf_checkpoint.hub_reachable():
            endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
            raise ConnectionError(
                f"cannot reach the Hugging Face Hub ({endpoint}): "
                "nothing was uploaded; check the network (or HF_ENDPOINT) and push again"
            )
        try:
            api = huggingface_hub.HfApi()
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                revision=revision,
                commit_message=f"jaxprompt push: {meta.get('method')} on {meta.get('dataset')}",
            )
        except Exception as e:
            # The hub client's errors are a raw repr (MaxRetryError(...)), a URL with a status
            # or many lines: one line naming the fix instead.
            err = hf_checkpoint.hub_error(
                e,
                doing=f"push to {repo_id} failed",
                # upload_folder is one commit: until it lands, the files are not in the repo.
                again="run the same push again (nothing is published before the upload's commit)",
            )
            if err is None:
                raise
            raise err from None
    return f"hf://{repo_id}" + (f"@{revision}" if revision and revision != "main" else "")


def push_main(args: list[str]) -> int:
    """``jaxprompt push``: returns the exit code."""
    ap = _Parser(
        prog="jaxprompt push", description="Publishes a run's prompt on the Hugging Face Hub."
    )
    ap.add_argument("--workdir", required=True, help="the run directory")
    ap.add_argument("--repo", required=True, help="the Hub model repository, USER/NAME")
    ap.add_argument("--private", action="store_true", help="create the repository private")
    ap.add_argument("--revision", default=None, help="branch to push to (default main)")
    if any(a in ("-h", "--help") for a in args):
        ap.print_help()
        return 0
    from jaxprompt.app import runners  # jax and the models: not needed for --help

    try:
        ns = ap.parse_args(args)
        ref = push_run(workdir=ns.workdir, repo=ns.repo, private=ns.private, revision=ns.revision)
    except (*runners.USER_ERRORS, OSError) as e:
        # OSError: the Hub's HTTP errors (no token, no permission) and network failures.
        return flags_lib.fail(flags_lib.one_line(e))
    print(ref)
    return 0


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------


def parse_classes(value: str) -> list[str]:
    """``a,b,c`` or a text file with one class name per line -> the class names."""
    if os.path.isfile(value):
        with open(value) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise flags_lib.FlagError(f"--classes {value!r} gives no class names")
    if len(set(names)) != len(names):
        raise flags_lib.FlagError("--classes has a class name twice")
    return names


def list_images(paths: Sequence[str]) -> list[str]:
    """Image files among ``paths``: files as given, folders walked (sorted, hidden skipped)."""
    from jaxprompt.data import folder

    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out += [os.path.join(p, rel) for rel in folder._list_images(p)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"no image or folder {p}")
    if not out:
        raise FileNotFoundError(f"no images in {', '.join(paths)}")
    return out


def _load_image(path: str, size: int) -> Any:
    """One image through the data pipeline's eval transform; a ValueError if undecodable."""
    from jaxprompt import data

    with open(path, "rb") as f:
        raw = f.read()
    try:
        return data.eval_transform(raw, size)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a non-image
        raise ValueError(f"cannot read {path} as an image ({type(e).__name__})") from e


def top_k(probs: Any, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable ``(name, probability)`` of one image, most probable first."""
    order = sorted(range(len(names)), key=lambda i: -float(probs[i]))[:k]
    return [(names[i], float(probs[i])) for i in order]


def predict(
    *,
    prompt_path: str,
    classes: Sequence[str],
    images: Sequence[str],
    clip_name: str | None = None,
    seed: int = 0,
    tpt: bool = False,
) -> tuple[list[str], Any]:
    """Class probabilities of image files under a shared prompt.

    Returns:
      ``(image paths, probabilities [N, C] numpy float32)``.

    A test-time method (its config names ``views``: TPT) runs one image at a time, the i-th
    image's views drawn from ``fold_in(key(seed), i)`` (see the module docstring). ``tpt=True``
    wraps any other prompt in TPT with the paper's settings (64 views, the 6 most confident
    kept, one AdamW step at lr 5e-3, weight decay 0.01): the TPT + CoOp of TPT's paper from a
    plain CoOp export, with no ``jaxprompt adapt`` run. A prompt that is already TPT keeps its
    own settings.

    Raises:
      BackboneMismatchError: ``clip_name`` is not the backbone the prompt was learned on.
    """
    import jax
    import numpy as np

    from jaxprompt import clip as clip_lib
    from jaxprompt import share
    from jaxprompt.app import experiment

    paths = list_images(images)
    meta = share.read_prompt_file(prompt_path)[1]  # the backbone, before loading
    name = clip_name or (meta.get("backbone") or {}).get("name") or meta.get("model")
    if not name:
        raise ValueError(f"{prompt_path} names no backbone: pass --clip")
    clip = experiment.resolve_clip(str(name))
    method, prompt, meta = share.load_prompt(prompt_path, clip=clip)
    # A test-time method declares its views per image (TPT's config names ``views``).
    per_image = int(method.config.get("views", 0) or 0) > 1
    if tpt and not per_image:
        from jaxprompt import methods as methods_lib

        # The prompt is unchanged: TPT's prompt is its base's, tuned afresh on each image.
        method, per_image = methods_lib.tpt(method), True
    task = clip_lib.make_task(clip, list(classes), template=meta.get("template"))
    logits_fn = jax.jit(lambda p, c, t, x, k: method.logits(p, c, t, x, key=k))
    key = jax.random.key(seed)
    # A test-time method declares its views per image: one image per call (its views are the
    # batch), each with its own key, so an image's views do not depend on its neighbours.
    size = 1 if per_image else _BATCH
    out = []
    for i in range(0, len(paths), size):
        chunk = paths[i : i + size]
        x = np.stack([_load_image(p, clip.spec.image_size) for p in chunk])
        k = jax.random.fold_in(key, i) if per_image else key
        out.append(np.asarray(jax.nn.softmax(logits_fn(prompt, clip, task, x, k), axis=-1)))
    return paths, np.concatenate(out).astype(np.float32)


def predict_main(args: list[str]) -> int:
    """``jaxprompt predict``: returns the exit code."""
    ap = _Parser(prog="jaxprompt predict", description="Classifies images with a shared prompt.")
    ap.add_argument(
        "--prompt", required=True, help="a .safetensors prompt (or old .npz), or hf://USER/NAME"
    )
    ap.add_argument("--classes", required=True, help="a,b,c or a file with one name per line")
    ap.add_argument(
        "--clip",
        default=None,
        help="the backbone: RN50, ViT-B/16, ..., a hub id or a path (default: the file's)",
    )
    ap.add_argument("--top_k", type=int, default=5, help="labels printed per image")
    ap.add_argument("--json", action="store_true", help="one JSON object per image")
    ap.add_argument(
        "--tpt",
        action="store_true",
        help="tune the prompt on each image first (TPT: 64 views, 6 kept, one AdamW step); "
        "a TPT prompt always is",
    )
    ap.add_argument("images", nargs="+", help="image files or folders")
    if any(a in ("-h", "--help") for a in args):
        ap.print_help()
        return 0
    from jaxprompt.app import runners  # jax and the models: not needed for --help

    try:
        ns = ap.parse_args(args)
        if ns.top_k < 1:
            raise flags_lib.FlagError("--top_k must be at least 1")
        names = parse_classes(ns.classes)
        paths, probs = predict(
            prompt_path=ns.prompt, classes=names, images=ns.images, clip_name=ns.clip, tpt=ns.tpt
        )
    except runners.USER_ERRORS as e:
        return flags_lib.fail(flags_lib.one_line(e))
    k = min(ns.top_k, len(names))
    for path, p in zip(paths, probs, strict=True):
        best = top_k(p, names, k)
        if ns.json:
            rec = {
                "image": path,
                "top_k": [{"label": n, "prob": round(v, 6)} for n, v in best],
                "probs": {n: round(float(v), 6) for n, v in zip(names, p, strict=True)},
            }
            print(json.dumps(rec))
        else:
            print(f"{path}\t" + "\t".join(f"{n} {v:.3f}" for n, v in best))
    sys.stdout.flush()
    return 0
