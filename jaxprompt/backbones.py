"""CLIP backbones by OpenAI's names: ``RN50``, ``ViT-B/16``, ... to a file or a hub id.

:func:`jaxprompt.load_clip` (and so ``--config.clip.name`` and ``backbone=`` in the configs)
accepts the names OpenAI's ``clip.available_models()`` lists. A name is looked up as the
checkpoint file OpenAI's ``clip`` package downloads (``RN50.pt``, ``ViT-B-16.pt``: ``/`` and
``@`` become ``-``), in this order:

1. ``$JAXPROMPT_CLIP_DIR``, when set (one directory);
2. ``~/.cache/clip``, where ``clip.load`` saves its downloads by default, so a machine that
   ever ran OpenAI's code already has them.

A name with no file falls back to the Hugging Face hub copy of the same weights for the ViTs
(``ViT-B/16`` -> ``openai/clip-vit-base-patch16``); the ResNets have no Flax weights on the
hub, so a missing ResNet file is an error that says where to put it. Offline, copy the ``.pt``
files into one of the two directories (or pass a file's path). Anything that is not one of
these names (a hub id, a directory, a file) is returned unchanged.

``"toy"`` is the toy world's CLIP (:mod:`jaxprompt.side.toyclip`), the name its runs record:
the weights shipped in the package, else a copy pretrained into ``$JAXPROMPT_CACHE/toy_clip``.

Pure Python (no jax, no transformers), so it costs nothing to import.
"""

from __future__ import annotations

import os

__all__ = [
    "ENV_DIR",
    "HUB_IDS",
    "NAMES",
    "TOY",
    "CheckpointNotFoundError",
    "canonical",
    "file_name",
    "resolve",
    "search_dirs",
    "toy_cache_dir",
]

# OpenAI's clip.available_models(), in its order.
NAMES = (
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B/32",
    "ViT-B/16",
    "ViT-L/14",
    "ViT-L/14@336px",
)

# The hub repositories holding OpenAI's ViT weights in Hugging Face format (what load_clip
# reads from the hub); OpenAI published no Flax/HF conversion of the ResNets.
HUB_IDS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}

ENV_DIR = "JAXPROMPT_CLIP_DIR"
TOY = "toy"
_OPENAI_CACHE = os.path.join("~", ".cache", "clip")

# Case-insensitive lookup, also under the file-name spelling ("vit-b-16", "ViT-L-14-336px"),
# since users type either.
_LOOKUP = {k.lower(): k for k in NAMES}
_LOOKUP.update({k.replace("/", "-").replace("@", "-").lower(): k for k in NAMES})


class CheckpointNotFoundError(FileNotFoundError):
    """A ResNet name whose ``.pt`` file is in none of :func:`search_dirs` (the message is one
    line naming the file, the directories and the fix). :func:`jaxprompt.load_clip` raises it
    as a ``ClipLoadError``."""


def canonical(name: str) -> str | None:
    """OpenAI's spelling of ``name`` (``"rn50"`` -> ``"RN50"``, ``"vit-b-16"`` ->
    ``"ViT-B/16"``), or None when ``name`` is not one of :data:`NAMES`."""
    return _LOOKUP.get(str(name).strip().lower())


def file_name(name: str) -> str:
    """The file OpenAI's ``clip`` package stores ``name`` in: ``"ViT-L/14@336px"`` ->
    ``"ViT-L-14-336px.pt"``.

    Raises:
      ValueError: ``name`` is not one of :data:`NAMES`.
    """
    known = canonical(name)
    if known is None:
        raise ValueError(f"unknown CLIP name {name!r}; known: {', '.join(NAMES)}")
    return known.replace("/", "-").replace("@", "-") + ".pt"


def search_dirs() -> list[str]:
    """The directories searched for a named checkpoint, first match wins:
    ``$JAXPROMPT_CLIP_DIR`` (when set) then ``~/.cache/clip``, user-expanded."""
    dirs = []
    env = os.environ.get(ENV_DIR, "").strip()
    if env:
        dirs.append(os.path.expanduser(env))
    dirs.append(os.path.expanduser(_OPENAI_CACHE))
    return dirs


def toy_cache_dir() -> str:
    """Where ``jaxprompt`` pretrains the toy CLIP when the package ships none:
    ``$JAXPROMPT_CACHE/toy_clip`` (default ``~/.cache/jaxprompt/toy_clip``)."""
    root = os.environ.get("JAXPROMPT_CACHE", os.path.join("~", ".cache", "jaxprompt"))
    return os.path.join(os.path.expanduser(root), "toy_clip")


def _toy() -> str:
    from importlib import resources

    shipped = resources.files("jaxprompt").joinpath("assets/toy_clip")
    if shipped.joinpath("flax_model.msgpack").is_file():
        return str(shipped)
    cache = toy_cache_dir()
    if os.path.isfile(os.path.join(cache, "pretrain.json")):
        return cache
    raise CheckpointNotFoundError(
        f"this install ships no toy CLIP and none is in {cache}: run `jaxprompt pretrain-toy "
        f"--out {cache}` (minutes on a CPU)"
    )


def resolve(name: str | os.PathLike) -> str:
    """What :func:`jaxprompt.load_clip` loads for ``name``.

    Args:
      name: one of OpenAI's model names (:data:`NAMES`; any case, or the file-name spelling
        ``ViT-B-16``), a hub id, a local directory or a checkpoint file.

    Returns:
      For a known name: the path of its checkpoint file in the first of :func:`search_dirs`
      that holds it, else (ViTs only) its hub id from :data:`HUB_IDS`. For ``"toy"``: the
      toy CLIP's directory. Anything else:
      ``name`` unchanged, as a string. OpenAI's names win over a local path of the same
      spelling, as in OpenAI's ``clip.load`` (pass ``./RN50`` for such a directory).

    Raises:
      CheckpointNotFoundError: a ResNet name whose file is in none of the directories, or
        ``"toy"`` with neither shipped nor cached weights.
    """
    name = os.fspath(name)
    if name == TOY:
        return _toy()
    known = canonical(name)
    if known is None:
        return name
    fname = file_name(known)
    dirs = search_dirs()
    for d in dirs:
        path = os.path.join(d, fname)
        if os.path.isfile(path):
            return path
    if known in HUB_IDS:
        return HUB_IDS[known]
    raise CheckpointNotFoundError(
        f"{known} needs OpenAI's checkpoint file {fname}, which is in none of "
        f"{', '.join(dirs)}: put it in ~/.cache/clip (where OpenAI's clip package downloads "
        f"it) or ${ENV_DIR}, or pass its path as the CLIP name (--config.clip.name)"
    )
