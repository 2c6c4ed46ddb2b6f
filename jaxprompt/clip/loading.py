"""Loading a frozen CLIP: Hugging Face directories and hub ids, OpenAI ``.pt`` files, parameter
trees in memory."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import backbones, hf_checkpoint
from jaxprompt.clip.model import (
    CheckpointLoadError,
    Clip,
    ClipLoadError,
    full_config,
    param_shapes,
    spec_from_config,
    weights_id,
)
from jaxprompt.clip.tokens import load_tokenizer, openai_tokenizer

PyTree = Any

_FLAX_WEIGHTS = "flax_model.msgpack"
_SAFE_WEIGHTS = "model.safetensors"
_TORCH_WEIGHTS = "pytorch_model.bin"
_CONFIG = "config.json"
# The ViT image tower's parameters: a ResNet checkpoint brings jaxprompt.resnet's instead.
_VIT_IMAGE_TOWER = ("vision_model", "visual_projection")


def load_clip(name_or_path: str | os.PathLike, *, dtype: str = "float32") -> Clip:
    """Loads a frozen CLIP and its tokenizer.

    Args:
      name_or_path: one of OpenAI's model names (``"RN50"``, ``"ViT-B/16"``, ...; looked up
        as its checkpoint file in ``$JAXPROMPT_CLIP_DIR`` then ``~/.cache/clip``, a ViT
        falling back to its hub id: :func:`jaxprompt.backbones.resolve`), a Hugging Face hub
        id (e.g. ``"openai/clip-vit-base-patch16"``, through the hub's local cache), a local
        directory in Hugging Face format holding ``config.json``, the tokenizer files and
        ``model.safetensors``, ``pytorch_model.bin`` or ``flax_model.msgpack`` (read in that
        preference, all without torch: :mod:`jaxprompt.hf_checkpoint`), or an OpenAI-format
        checkpoint file (``ViT-B-16.pt``: a TorchScript archive or a ``torch.save`` state
        dict), read without running code from it and without torch, with the CLIP BPE
        vocabulary shipped with jaxprompt as its tokenizer. ResNet checkpoints (``RN50.pt``,
        ``RN101.pt``, ...) get :mod:`jaxprompt.resnet`'s image tower, frozen in inference mode
        (BatchNorm from the running statistics).
      dtype: compute dtype of the frozen towers, ``"float32"`` (default, and what CPU tests
        use) or ``"bfloat16"`` (accelerators). Prompts, logits and losses stay float32.

    Returns:
      A :class:`Clip`.

    Raises:
      ClipLoadError: with a one-line message naming the fix (missing weights or config, offline
        hub, unreadable tokenizer).
      CheckpointLoadError: (also a ``ValueError``) a weights file that is unreadable or
        truncated, asks to run code, lacks tensors or has shapes that do not fit the config.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    # OpenAI's names ("RN50", "ViT-B/16") become a file or a hub id; the Clip keeps the name
    # as given (spec.name, results.json), so it says which backbone, not where it was found.
    try:
        path = os.path.expanduser(backbones.resolve(name_or_path))
    except backbones.CheckpointNotFoundError as e:
        raise ClipLoadError(str(e)) from None
    if os.path.isdir(path):
        return _load_hf_dir(path, name=str(name_or_path), dtype=dtype)
    if os.path.isfile(path):
        return _load_openai(path, name=str(name_or_path), dtype=dtype)
    if os.path.exists(path) or path.startswith((".", "/", "~")):
        raise ClipLoadError(f"{path} is not a directory: pass a Hugging Face model directory")
    # Offline, the hub client retries for most of a minute before failing: read the local
    # cache only, which fails at once when the model is not there.
    local_only = not hf_checkpoint.hub_reachable()
    try:
        directory = hf_checkpoint.snapshot(path, local_only=local_only)
    except Exception as e:  # noqa: BLE001 - turn hub/IO errors into one actionable line
        first = hf_checkpoint.first_line(e)
        if local_only:
            raise ClipLoadError(
                f"could not load CLIP {path!r}: the model hub is unreachable and the model is "
                "not in the local cache; pass a local directory in Hugging Face format, or set "
                "HF_HOME to a cache that holds it"
            ) from e
        err = hf_checkpoint.hub_error(
            e,
            doing=f"could not load CLIP {path!r}",
            again="try again (or pass a local directory in Hugging Face format)",
        )
        if err is not None:
            raise ClipLoadError(str(err)) from e
        raise ClipLoadError(
            f"could not load CLIP {path!r} ({first}): pass a local directory in Hugging "
            "Face format, or set HF_HOME to a cache that holds it (no network access here?)"
        ) from e
    return _load_hf_dir(directory, name=str(name_or_path), dtype=dtype)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face CLIP directory's ``config.json`` as a plain dict (not yet filled in with
    defaults: :func:`jaxprompt.clip.model.full_config` does that).

    Raises:
      ClipLoadError: no ``config.json``, not JSON, or not a CLIP config (one line).
    """
    file = os.path.join(os.fspath(directory), _CONFIG)
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ClipLoadError(
            f"{directory} has no {_CONFIG}: save the model with save_pretrained, which writes it"
        ) from None
    except (OSError, ValueError) as e:
        first = hf_checkpoint.first_line(e)
        raise ClipLoadError(f"could not read {file} as JSON ({first[:120]})") from None
    if not isinstance(config, dict):
        raise ClipLoadError(f"{file} is not a JSON object: not a model config")
    kind = config.get("model_type", "clip")
    if kind != "clip":
        raise ClipLoadError(
            f"{file} describes a {kind!r} model, not CLIP: pass a CLIPModel checkpoint"
        )
    return config


def _load_hf_dir(directory: str, *, name: str, dtype: str) -> Clip:
    """A Hugging Face CLIP directory: config.json, the preferred weights file, the tokenizer."""
    try:
        weights = hf_checkpoint.find_weights(directory)
    except hf_checkpoint.CheckpointError:
        raise ClipLoadError(
            f"no CLIP weights in {directory}: expected {_SAFE_WEIGHTS}, {_TORCH_WEIGHTS} or "
            f"{_FLAX_WEIGHTS} (save a model there with save_pretrained)"
        ) from None
    config = read_config(directory)
    try:
        params = hf_checkpoint.to_flax(
            hf_checkpoint.read_weights(weights), param_shapes(config), source=weights
        )
    except hf_checkpoint.CheckpointError as e:
        raise CheckpointLoadError(str(e)) from None
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as e:  # noqa: BLE001 - tokenizer files missing or unreadable: one line
        first = hf_checkpoint.first_line(e)
        raise ClipLoadError(
            f"could not load the tokenizer in {directory} ({first}): save it there with "
            "tokenizer.save_pretrained"
        ) from None
    return from_params(config, params, tokenizer, name=name, dtype=dtype)


def _load_openai(path: str, *, name: str, dtype: str) -> Clip:
    """An OpenAI-format checkpoint file (TorchScript archive or state dict), read without running
    code from it."""
    from jaxprompt import openai_checkpoint as oc

    try:
        sd = oc.read_state_dict(path)
    except oc.CheckpointError as e:
        raise CheckpointLoadError(str(e)) from None
    return from_openai_state_dict(sd, name=name, dtype=dtype, source=path)


def from_openai_state_dict(
    state_dict: dict[str, Any], *, name: str = "", dtype: str = "float32", source: str = ""
) -> Clip:
    """A :class:`Clip` from an OpenAI-layout state dict already in memory (the names of
    OpenAI's ``CLIP.state_dict()``: ``visual.conv1.weight``, ``transformer.resblocks.0...``;
    arrays or anything ``np.asarray`` takes).

    A ViT is converted to the Hugging Face layout; a modified ResNet keeps the ViT CLIP's text
    tower and gets :mod:`jaxprompt.resnet`'s image tower. The tokenizer is the CLIP BPE
    vocabulary shipped with jaxprompt (OpenAI's checkpoints carry none). :func:`load_clip` ends
    here for ``.pt`` files.

    Args:
      state_dict: OpenAI's parameter names -> tensors.
      name: the backbone's name, kept as ``spec.name``.
      dtype: compute dtype of the frozen towers (:func:`load_clip`).
      source: where the weights came from, for error messages.

    Raises:
      CheckpointLoadError: missing tensors or shapes that are not an OpenAI CLIP (one line).
    """
    from jaxprompt import openai_checkpoint as oc

    where = source or name or "the state dict"
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    try:
        config_kwargs, params = oc.convert(sd)
    except oc.CheckpointError as e:
        raise CheckpointLoadError(str(e)) from None
    config = full_config(config_kwargs)
    if "resnet_layers" in config_kwargs["vision_config"]:
        # The image tower is jaxprompt.resnet's; the text tower is CLIP's, checked below.
        vision, params = (
            params["vision_model"],
            {k: v for k, v in params.items() if k != "vision_model"},
        )
    else:
        vision = None
    want = param_shapes(config)
    if vision is not None:
        want = {k: v for k, v in want.items() if k.split("/")[0] not in _VIT_IMAGE_TOWER}
    got = {k: np.shape(v) for k, v in _flat_items(params)}
    if want != got:
        bad = sorted(set(want.items()) ^ set(got.items()))[0]
        raise CheckpointLoadError(
            f"{where}: converted weights do not fit the CLIP layout (at {bad[0]})"
        )
    if vision is not None:
        params = {**params, "vision_model": vision}
    return from_params(config, params, openai_tokenizer(), name=name, dtype=dtype)


def _flat_items(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _flat_items(v, prefix + (k,))
        else:
            yield "/".join(prefix + (k,)), v


def from_params(
    config: Any, params: PyTree, tokenizer: Any, *, name: str = "", dtype: str = "float32"
) -> Clip:
    """Builds a :class:`Clip` from a CLIP config (the ``config.json`` mapping, Hugging Face's
    layout), parameters in Hugging Face's Flax CLIP layout, and a tokenizer.

    :func:`load_clip` ends here; pretraining code (the toy world's CLIP) uses it directly on
    parameters it is training.
    """
    if not isinstance(config, dict) and hasattr(config, "to_dict"):
        config = config.to_dict()
    # Cast on the host, where the weights are digested (weights_id) before they go to the device.
    params = jax.tree.map(lambda x: np.asarray(x, dtype=jnp.dtype(dtype)), dict(params))
    # The logit scale is a scalar read by every method in float32.
    params["logit_scale"] = np.asarray(params["logit_scale"], np.float32)
    wid = weights_id(params, tokenizer)
    params = jax.tree.map(jnp.asarray, params)
    sot = tokenizer.bos_token_id
    eot = tokenizer.eos_token_id
    if sot is None or eot is None:
        raise ClipLoadError(f"the tokenizer of {name!r} has no start/end-of-text tokens")
    spec = spec_from_config(config, name=name, dtype=dtype, sot_id=sot, eot_id=eot)
    return Clip(params=params, spec=spec, tokenizer=tokenizer, weights_id=wid)


# --------------------------------------------------------------------------- tokens and tasks

logging.getLogger("absl").setLevel(logging.WARNING)
