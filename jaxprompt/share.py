"""Sharing a learned prompt like a model: one ``.safetensors`` file, read back in one call.

The file holds the prompt's leaves keyed by their pytree path (``"ctx"``, ``"deep_text.0"``, as
:func:`jaxprompt.checkpoint.flatten` names them), float32, and ONE metadata entry, ``"jaxprompt"``:
a JSON string (safetensors metadata maps strings to strings) with

* ``format_version``;
* ``method`` and ``method_config``: what ``jaxprompt.methods.get(method, **method_config)``
  needs to rebuild the method;
* ``backbone``: ``{"name": hub id or path, "fingerprint": {"arch": sha256, "vocab": sha256}}``
  (see :func:`backbone_fingerprint`; files written before issue 19 carry ``"config"`` instead
  of ``"arch"`` and are checked the old way), so a prompt is never silently used with another
  CLIP;
* ``classnames`` it was trained on, and when known ``protocol``, ``dataset``, ``shots``,
  ``seed`` and ``results`` (the run's accuracies).

A prompt published on the Hugging Face Hub (``jaxprompt push``) loads by its repository:
``load_prompt("hf://USER/NAME")`` or ``"hf://USER/NAME@REVISION"`` downloads the repository's
``prompt.safetensors`` through ``huggingface_hub.hf_hub_download`` (its cache, so a second load
is offline).

No pickle anywhere: safetensors is a JSON header plus raw little-endian buffers. Old ``.npz``
exports (:func:`jaxprompt.checkpoint.save_exported`) still load with :func:`load_prompt`.

Example::

    method, prompt, meta = jp.load_prompt("coop_imagenet.safetensors", clip=clip)
    logits = method.logits(prompt, clip, jp.make_task(clip, ["cat", "dog"]), images)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

__all__ = [
    "FORMAT_VERSION",
    "HUB_FILENAME",
    "HUB_SCHEME",
    "META_KEY",
    "BackboneMismatchError",
    "backbone_fingerprint",
    "check_backbone",
    "is_hub_ref",
    "parse_hub_ref",
    "resolve_prompt_path",
    "load_prompt",
    "prompt_meta",
    "read_prompt_file",
    "save_prompt",
]

FORMAT_VERSION = 1
META_KEY = "jaxprompt"  # the one safetensors metadata entry: a JSON string
HUB_SCHEME = "hf://"  # a prompt on the Hugging Face Hub: hf://USER/NAME[@REVISION]
HUB_FILENAME = "prompt.safetensors"  # the file `jaxprompt push` uploads and loading fetches

# The Hub's own rule for a namespaced repo id (huggingface_hub.utils.validate_repo_id accepts a
# bare name too; a prompt always lives under a user or an organisation, so both are required).
_REPO_ID = re.compile(
    r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
)

# Config keys that change with how or where a model was loaded, not with what it computes:
# the same weights loaded from the hub or a local copy, by another transformers version or in
# another dtype, must give the same fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype"}
)

PyTree = Any


class BackboneMismatchError(ValueError):
    """A prompt file was made for another CLIP than the one given (one-line message)."""


# ------------------------------------------------------------------------------------------------
# Backbone identity
# ------------------------------------------------------------------------------------------------


def _canonical_config(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {
            str(k): _canonical_config(v)
            for k, v in obj.items()
            if str(k) not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(obj, list | tuple):
        return [_canonical_config(v) for v in obj]
    return obj


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The config entries that fix what a CLIP computes (the architecture); anything else (init
# values such as logit_scale_init_value, "architectures", per-tower projection_dim copies) differs
# between the hub's config.json and one converted from OpenAI's .pt file of the same weights.
_ARCH_KEYS = {
    "": ("projection_dim",),
    "text_config": (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings", "hidden_act",
    ),
    "vision_config": (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "image_size", "patch_size", "num_channels", "hidden_act", "resnet_layers", "resnet_width",
    ),
}  # fmt: skip


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, keys in _ARCH_KEYS.items():
        src = config if not section else (config.get(section) or {})
        for k in keys:
            if k in src:
                out[f"{section}.{k}" if section else k] = src[k]
    # A ResNet config's intermediate_size is a placeholder (it has no MLP blocks).
    if "vision_config.resnet_layers" in out:
        out.pop("vision_config.intermediate_size", None)
    return out


def _vocab_digest(clip: Any) -> str:
    return _sha256(json.dumps(sorted(clip.tokenizer.get_vocab().items()), separators=(",", ":")))


def backbone_fingerprint(clip: Any) -> dict[str, str]:
    """What a prompt depends on in a CLIP: its architecture and its tokenizer's vocabulary.

    Args:
      clip: a :class:`~jaxprompt.clip.Clip`.

    Returns:
      ``{"arch": sha256 of the architecture entries of the CLIP config, "vocab": sha256 of the
      tokenizer vocabulary}`` (hex digests). Only the entries that fix the computation count
      (widths, depths, heads, sizes, activations; the ResNet stages), so the same weights give
      the same fingerprint whether they were loaded from the hub, a local copy or OpenAI's
      ``.pt`` file, by any transformers version, in any dtype.
    """
    arch = _architecture(json.loads(clip.spec.config_json))
    return {
        "arch": _sha256(json.dumps(arch, sort_keys=True, separators=(",", ":"))),
        "vocab": _vocab_digest(clip),
    }


def _legacy_config_digest(clip: Any) -> str:
    """The ``"config"`` digest of files written before issue 19: the whole config minus the
    keys that depend on how it was loaded."""
    config = _canonical_config(json.loads(clip.spec.config_json))
    return _sha256(json.dumps(config, sort_keys=True, separators=(",", ":")))


def check_backbone(meta: Mapping[str, Any], clip: Any) -> None:
    """Raises :class:`BackboneMismatchError` if ``clip`` is not the backbone ``meta`` names.

    Files without a fingerprint (old ``.npz`` exports) are not checked; files with the older
    ``"config"`` digest are checked against it.
    """
    want = (meta.get("backbone") or {}).get("fingerprint")
    if not want:
        return
    have = backbone_fingerprint(clip)
    if "config" in want and "arch" not in want:
        have = {"config": _legacy_config_digest(clip), "vocab": have["vocab"]}
    if dict(want) != have:
        what = [k for k in ("arch", "config", "vocab") if k in want and want.get(k) != have.get(k)]
        file_name = (meta.get("backbone") or {}).get("name") or "unknown"
        raise BackboneMismatchError(
            f"the prompt was learned on backbone {file_name!r} but the CLIP given is "
            f"{clip.spec.name or 'unnamed'!r} (different {' and '.join(what)}): load the "
            "prompt with the backbone it was trained on"
        )


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def prompt_meta(
    *,
    method: str,
    method_config: Mapping[str, Any],
    backbone_name: str,
    fingerprint: Mapping[str, str] | None,
    classnames: list[str],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON header of a prompt file (see the module docstring for the fields).

    Args:
      method: the registry name of the method.
      method_config: its keyword arguments (JSON-able).
      backbone_name: the CLIP's hub id or path, as the run's config names it.
      fingerprint: :func:`backbone_fingerprint` of that CLIP (``None`` if unknown).
      classnames: the classes the prompt was trained on.
      extra: further JSON-able fields (protocol, dataset, shots, seed, results).
    """
    from jaxprompt import checkpoint

    meta = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "method_config": dict(method_config),
        "backbone": {"name": backbone_name, "fingerprint": dict(fingerprint or {})},
        "classnames": list(classnames),
        **dict(extra or {}),
    }
    # Nested methods (a wrapper's base) become their {"method", "method_config"} form.
    return checkpoint._jsonable(meta)


def save_prompt(path: str | os.PathLike, prompt: PyTree, meta: Mapping[str, Any]) -> str:
    """Writes a prompt and its JSON header as one ``.safetensors`` file.

    Written to ``path + ".tmp"`` and renamed, so a reader never sees half a file; works on
    ``gs://`` through ``etils.epath``.

    Args:
      path: the file to write.
      prompt: the prompt pytree (leaves are stored as float32, keyed by their path).
      meta: the header (:func:`prompt_meta`); must be JSON-able.

    Returns:
      The path written.
    """
    import safetensors.numpy

    from jaxprompt import checkpoint

    arrays = {
        k: np.ascontiguousarray(np.asarray(v, np.float32))
        for k, v in checkpoint.flatten(prompt).items()
    }
    header = json.dumps(checkpoint._jsonable(dict(meta)), sort_keys=True)
    data = safetensors.numpy.save(arrays, metadata={META_KEY: header})
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # a re-export overwrites
    return os.fspath(path)


# ------------------------------------------------------------------------------------------------
# The Hugging Face Hub
# ------------------------------------------------------------------------------------------------


def is_hub_ref(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a prompt on the Hub (``hf://USER/NAME[@REVISION]``)."""
    return isinstance(path, str) and path.startswith(HUB_SCHEME)


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf://USER/NAME[@REVISION]`` (or ``USER/NAME[@REVISION]``) -> ``(repo_id, revision)``.

    Raises:
      ValueError: not a namespaced repo id (one line naming the expected form).
    """
    body = ref[len(HUB_SCHEME) :] if ref.startswith(HUB_SCHEME) else ref
    repo_id, _, revision = body.partition("@")
    # ".." and "--" are reserved by the Hub (its cache names folders with "--").
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(
            f"not a Hub repository: {ref!r}; write USER/NAME (letters, digits, '-', '_', '.')"
        )
    if "@" in body and not revision:
        raise ValueError(f"empty revision after '@' in {ref!r}")
    return repo_id, revision or None


def resolve_prompt_path(path: str | os.PathLike) -> str | os.PathLike:
    """A local (or ``gs://``) path for ``path``: a Hub reference is downloaded first.

    ``huggingface_hub.hf_hub_download`` keeps the file in the Hub cache, so loading the same
    revision again needs no network (and works with ``HF_HUB_OFFLINE=1``).

    Raises:
      ValueError: a malformed ``hf://`` reference.
      FileNotFoundError: no such repository, revision or file on the Hub.
      jaxprompt.hf_checkpoint.HubError: the Hub failed (network, refusal, server error).
    """
    if not is_hub_ref(path):
        return path
    # Looked up on the module at call time, so tests can stand in for the Hub there.
    import huggingface_hub
    from huggingface_hub import utils as hf_utils

    from jaxprompt import hf_checkpoint

    repo_id, revision = parse_hub_ref(os.fspath(path))
    try:
        return huggingface_hub.hf_hub_download(
            repo_id=repo_id,
            filename=HUB_FILENAME,
            revision=revision,
            repo_type="model",
            # Unreachable, the client retries for ~26 s: read the cache, which answers at once.
            local_files_only=not hf_checkpoint.hub_reachable(),
        )
    except hf_utils.LocalEntryNotFoundError as e:  # offline, or the Hub unreachable
        raise FileNotFoundError(
            f"cannot download {path} (no network or HF_HUB_OFFLINE) and it is not in the Hub "
            "cache: load it once online"
        ) from e
    except (hf_utils.RepositoryNotFoundError, hf_utils.RevisionNotFoundError) as e:
        raise FileNotFoundError(f"no prompt at {path}: {type(e).__name__}") from e
    except hf_utils.EntryNotFoundError as e:
        raise FileNotFoundError(f"{path} has no {HUB_FILENAME}") from e
    except Exception as e:  # the network, a refusal, a server error: one line with the fix
        err = hf_checkpoint.hub_error(e, doing=f"cannot download {path}", again="try again")
        if err is None:
            raise
        raise err from None


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _safetensors_header(data: bytes, path: str) -> dict[str, Any]:
    # The format's own layout: 8 bytes little-endian header length, then the JSON header.
    # safetensors.numpy.load gives the tensors of bytes but not the metadata.
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        return json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise ValueError(f"{path} is not a safetensors file (unreadable header)") from e


def read_prompt_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a prompt file -> ``(prompt, meta)``: nested dicts of numpy arrays, JSON dict.

    Accepts ``.safetensors`` files written by :func:`save_prompt` and old ``.npz`` exports
    (:func:`jaxprompt.checkpoint.save_exported`), local, ``gs://`` or on the Hugging Face Hub
    (``hf://USER/NAME[@REVISION]``, see :func:`resolve_prompt_path`).

    Raises:
      FileNotFoundError: if there is no such file.
      ValueError: if it is neither format, or not a jaxprompt prompt.
    """
    from jaxprompt import checkpoint

    path = resolve_prompt_path(path)
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no prompt file {os.fspath(path)}")
    if p.is_dir():
        raise ValueError(
            f"{os.fspath(path)} is a directory: give a prompt file, e.g. `jaxprompt export "
            f"--workdir {os.fspath(path)}` writes one from a run directory"
        )
    data = p.read_bytes()
    if data[:2] == b"PK":  # a zip: the old .npz export
        return checkpoint.load_exported(path)
    import safetensors.numpy

    header = _safetensors_header(data, os.fspath(path))
    text = (header.get("__metadata__") or {}).get(META_KEY)
    if text is None:
        raise ValueError(f"{path} is not a jaxprompt prompt (no {META_KEY!r} metadata)")
    meta = json.loads(text)
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has prompt format version {version}; this jaxprompt reads up to "
            f"{FORMAT_VERSION}: upgrade jaxprompt"
        )
    try:
        flat = safetensors.numpy.load(data)
    except Exception as e:  # noqa: BLE001 - safetensors' own error type is not public API
        # A header that parses over data that does not: a file cut short (an interrupted copy).
        raise ValueError(
            f"{path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "copy or export it again"
        ) from e
    return checkpoint.unflatten_dict(flat), meta


def load_prompt(path: str | os.PathLike, *, clip: Any = None) -> tuple[Any, dict[str, Any], Any]:
    """A shared prompt, ready to use: ``(method, prompt, meta)`` in one call.

    Args:
      path: a ``.safetensors`` prompt file, an old ``.npz`` export, or a prompt on the
        Hugging Face Hub: ``"hf://USER/NAME"`` or ``"hf://USER/NAME@REVISION"``.
      clip: optionally the :class:`~jaxprompt.clip.Clip` it will be used with; its
        fingerprint must match the file's backbone.

    Returns:
      ``(method, prompt, meta)``: the rebuilt :class:`~jaxprompt.methods.PromptMethod`, the
      prompt (nested dicts of float32 numpy arrays) and the file's JSON header.

    Raises:
      BackboneMismatchError: if ``clip`` is not the backbone the prompt was learned on.
      ValueError: if the file is not a prompt file or names no method.
    """
    from jaxprompt import methods

    prompt, meta = read_prompt_file(path)
    if "method" not in meta:
        raise ValueError(f"{path} names no method: it cannot be rebuilt")
    if clip is not None:
        check_backbone(meta, clip)
    method = methods.get(str(meta["method"]), **dict(meta.get("method_config") or {}))
    return method, prompt, meta
