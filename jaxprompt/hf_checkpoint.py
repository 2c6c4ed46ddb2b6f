"""Hugging Face checkpoints without transformers' model classes: read a weights file, convert
PyTorch names to a Flax parameter tree, fetch a hub snapshot.

The frozen models of jaxprompt (the CLIP towers, the masked LM of :mod:`jaxprompt.side.mlm`) are
the project's own functions over parameter trees in Hugging Face's *Flax* layout. This module
turns any of Hugging Face's weight files into such a tree:

    path = hf_checkpoint.find_weights(directory)        # model.safetensors > .bin > .msgpack
    flat = hf_checkpoint.read_weights(path)             # flat name -> NumPy array
    params = hf_checkpoint.to_flax(flat, expected, source=path)

``expected`` maps every Flax parameter (``"text_model/embeddings/token_embedding/embedding"``)
to its shape, computed by the caller from the model's config: it decides which tensors are
read, how each PyTorch tensor is laid out, and catches a checkpoint of another model.

Every failure is a :class:`CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "HubError",
    "WEIGHT_FILES",
    "find_weights",
    "first_line",
    "hub_error",
    "hub_reachable",
    "read_weights",
    "snapshot",
    "to_flax",
    "to_torch",
]

# In order of preference: safetensors reads fast and runs no code; the pickle-based .bin is read
# by a restricted unpickler; Flax msgpack is what transformers<5 wrote for Flax models.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")
_INDEX = ".index.json"  # sharded weights: "<file>.index.json" maps each tensor to its shard


class CheckpointError(ValueError):
    """A weights file is missing, unreadable or not the expected model; one-line message."""


class HubError(OSError):
    """The Hugging Face Hub failed a request (network, refusal, server error); one-line
    message naming the fix (see :func:`hub_error`)."""


def find_weights(directory: str | os.PathLike) -> str:
    """The weights file of a Hugging Face model directory, by :data:`WEIGHT_FILES` preference
    (a sharded checkpoint's ``*.index.json`` counts as its file).

    Raises:
      CheckpointError: the directory holds none of them.
    """
    directory = os.fspath(directory)
    files = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    for name in WEIGHT_FILES:
        for candidate in (name, name + _INDEX):
            if candidate in files:
                return os.path.join(directory, candidate)
    raise CheckpointError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)} "
        "(save a model there with save_pretrained)"
    )


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a weights file into flat names -> NumPy arrays, dtypes kept (bfloat16 included).

    ``.safetensors`` and ``.bin`` give PyTorch names (``"a.b.weight"``); ``.msgpack`` gives its
    nested Flax tree flattened with ``"/"`` (``"a/b/kernel"``). A ``*.index.json`` reads every
    shard it lists. ``.bin`` files are read without torch and without running code from them
    (:func:`jaxprompt.openai_checkpoint.read_state_dict`).

    Raises:
      CheckpointError: unknown format, or a file that is truncated or corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: download or save the model again")
    if path.endswith(_INDEX):
        return _read_sharded(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".bin"):
        return _read_torch(path)
    if path.endswith(".msgpack"):
        return _read_msgpack(path)
    raise CheckpointError(
        f"{path}: unknown weights format (expected .safetensors, .bin or .msgpack)"
    )


def _read_sharded(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a sharded-weights index ({first_line(e)})") from None
    out: dict[str, np.ndarray] = {}
    folder = os.path.dirname(path)
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard:  # an index never points outside its folder
            raise CheckpointError(f"{path} names a shard outside its folder: {shard[:80]!r}")
        out.update(read_weights(os.path.join(folder, shard)))
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        return dict(safetensors.numpy.load_file(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: one line
        raise CheckpointError(
            f"could not read {path} as safetensors ({first_line(e)}): the file is truncated "
            "or corrupt; download or save it again"
        ) from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
    from jaxprompt import openai_checkpoint

    try:
        return openai_checkpoint.read_state_dict(path)
    except openai_checkpoint.CheckpointError as e:
        raise CheckpointError(
            f"{first_line(e)} (a truncated or corrupt download? fetch or save it again)"
        ) from None


def _read_msgpack(path: str) -> dict[str, np.ndarray]:
    import flax.serialization

    try:
        with open(path, "rb") as f:
            tree = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - msgpack's errors are many: one line
        raise CheckpointError(
            f"could not read {path} as Flax msgpack ({first_line(e)}): the file is truncated "
            "or corrupt; download or save it again"
        ) from None
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} holds no parameter tree: not a Flax checkpoint")
    return dict(_flatten(tree))


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)


def first_line(e: BaseException) -> str:
    """An exception's first line (or its type's name), at most 160 characters: what one-line
    errors quote of the error underneath."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def _torch_candidates(flax_name: str, ndim: int) -> list[tuple[str, str]]:
    """PyTorch names a Flax parameter may have, each with how to lay it out: ``"copy"``,
    ``"linear"`` (transpose [out, in] -> [in, out]) or ``"conv"`` ([O, I, H, W] -> HWIO)."""
    *path, leaf = flax_name.split("/")
    module = ".".join(path)
    dotted = ".".join([*path, leaf])
    if leaf == "kernel":
        return [(f"{module}.weight", "conv" if ndim == 4 else "linear" if ndim == 2 else "copy")]
    if leaf in ("scale", "embedding"):  # LayerNorm and Embedding weights keep their layout
        return [(f"{module}.weight", "copy")]
    # Biases and bare parameters (class_embedding, logit_scale) keep their names.
    return [(dotted, "copy")]


def to_flax(
    state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, source: str
) -> dict[str, Any]:
    """Converts a flat state dict to a nested Flax parameter tree of exactly ``expected``.

    Each expected Flax name (``"a/b/kernel"``) is looked up as itself (a Flax checkpoint) or
    under its PyTorch name: a Linear's ``a.b.weight`` transposed, a Conv2d's ``a.b.weight``
    [out, in, kh, kw] to HWIO, a LayerNorm's or Embedding's ``a.b.weight`` as is, anything else
    (biases, bare parameters) under its dotted name. Tensors not asked for (buffers such as
    ``position_ids``, heads the caller does not use) are left out.

    Args:
      state_dict: flat names -> arrays (:func:`read_weights`).
      expected: every Flax parameter, ``"/"``-joined, -> its shape.
      source: the file the tensors came from, for error messages.

    Returns:
      The nested tree of NumPy arrays (dtypes kept).

    Raises:
      CheckpointError: a tensor missing or of the wrong shape (one line naming ``source``).
    """
    flat: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for name, shape in expected.items():
        shape = tuple(int(n) for n in shape)
        if name in state_dict:
            candidates = [(name, "copy")]
        else:
            candidates = _torch_candidates(name, len(shape))
        found = next(((k, how) for k, how in candidates if k in state_dict), None)
        if found is None:
            missing.append(candidates[0][0])
            continue
        key, how = found
        value = np.asarray(state_dict[key])
        if how == "linear" and value.ndim == 2:
            value = value.T
        elif how == "conv" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        if value.shape != shape:
            raise CheckpointError(
                f"{source}: {key} has shape {_shape(value.shape, how)}, the model expects "
                f"{_shape(shape, how)}: a checkpoint of another model size (check config.json)"
            )
        flat[name] = np.array(value, order="C")
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} of the model's {len(expected)} weights (e.g. "
            f"{missing[0]}): a checkpoint of another model, or an incomplete file?"
        )
    return _nest(flat)


def _shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    # Messages quote shapes as the checkpoint stores them, so they can be compared with it.
    if how == "linear" and len(shape) == 2:
        return tuple(shape[::-1])
    if how == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _cache_dir() -> str | None:
    """The hub cache, read from the environment now (not when huggingface_hub was imported), so
    that ``HF_HUB_CACHE`` / ``HF_HOME`` set by a program or a test take effect."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def snapshot(repo_id: str, *, local_only: bool) -> str:
    """A local directory holding a hub model's config, tokenizer and weights.

    Online, only the preferred weights file (:data:`WEIGHT_FILES`) is downloaded, not every
    format the repository carries. With ``local_only`` (or ``HF_HUB_OFFLINE``) only the local
    cache is read, which fails at once when the model is not there.

    Raises:
      Whatever ``huggingface_hub`` raises (the caller words it for its model).
    """
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["*.json", "*.txt"]
    if local_only or offline:
        patterns += [f"{w}*" for w in WEIGHT_FILES]
    else:
        files = set(huggingface_hub.list_repo_files(repo_id))
        best = next((w for w in WEIGHT_FILES if w in files or w + _INDEX in files), None)
        if best is not None:
            stem = best.rsplit(".", 1)[0]
            # A sharded checkpoint: model-00001-of-00002.safetensors and its index.
            patterns += [best, f"{stem}-*.{best.rsplit('.', 1)[1]}"]
    return huggingface_hub.snapshot_download(
        repo_id, allow_patterns=patterns, local_files_only=local_only, cache_dir=_cache_dir()
    )


def to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_flax`: a nested Flax tree -> PyTorch names and layouts (a 2-D
    ``kernel`` becomes a Linear ``weight`` [out, in], a 4-D one a Conv2d ``weight`` [O, I, H, W],
    ``scale`` and ``embedding`` become ``weight``), for writing ``model.safetensors`` or
    ``pytorch_model.bin`` that transformers' PyTorch models read."""
    out: dict[str, np.ndarray] = {}
    for name, value in _flatten(params):
        *path, leaf = name.split("/")
        value = np.asarray(value)
        if leaf == "kernel" and value.ndim == 2:
            leaf, value = "weight", value.T
        elif leaf == "kernel" and value.ndim == 4:
            leaf, value = "weight", value.transpose(3, 2, 0, 1)
        elif leaf in ("kernel", "scale", "embedding"):
            leaf = "weight"
        out[".".join([*path, leaf])] = np.array(value, order="C")
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (one try, ``timeout`` seconds).

    Asked before a download or upload: unreachable, the hub client retries for most of a
    minute and logs every try before failing.

    ``HF_HUB_OFFLINE`` and a proxy (which a direct connection would bypass) count as
    reachable: the hub client's own settings then decide.
    """
    import socket
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(v) for v in proxies):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# Where the Hub client's network failures come from (huggingface_hub<1 uses requests and urllib3,
# later versions httpx or httpx2 over httpcore); an HTTP answer with a status is told apart first.
_NETWORK_MODULES = ("requests", "urllib3", "httpx", "httpx2", "httpcore", "http", "socket", "ssl")
_STATUS_FIX = {
    401: "the Hub refused the token (401 Unauthorized): log in with `hf auth login` (or set "
    "HF_TOKEN to a valid token)",
    403: "the Hub refused access (403 Forbidden): use a token that may write to (or read) the "
    "repository (`hf auth login` or HF_TOKEN)",
    404: "the Hub has no such repository or file (404 Not Found): check the name",
    429: "the Hub is limiting requests (429 Too Many Requests): wait a few minutes",
}


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def hub_error(e: BaseException, *, doing: str, again: str) -> HubError | None:
    """A one-line :class:`HubError` for an exception the Hub client raised, or ``None`` when it
    is not a Hub failure (then the caller re-raises it).

    The Hub client's own messages are a raw exception repr (``MaxRetryError(...)``), a URL
    with a status, or many lines; this one says what failed and the fix.

    Args:
      e: the exception.
      doing: what failed, e.g. ``"push to user/name failed"``.
      again: how to retry once fixed, e.g. ``"run the same push again"``.
    """
    chain = _chain(e)
    names = {c.__name__ for x in chain for c in type(x).__mro__}
    if "LocalTokenNotFoundError" in names:
        return HubError(f"{doing}: no Hugging Face token: log in with `hf auth login` (or set "
                        f"HF_TOKEN) and {again}")  # fmt: skip
    if "OfflineModeIsEnabled" in names:
        return HubError(f"{doing}: HF_HUB_OFFLINE is set: unset it and {again}")
    status = None
    for x in chain:
        status = getattr(getattr(x, "response", None), "status_code", None)
        if isinstance(status, int):
            break
    if isinstance(status, int):
        if status in _STATUS_FIX:
            return HubError(f"{doing}: {_STATUS_FIX[status]}, then {again}")
        if status >= 500:
            return HubError(f"{doing}: the Hub failed ({status} server error): wait a while, then "
                            f"{again}")  # fmt: skip
        return HubError(f"{doing}: the Hub answered {status} ({first_line(e)}); {again}")
    network = any(
        isinstance(x, ConnectionError | TimeoutError)
        or type(x).__module__.split(".")[0] in _NETWORK_MODULES
        for x in chain
    )
    if network:
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        kind = type(chain[-1]).__name__ if len(chain) > 1 else type(e).__name__
        return HubError(f"{doing}: the connection to the Hugging Face Hub ({endpoint}) failed "
                        f"({kind}): check the network (or HF_ENDPOINT) and {again}")  # fmt: skip
    return None
