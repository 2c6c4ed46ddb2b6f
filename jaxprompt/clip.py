"""The frozen CLIP: loading, class sets, and prompt-aware text and image encoders.

This is the only module that imports ``transformers``. It loads Hugging Face's FlaxCLIP weights
(or converts PyTorch weights on load) and re-runs the Hugging Face Flax submodules layer by layer
with the frozen parameters, because the Hugging Face wrapper has no hook for prompts. Methods
never touch Hugging Face modules: they build prompt tensors and call :func:`encode_text` and
:func:`encode_image`.

Where prompts go (Khattak et al., "Self-regulating Prompts", arXiv 2307.06948, and its
reference implementation; see also CoOp, arXiv 2109.01134):

* Text: ``[SOT] ctx_1..ctx_n <class-name tokens> "." [EOT]``. The learned context takes the
  positions right after the start token and receives the positional embedding like any token.
  Deep text prompts *replace* (not add to) positions ``1..n`` on the residual stream entering
  layer ``i`` (before its first LayerNorm), with no positional embedding. Layers past the prompt
  depth keep whatever the previous layer produced at those positions. The feature is taken at
  the EOT position, after the final LayerNorm, times the text projection.
* Vision: ``[CLS] <patches>`` plus positional embedding, then ``n_v`` learned tokens are
  *appended* (no positional embedding) and the whole sequence goes through the pre-LayerNorm.
  Deep vision prompts replace the *last* ``n_v`` tokens before layer ``i``. The feature is the
  CLS token after the post-LayerNorm, times the visual projection.

EOT truncation: the text tower is causal, so positions after the last EOT of a class set cannot
influence any EOT feature. A :class:`Task` stores its class tokens padded only to the longest
class, so every prompted text pass runs over ``max(EOT) + 1`` positions instead of 77, with equal
results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprompt import backbones, resnet

Array = jax.Array
PyTree = Any

__all__ = [
    "CheckpointLoadError",
    "Clip",
    "ClipLoadError",
    "ClipSpec",
    "Task",
    "check_vision_prompts",
    "encode_image",
    "encode_text",
    "encode_text_shared",
    "encode_token_ids",
    "embed_tokens",
    "from_openai_state_dict",
    "load_clip",
    "logit_scale",
    "make_task",
    "normalize",
    "openai_tokenizer",
    "prompted_text_features",
    "prompted_text_inputs",
    "shared_text_inputs",
    "tokenize",
]

_FLAX_WEIGHTS = "flax_model.msgpack"
_SAFE_WEIGHTS = "model.safetensors"
_TORCH_WEIGHTS = "pytorch_model.bin"


class ClipLoadError(RuntimeError):
    """CLIP weights or tokenizer could not be loaded; the message says what to do."""


class CheckpointLoadError(ClipLoadError, ValueError):
    """An OpenAI-format checkpoint file could not be used (unreadable, refused, unsupported)."""


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Static description of a CLIP backbone (hashable: it is a jit-static field of `Clip`)."""

    name: str
    # The Hugging Face CLIPConfig as JSON, to rebuild the Flax submodules.
    config_json: str = dataclasses.field(repr=False)
    dtype: str  # compute dtype of the frozen towers: "float32" or "bfloat16"
    text_width: int
    text_layers: int
    context_length: int
    vision_width: int
    vision_layers: int
    image_size: int
    patch_size: int
    embed_dim: int
    sot_id: int
    eot_id: int
    # "vit", or "resnet" for OpenAI's modified ResNets (jaxprompt.resnet): then image_size is
    # the checkpoint's, patch_size 32 (the tower's downsampling), vision_width the channels
    # into the attention pool and vision_layers the number of bottleneck blocks.
    image_tower: str = "vit"
    resnet_layers: tuple[int, ...] = ()
    resnet_heads: int = 0


@struct.dataclass
class Clip:
    """A frozen CLIP: Hugging Face FlaxCLIP parameters, a static spec and the tokenizer.

    A pytree whose only leaves are ``params``, so it is passed to jitted functions as an
    argument (and can be sharded), never captured as a closure constant.
    """

    params: PyTree
    spec: ClipSpec = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False)


@struct.dataclass
class Task:
    """A class set: the label space a prompt is evaluated on, passed at call time.

    ``token_ids`` holds, per class, the tokens of ``"{name}."`` followed by EOT and padded with
    EOT to the longest class of the set: no start token and no context, so one Task serves every
    method and context length. Methods prepend the start token and their context.

    Attributes:
      token_ids: [C, L] int32 class tokens (name, ".", EOT, padding).
      eot: [C] int32 position of EOT inside ``token_ids``.
      name_len: [C] int32 number of class-name tokens (before the "."), for CoOp's
        ``class_position="middle"`` / ``"front"``.
      names: the class names as given (static; templates and teachers re-tokenize them).
      template: the dataset's hand-crafted template (CoOp's, e.g. ``"{} texture."``), or None;
        used by methods told to use the dataset's template (``zeroshot(templates="dataset")``).
    """

    token_ids: Array
    eot: Array
    name_len: Array
    names: tuple[str, ...] = struct.field(pytree_node=False)
    template: str | None = struct.field(pytree_node=False, default=None)

    def __len__(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------- loading


def _quiet_transformers():
    import transformers

    # Every FlaxPreTrainedModel logs a deprecation notice for the Flax classes on construction.
    transformers.logging.set_verbosity_error()
    return transformers


def load_clip(name_or_path: str | os.PathLike, *, dtype: str = "float32") -> Clip:
    """Loads a frozen CLIP and its tokenizer.

    Args:
      name_or_path: one of OpenAI's model names (``"RN50"``, ``"ViT-B/16"``, ...; looked up
        as its checkpoint file in ``$JAXPROMPT_CLIP_DIR`` then ``~/.cache/clip``, a ViT
        falling back to its hub id: :func:`jaxprompt.backbones.resolve`), a Hugging Face hub
        id (e.g. ``"openai/clip-vit-base-patch16"``), a local
        directory in Hugging Face format holding ``flax_model.msgpack``, ``model.safetensors``
        or ``pytorch_model.bin`` (PyTorch weights are converted on load; ``.bin`` needs torch)
        and the tokenizer files, or an OpenAI-format checkpoint file (``ViT-B-16.pt``: a
        TorchScript archive or a ``torch.save`` state dict), read without running code from it
        and without torch, with the CLIP BPE vocabulary shipped with jaxprompt as its tokenizer.
        ViT checkpoints become FlaxCLIP models; ResNet ones (``RN50.pt``, ``RN101.pt``, ...)
        keep the FlaxCLIP text tower and get :mod:`jaxprompt.resnet`'s image tower, frozen in
        inference mode (BatchNorm from the running statistics).
      dtype: compute dtype of the frozen towers, ``"float32"`` (default, and what CPU tests
        use) or ``"bfloat16"`` (accelerators). Prompts, logits and losses stay float32.

    Returns:
      A :class:`Clip`.

    Raises:
      ClipLoadError: with a one-line message naming the fix (missing weights, offline hub,
        torch needed for ``.bin`` weights).
      CheckpointLoadError: (also a ``ValueError``) an OpenAI-format file that is unreadable,
        asks to run code, or is not a CLIP.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    # OpenAI's names ("RN50", "ViT-B/16") become a file or a hub id; the Clip keeps the name
    # as given (spec.name, results.json), so it says which backbone, not where it was found.
    try:
        path = os.path.expanduser(backbones.resolve(name_or_path))
    except backbones.CheckpointNotFoundError as e:
        raise ClipLoadError(str(e)) from None
    transformers = _quiet_transformers()
    kwargs: dict[str, Any] = {}
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if _FLAX_WEIGHTS in files:
            pass
        elif _SAFE_WEIGHTS in files:
            kwargs["from_pt"] = True
        elif _TORCH_WEIGHTS in files:
            import importlib.util

            if importlib.util.find_spec("torch") is None:
                raise ClipLoadError(
                    f"{path} has only PyTorch .bin weights: install torch "
                    "(pip install 'jaxprompt[torch]') or save them as model.safetensors"
                )
            kwargs["from_pt"] = True
        else:
            raise ClipLoadError(
                f"no CLIP weights in {path}: expected {_FLAX_WEIGHTS}, {_SAFE_WEIGHTS} or "
                f"{_TORCH_WEIGHTS} (save a model there with save_pretrained)"
            )
    elif os.path.isfile(path):
        return _load_openai(path, name=str(name_or_path), dtype=dtype)
    elif os.path.exists(path) or path.startswith((".", "/", "~")):
        raise ClipLoadError(f"{path} is not a directory: pass a Hugging Face model directory")
    elif not _hub_reachable():
        # Offline, the hub client retries for most of a minute before failing: read the local
        # cache only, which fails at once when the model is not there.
        kwargs["local_files_only"] = True
    try:
        model, params = _from_pretrained(transformers, path, kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, local_files_only=kwargs.get("local_files_only", False)
        )
    except ClipLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - turn hub/IO errors into one actionable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if kwargs.get("local_files_only"):
            raise ClipLoadError(
                f"could not load CLIP {path!r}: the model hub is unreachable and the model is "
                "not in the local cache; pass a local directory in Hugging Face format, or set "
                "HF_HOME to a cache that holds it"
            ) from e
        raise ClipLoadError(
            f"could not load CLIP {path!r} ({first[:160]}): pass a local directory in Hugging "
            "Face format, or set HF_HOME to a cache that holds it (no network access here?)"
        ) from e
    return from_params(model.config, params, tokenizer, name=str(name_or_path), dtype=dtype)


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

    A ViT is converted to the Hugging Face layout; a modified ResNet keeps the FlaxCLIP text
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
    transformers = _quiet_transformers()
    config = transformers.CLIPConfig(**config_kwargs)
    if "resnet_layers" in config_kwargs["vision_config"]:
        # The image tower is jaxprompt.resnet's; the text tower is FlaxCLIP's, checked below.
        vision, params = (
            params["vision_model"],
            {k: v for k, v in params.items() if k != "vision_model"},
        )
    else:
        vision = None
    model = transformers.FlaxCLIPModel(config, _do_init=False)
    shapes = dict(model.params_shape_tree)
    if vision is not None:
        shapes = {k: v for k, v in shapes.items() if k not in ("vision_model", "visual_projection")}
    want = {k: v.shape for k, v in _flat_items(shapes)}
    got = {k: np.shape(v) for k, v in _flat_items(params)}
    if want != got:
        bad = sorted(set(want.items()) ^ set(got.items()))[0]
        raise CheckpointLoadError(
            f"{where}: converted weights do not fit the CLIP layout (at {bad[0]})"
        )
    if vision is not None:
        params = {**params, "vision_model": vision}
    return from_params(config, params, openai_tokenizer(), name=name, dtype=dtype)


BPE_VOCAB = "assets/bpe_simple_vocab_16e6.txt.gz"


def _byte_symbols() -> list[str]:
    """The 256 byte symbols of byte-level BPE, in vocabulary order: the printable Latin-1 bytes
    stand for themselves; the others are shifted to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = {b: 256 + i for i, b in enumerate(b for b in range(256) if b not in set(keep))}
    return [chr(b) for b in keep] + [chr(shifted[b]) for b in range(256) if b not in set(keep)]


@functools.lru_cache(maxsize=1)
def openai_tokenizer():
    """OpenAI CLIP's tokenizer as a Hugging Face ``CLIPTokenizer``, built offline from the CLIP
    BPE vocabulary shipped with the package (MIT; see the LICENSE file beside it).

    The vocabulary is the 256 byte symbols, the same with the end-of-word mark ``</w>``, the
    first 48,894 merges of the BPE file joined, then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407): 49,408 ids.
    """
    import gzip
    import importlib.resources
    import tempfile

    transformers = _quiet_transformers()
    raw = importlib.resources.files("jaxprompt").joinpath(BPE_VOCAB).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 1 + 49152 - 256 - 2]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = transformers.CLIPTokenizer(
            vocab_file,
            merges_file,
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )
    return tokenizer


def _flat_items(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _flat_items(v, prefix + (k,))
        else:
            yield "/".join(prefix + (k,)), v


def from_params(
    config: Any, params: PyTree, tokenizer: Any, *, name: str = "", dtype: str = "float32"
) -> Clip:
    """Builds a :class:`Clip` from a Hugging Face ``CLIPConfig``, its Flax params and tokenizer.

    :func:`load_clip` ends here; pretraining code (the toy world's CLIP) uses it directly on
    parameters it is training.
    """
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.dtype(dtype)), dict(params))
    # The logit scale is a scalar read by every method in float32.
    params["logit_scale"] = jnp.asarray(params["logit_scale"], jnp.float32)
    sot = tokenizer.bos_token_id
    eot = tokenizer.eos_token_id
    if sot is None or eot is None:
        raise ClipLoadError(f"the tokenizer of {name!r} has no start/end-of-text tokens")
    spec = ClipSpec(
        name=name,
        config_json=config.to_json_string(use_diff=False),
        dtype=dtype,
        text_width=config.text_config.hidden_size,
        text_layers=config.text_config.num_hidden_layers,
        context_length=config.text_config.max_position_embeddings,
        vision_width=config.vision_config.hidden_size,
        vision_layers=config.vision_config.num_hidden_layers,
        image_size=config.vision_config.image_size,
        patch_size=config.vision_config.patch_size,
        embed_dim=config.projection_dim,
        sot_id=int(sot),
        eot_id=int(eot),
        **_image_tower_fields(config.vision_config),
    )
    return Clip(params=params, spec=spec, tokenizer=tokenizer)


def _image_tower_fields(vision_config: Any) -> dict[str, Any]:
    layers = getattr(vision_config, "resnet_layers", None)
    if not layers:
        return {}
    return {
        "image_tower": "resnet",
        "resnet_layers": tuple(int(n) for n in layers),
        "resnet_heads": int(vision_config.num_attention_heads),
    }


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection (one try, ``timeout`` seconds).

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


def _from_pretrained(transformers, path: str, kwargs: dict[str, Any]):
    """Returns ``(model, params)`` without initialising random weights first.

    Hugging Face's own from_pretrained initialises a random model before converting PyTorch
    weights, which on a CPU takes minutes for ViT-B/16; we call its converter with the shape tree
    instead.
    """
    cls = transformers.FlaxCLIPModel
    local = bool(kwargs.get("local_files_only"))
    if not kwargs.get("from_pt"):
        try:
            model, params = cls.from_pretrained(path, _do_init=False, local_files_only=local)
            return model, jax.tree.map(np.asarray, dict(params))
        except OSError as e:
            # A hub repository may hold only PyTorch weights: fetch those and convert them.
            if "from_pt=True" not in str(e) or os.path.isdir(path):
                raise
            import huggingface_hub

            path = huggingface_hub.snapshot_download(
                path,
                allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"],
                local_files_only=local,
            )
    from types import SimpleNamespace

    from transformers.modeling_flax_pytorch_utils import load_pytorch_checkpoint_in_flax_state_dict

    config = transformers.CLIPConfig.from_pretrained(path)
    model = cls(config, _do_init=False)
    weights = os.path.join(path, _SAFE_WEIGHTS)
    if not os.path.exists(weights):
        weights = os.path.join(path, _TORCH_WEIGHTS)
    like = SimpleNamespace(
        params=model.params_shape_tree, base_model_prefix=model.base_model_prefix
    )
    params = load_pytorch_checkpoint_in_flax_state_dict(like, weights, is_sharded=False)
    want = set(_flat_keys(model.params_shape_tree))
    got = set(_flat_keys(params))
    if want - got:
        raise ClipLoadError(
            f"{weights} lacks {len(want - got)} CLIP weights (e.g. {sorted(want - got)[0]}): "
            "is it a CLIPModel checkpoint?"
        )
    return model, jax.tree.map(np.asarray, dict(params))


def _flat_keys(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _flat_keys(v, prefix + (k,))
        else:
            yield "/".join(prefix + (k,))


# --------------------------------------------------------------------------- tokens and tasks


def tokenize(clip: Clip, texts: Sequence[str], *, pad_to: int | None = None):
    """Tokenizes full texts with start and end tokens, padded with EOT.

    Args:
      clip: the model whose tokenizer to use.
      texts: strings, e.g. templates filled with class names.
      pad_to: pad to this length (e.g. 77). By default pad to the longest text, which is the
        exact EOT truncation of this set.

    Returns:
      ``(ids, eot)``: NumPy int32 arrays [N, L] and [N].
    """
    rows = clip.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return _pad_rows(clip, rows, texts, pad_to)


def _pad_rows(clip: Clip, rows, texts, pad_to):
    spec = clip.spec
    longest = max(len(r) for r in rows)
    limit = spec.context_length if pad_to is None else pad_to
    if longest > spec.context_length:
        i = max(range(len(rows)), key=lambda k: len(rows[k]))
        raise ValueError(
            f"text {texts[i]!r} is {len(rows[i])} tokens, over CLIP's context of "
            f"{spec.context_length}: shorten the class name or the context"
        )
    width = longest if pad_to is None else limit
    ids = np.full((len(rows), width), spec.eot_id, np.int32)
    eot = np.zeros((len(rows),), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        eot[i] = len(r) - 1
    return ids, eot


def make_task(clip: Clip, classnames: Sequence[str], *, template: str | None = None) -> Task:
    """Tokenizes a class set once.

    Underscores in names become spaces (as CoOp does at prompt time); the stored ``names`` keep
    the given form.

    Args:
      clip: the model whose tokenizer to use.
      classnames: the class names in label order.
      template: the dataset's hand-crafted template with ``{}`` for the class name (the
        catalog's ``DatasetSpec.template``), kept on the task for methods that use it.

    Returns:
      A :class:`Task` whose ``token_ids`` are padded to its longest class.

    Raises:
      ValueError: on an empty class set, or a name too long for CLIP's context.
    """
    names = tuple(str(n) for n in classnames)
    if not names:
        raise ValueError("make_task needs at least one class name")
    if template is not None and "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    clean = [n.replace("_", " ") for n in names]
    tok = clip.tokenizer
    full = tok([f"{n}." for n in clean], add_special_tokens=True)["input_ids"]
    bare = tok(clean, add_special_tokens=True)["input_ids"]
    # Strip the start token: methods put their own [SOT] and context in front.
    rows = [r[1:] for r in full]
    limit = clip.spec.context_length - 1
    for n, r in zip(names, rows, strict=True):
        if len(r) > limit:
            raise ValueError(
                f"class name {n!r} takes {len(r) - 2} tokens; with the start token, '.' and EOT "
                f"it exceeds CLIP's context of {clip.spec.context_length}: shorten it"
            )
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), clip.spec.eot_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    eot = np.asarray([len(r) - 1 for r in rows], np.int32)
    name_len = np.asarray([len(b) - 2 for b in bare], np.int32)
    return Task(
        token_ids=jnp.asarray(ids),
        eot=jnp.asarray(eot),
        name_len=jnp.asarray(name_len),
        names=names,
        template=template,
    )


def check_context(clip: Clip, task: Task, n_extra: int) -> None:
    """Raises a clear error if ``[SOT] + n_extra tokens + class tokens`` exceed the context."""
    total = 1 + n_extra + int(task.token_ids.shape[1])
    if total > clip.spec.context_length:
        raise ValueError(
            f"the longest class prompt needs {total} tokens (1 start + {n_extra} context + "
            f"{task.token_ids.shape[1]} class) > CLIP's context {clip.spec.context_length}: "
            "use fewer context tokens or shorter class names"
        )


VIT_BACKBONES = "ViT-B/16, ViT-B/32, ViT-L/14 or a Hugging Face CLIP"


def check_vision_prompts(clip: Clip) -> None:
    """Raises a one-line ``ValueError`` unless ``clip``'s image tower takes prompt tokens.

    Vision prompts are tokens of a ViT's sequence; OpenAI's ResNets have no token sequence, so
    the methods that prompt the image tower (IVLP, MaPLe, PromptSRC) need a ViT backbone.
    """
    if clip.spec.image_tower != "vit":
        raise ValueError(
            f"this method prompts the image tower's transformer layers, which the ResNet "
            f"backbone {clip.spec.name or 'given'!r} does not have: use a ViT backbone "
            f"({VIT_BACKBONES}), or a text-prompt method (coop, cocoop, bayes, tpt, zeroshot)"
        )


def check_depth(clip: Clip, depth: int) -> None:
    """Raises a clear error unless ``1 <= depth <= layers`` of both towers of ``clip``.

    Deep prompts at depth ``J`` go before layers ``0..J-1``, so ``J`` can reach the number of
    layers but not exceed it (IVLP, MaPLe and PromptSRC share this check). A ResNet image tower
    fails :func:`check_vision_prompts` first.
    """
    check_vision_prompts(clip)
    layers = min(clip.spec.text_layers, clip.spec.vision_layers)
    if not 1 <= depth <= layers:
        raise ValueError(
            f"prompt depth {depth} does not fit this CLIP: it has {clip.spec.text_layers} text "
            f"and {clip.spec.vision_layers} vision layers, so depth must be in 1..{layers} "
            "(depth 1 = input-level prompts only)"
        )


# --------------------------------------------------------------------------- the towers


@functools.lru_cache(maxsize=16)
def _modules(config_json: str, dtype: str):
    """Hugging Face Flax submodules for a config (stateless; parameters are passed to apply)."""
    transformers = _quiet_transformers()
    from transformers.models.clip import modeling_flax_clip as hf

    config = transformers.CLIPConfig.from_dict(json.loads(config_json))
    dt = jnp.dtype(dtype)
    tc, vc = config.text_config, config.vision_config
    return {
        "text_layer": hf.FlaxCLIPEncoderLayer(tc, dtype=dt),
        "vision_layer": hf.FlaxCLIPEncoderLayer(vc, dtype=dt),
        "vision_embed": hf.FlaxCLIPVisionEmbeddings(vc, dtype=dt),
        "text_ln": nn.LayerNorm(epsilon=tc.layer_norm_eps, dtype=dt),
        "vision_ln": nn.LayerNorm(epsilon=vc.layer_norm_eps, dtype=dt),
    }


def _run_layers(clip, kind, x, deep, deep_slice, remat):
    """Runs the encoder layers of one tower, replacing prompt positions before layers 1..J-1.

    Args:
      deep: None, or [J-1, n, D] / [J-1, N, n, D]: ``deep[i]`` replaces the positions of
        ``deep_slice`` on the residual stream entering layer ``i + 1``.
    """
    spec = clip.spec
    mods = _modules(spec.config_json, spec.dtype)
    layer = mods[f"{kind}_layer"]
    tower = clip.params[f"{kind}_model"]["encoder"]["layers"]
    n_layers = spec.text_layers if kind == "text" else spec.vision_layers

    def block(p, h):
        return layer.apply({"params": p}, h, None, deterministic=True)[0]

    if remat:
        # Recompute each block in the backward pass: memory grows with one layer's activations
        # instead of twelve, which is what lets C x B text sequences (CoCoOp, TPT) fit.
        block = jax.checkpoint(block)
    n_deep = 0 if deep is None else deep.shape[0]
    if n_deep >= n_layers:
        raise ValueError(f"prompt depth {n_deep + 1} exceeds the {n_layers} layers of the tower")
    for i in range(n_layers):
        if 1 <= i <= n_deep:
            d = deep[i - 1].astype(x.dtype)
            if d.ndim == 2:
                d = jnp.broadcast_to(d, (x.shape[0],) + d.shape)
            x = x.at[:, deep_slice].set(d)
        x = block(tower[str(i)], x)
    return x


def embed_tokens(clip: Clip, ids: Array) -> Array:
    """Frozen token embeddings (without positions) of token ids [..., L] -> [..., L, D]."""
    table = clip.params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    return jnp.take(table, ids, axis=0)


def encode_text(
    clip: Clip,
    embeds: Array,
    eot: Array,
    *,
    deep: Array | None = None,
    deep_start: int = 1,
    remat: bool = False,
) -> Array:
    """Prompt-aware text tower: token embeddings in, projected EOT features out.

    Args:
      clip: the frozen model.
      embeds: [N, L, D] input token embeddings (learned context already in place), without
        positional embedding; L <= context length.
      eot: [N] EOT positions.
      deep: optional deep prompts [J-1, n, D] (shared) or [J-1, N, n, D] (per sequence);
        ``deep[i]`` replaces positions ``deep_start .. deep_start + n - 1`` before layer i + 1.
      deep_start: first position deep prompts replace (1: right after the start token).
      remat: rematerialise each block in the backward pass to bound memory.

    Returns:
      [N, E] text features, float32, not normalised.
    """
    params = clip.params["text_model"]
    dt = jnp.dtype(clip.spec.dtype)
    length = embeds.shape[1]
    pos = params["embeddings"]["position_embedding"]["embedding"][:length]
    x = embeds.astype(dt) + pos.astype(dt)
    sl = slice(None) if deep is None else slice(deep_start, deep_start + deep.shape[-2])
    x = _run_layers(clip, "text", x, deep, sl, remat)
    # LayerNorm is per token, so normalising only the EOT rows equals normalising all of them.
    pooled = x[jnp.arange(x.shape[0]), eot]
    ln = _modules(clip.spec.config_json, clip.spec.dtype)["text_ln"]
    pooled = ln.apply({"params": params["final_layer_norm"]}, pooled)
    out = pooled @ clip.params["text_projection"]["kernel"]
    return out.astype(jnp.float32)


def encode_token_ids(clip: Clip, ids: Array, eot: Array, *, chunk: int | None = None) -> Array:
    """Text features of complete token sequences (no learned prompts) -> [N, E] float32.

    Args:
      ids: [N, L] token ids with start and end tokens (e.g. from :func:`tokenize`).
      eot: [N] EOT positions.
      chunk: if set, encode ``chunk`` sequences at a time with ``lax.map`` to bound memory
        (used for template ensembles over many classes).
    """
    if chunk is None or ids.shape[0] <= chunk:
        return encode_text(clip, embed_tokens(clip, ids), eot)
    n = ids.shape[0]
    pad = (-n) % chunk
    ids_p = jnp.pad(ids, ((0, pad), (0, 0)), constant_values=clip.spec.eot_id)
    eot_p = jnp.pad(eot, (0, pad))
    ids_c = ids_p.reshape(-1, chunk, ids.shape[1])
    eot_c = eot_p.reshape(-1, chunk)
    out = jax.lax.map(lambda a: encode_text(clip, embed_tokens(clip, a[0]), a[1]), (ids_c, eot_c))
    return out.reshape(-1, out.shape[-1])[:n]


def prompted_text_inputs(
    clip: Clip,
    task: Task,
    ctx: Array,
    *,
    position: str = "end",
) -> tuple[Array, Array]:
    """Builds ``[SOT] ctx <class tokens>`` embeddings for every class of a task.

    Args:
      clip: the frozen model.
      task: the class set.
      ctx: [n, D] shared or [C, n, D] class-specific context vectors (float32; cast inside).
      position: where the class name goes relative to the context, as in CoOp: ``"end"``
        (``[SOT] ctx name . EOT``), ``"middle"`` (``[SOT] ctx[:n//2] name ctx[n//2:] . EOT``)
        or ``"front"`` (``[SOT] name ctx . EOT``).

    Returns:
      ``(embeds, eot)``: [C, 1 + n + L, D] and [C] EOT positions (the same for every position).
    """
    n_cls = task.token_ids.shape[0]
    n = ctx.shape[-2]
    if ctx.ndim not in (2, 3):
        raise ValueError(f"ctx must be [n, D] or [C, n, D], got {tuple(ctx.shape)}")
    # The sequence with the class at the end is the prefix-shared split put back together
    # (one construction of both); the other positions reorder it below.
    prefix, suffix, eot = _prefix_and_suffix(clip, task, ctx)
    prefix = jnp.broadcast_to(prefix, (n_cls,) + prefix.shape[-2:])
    seq = jnp.concatenate([prefix, suffix], axis=1)  # [C, 1 + n + L, D], class at the end
    if position == "end":
        return seq, eot
    if position not in ("middle", "front"):
        raise ValueError(f"position must be 'end', 'middle' or 'front', got {position!r}")
    # Reorder per class with a gather: the name length differs between classes, so the context
    # lands at a different place in every row.
    p = jnp.arange(seq.shape[1])[None, :]
    nl = task.name_len[:, None]
    h = n // 2 if position == "middle" else 0
    src = jnp.where(
        p <= h,
        p,  # start token and the first half of the context stay
        jnp.where(
            p <= h + nl,
            n + 1 + (p - 1 - h),  # class-name tokens
            jnp.where(p <= nl + n, p - nl, p),  # rest of the context, then ". EOT pad"
        ),
    )
    return jnp.take_along_axis(seq, src[:, :, None], axis=1), eot


# --------------------------------------------------------------------------- prefix sharing


@functools.lru_cache(maxsize=16)
def _text_arch(config_json: str) -> tuple[int, Any]:
    """``(heads, activation)`` of a text tower, read from its Hugging Face config."""
    transformers = _quiet_transformers()
    from transformers.modeling_flax_utils import ACT2FN

    tc = transformers.CLIPConfig.from_dict(json.loads(config_json)).text_config
    # The activation Hugging Face's FlaxCLIPMLP uses (quick_gelu for OpenAI's CLIP), so the
    # explicit block below computes the same function as the black-box one.
    return tc.num_attention_heads, ACT2FN[tc.hidden_act]


def _dense(x: Array, p: PyTree, dt) -> Array:
    # nn.Dense(dtype=dt): operands promoted to the compute dtype, then x @ W + b.
    return x.astype(dt) @ p["kernel"].astype(dt) + p["bias"].astype(dt)


def _shared_block(clip: Clip, p: PyTree, xp: Array, xs: Array) -> tuple[Array, Array]:
    """One pre-LN CLIP text block on a shared prefix and per-class suffixes.

    Hugging Face's FlaxCLIPEncoderLayer written out from its parameter tree, so the suffix
    rows can attend to keys and values that were computed once for the prefix.

    Args:
      p: the layer's parameters (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``).
      xp: [P, D] residual stream of the prefix positions (the same for every class).
      xs: [C, S, D] residual stream of the suffix positions (after the prefix).

    Returns:
      The updated ``(xp, xs)``.
    """
    dt = jnp.dtype(clip.spec.dtype)
    heads, act = _text_arch(clip.spec.config_json)
    ln = _modules(clip.spec.config_json, clip.spec.dtype)["text_ln"]
    a = p["self_attn"]
    n_p, d = xp.shape
    n_c, n_s = xs.shape[:2]
    hd = d // heads

    def qkv(h):
        def proj(name):
            return _dense(h, a[name], dt).reshape(h.shape[:-1] + (heads, hd))

        # flax's dot_product_attention_weights divides the query by sqrt(head_dim) first.
        return proj("q_proj") / jnp.sqrt(hd).astype(dt), proj("k_proj"), proj("v_proj")

    qp, kp, vp = qkv(ln.apply({"params": p["layer_norm1"]}, xp))  # [P, H, hd]
    qs, ks, vs = qkv(ln.apply({"params": p["layer_norm1"]}, xs))  # [C, S, H, hd]
    low = jnp.finfo(dt).min
    # Prefix rows: causal attention within the prefix, once for all classes.
    causal_p = jnp.tril(jnp.ones((n_p, n_p), bool))
    sp = jnp.einsum("qhd,khd->hqk", qp, kp)
    wp = jax.nn.softmax(jnp.where(causal_p, sp, low), axis=-1).astype(dt)
    op = jnp.einsum("hqk,khd->qhd", wp, vp).reshape(n_p, d)
    # Suffix rows: every prefix position precedes them (no mask there), causal among
    # themselves. One softmax over [prefix keys ; suffix keys], as the full sequence has.
    causal_s = jnp.tril(jnp.ones((n_s, n_s), bool))
    s_ps = jnp.einsum("cqhd,khd->chqk", qs, kp)  # [C, H, S, P]
    s_ss = jnp.where(causal_s, jnp.einsum("cqhd,ckhd->chqk", qs, ks), low)  # [C, H, S, S]
    ws = jax.nn.softmax(jnp.concatenate([s_ps, s_ss], axis=-1), axis=-1).astype(dt)
    os_ = jnp.einsum("chqk,khd->cqhd", ws[..., :n_p], vp) + jnp.einsum(
        "chqk,ckhd->cqhd", ws[..., n_p:], vs
    )
    os_ = os_.reshape(n_c, n_s, d)

    def finish(x, o):
        x = x + _dense(o, a["out_proj"], dt)
        h = ln.apply({"params": p["layer_norm2"]}, x)
        h = _dense(act(_dense(h, p["mlp"]["fc1"], dt)), p["mlp"]["fc2"], dt)
        return x + h

    return finish(xp, op), finish(xs, os_)


def _remat_layers(block, tower, n_layers, xp, xs, deep, deep_start):
    """The shared tower's layers as a ``lax.scan`` of checkpointed blocks.

    A scan's backward is a loop that recomputes one block at a time. An unrolled loop of
    ``jax.checkpoint`` blocks leaves XLA free to schedule all the recomputations together
    (it does, on CPU), which keeps every layer's [C, S, 4D] activations alive at once and
    defeats the remat: at 1000 classes this is most of CoCoOp's and the Bayesian prompts'
    step memory. The price is one stacked copy of the tower's weights per step.
    """
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[tower[str(i)] for i in range(n_layers)])
    if deep is None:
        layers = (stacked,)
    else:
        # deep[i] goes in before layer i + 1: zero rows for layer 0 and the layers past the
        # prompt depth, with a flag saying which rows to write.
        n_deep = deep.shape[0]
        deep_all = jnp.zeros((n_layers,) + deep.shape[1:], xp.dtype)
        deep_all = deep_all.at[1 : 1 + n_deep].set(deep.astype(xp.dtype))
        idx = jnp.arange(n_layers)
        layers = (stacked, deep_all, (idx >= 1) & (idx <= n_deep))
    block = jax.checkpoint(block)

    def layer(carry, per_layer):
        xp, xs = carry
        if deep is not None:
            _, d, flag = per_layer
            xp = jnp.where(flag, xp.at[deep_start : deep_start + d.shape[0]].set(d), xp)
        return block(per_layer[0], xp, xs), None

    (xp, xs), _ = jax.lax.scan(layer, (xp, xs), layers)
    return xp, xs


def encode_text_shared(
    clip: Clip,
    prefix: Array,
    suffix: Array,
    eot: Array,
    *,
    deep: Array | None = None,
    deep_start: int = 1,
    remat: bool = False,
) -> Array:
    """:func:`encode_text` of ``concat(prefix, suffix)`` with the prefix computed once.

    The text tower is causal, so the first ``P`` positions of a sequence see only each other:
    when they are the same tokens for every class (start token and a shared context, or a
    template's words before the class name), their hidden states are the same at every layer.
    They run once; each class's suffix attends to the prefix's cached keys and values. The
    result equals ``encode_text(clip, concat(prefix, suffix), eot, ...)`` with about
    ``(P + S) / S`` times less work in the blocks.

    Args:
      clip: the frozen model.
      prefix: [P, D] input embeddings of the shared positions (no positional embedding), or
        [G, P, D] for G groups, each with its own suffixes.
      suffix: [C, S, D] per-class embeddings of positions ``P .. P + S - 1`` (class-name
        tokens, ".", EOT, padding), or [G, C, S, D] with a grouped prefix.
      eot: [C] (or [G, C]) EOT positions in full-sequence coordinates.
      deep: optional shared deep prompts [J-1, n, D]; ``deep[i]`` replaces positions
        ``deep_start .. deep_start + n - 1`` before layer ``i + 1``. They must lie inside the
        prefix (per-class deep prompts break the sharing: use :func:`encode_text`).
      deep_start: first position deep prompts replace.
      remat: rematerialise each block in the backward pass; the layers then run as a
        ``lax.scan``, so the backward holds one layer's activations at a time (what bounds
        CoCoOp's and the Bayesian prompts' step memory at many classes).

    Returns:
      [C, E] (or [G, C, E]) text features, float32, not normalised.
    """
    if prefix.ndim == 3:
        if suffix.ndim != 4 or eot.ndim != 2:
            raise ValueError(
                "a grouped prefix [G, P, D] needs suffixes [G, C, S, D] and eot [G, C], got "
                f"{tuple(suffix.shape)} and {tuple(eot.shape)}"
            )
        one = functools.partial(
            encode_text_shared, clip, deep=deep, deep_start=deep_start, remat=remat
        )
        return jax.vmap(one)(prefix, suffix, eot)
    if prefix.ndim != 2 or suffix.ndim != 3:
        raise ValueError(
            f"prefix must be [P, D] and suffix [C, S, D], got {tuple(prefix.shape)} and "
            f"{tuple(suffix.shape)}"
        )
    n_p, n_s = prefix.shape[0], suffix.shape[1]
    if n_p + n_s > clip.spec.context_length:
        raise ValueError(
            f"prefix ({n_p}) + suffix ({n_s}) tokens exceed CLIP's context "
            f"{clip.spec.context_length}"
        )
    n_deep = 0 if deep is None else deep.shape[0]
    if deep is not None:
        if deep.ndim != 3:
            raise ValueError(
                f"encode_text_shared takes shared deep prompts [J-1, n, D], got "
                f"{tuple(deep.shape)}: per-class deep prompts need encode_text"
            )
        if deep_start < 0 or deep_start + deep.shape[1] > n_p:
            raise ValueError(
                f"deep prompts at positions {deep_start}..{deep_start + deep.shape[1] - 1} do "
                f"not lie inside the {n_p}-token shared prefix"
            )
        if n_deep >= clip.spec.text_layers:
            raise ValueError(
                f"prompt depth {n_deep + 1} exceeds the {clip.spec.text_layers} layers of the tower"
            )
    params = clip.params["text_model"]
    dt = jnp.dtype(clip.spec.dtype)
    pos = params["embeddings"]["position_embedding"]["embedding"].astype(dt)
    # Positions are absolute: the suffix continues where the prefix ends.
    xp = prefix.astype(dt) + pos[:n_p]
    xs = suffix.astype(dt) + pos[n_p : n_p + n_s]
    n_layers = clip.spec.text_layers
    tower = params["encoder"]["layers"]
    block = functools.partial(_shared_block, clip)
    if not remat:
        for i in range(n_layers):
            if 1 <= i <= n_deep:
                xp = xp.at[deep_start : deep_start + deep.shape[1]].set(deep[i - 1].astype(dt))
            xp, xs = block(tower[str(i)], xp, xs)
    else:
        xp, xs = _remat_layers(block, tower, n_layers, xp, xs, deep, deep_start)
    # EOT normally lies in the suffix; a row whose EOT falls inside the prefix (an empty class
    # name after a template, say) reads the shared prefix row instead.
    rows = jnp.arange(xs.shape[0])
    in_suffix = (eot >= n_p)[:, None]
    pooled = jnp.where(
        in_suffix,
        xs[rows, jnp.clip(eot - n_p, 0, n_s - 1)],
        xp[jnp.clip(eot, 0, n_p - 1)],
    )
    ln = _modules(clip.spec.config_json, clip.spec.dtype)["text_ln"]
    pooled = ln.apply({"params": params["final_layer_norm"]}, pooled)
    out = pooled @ clip.params["text_projection"]["kernel"]
    return out.astype(jnp.float32)


def shared_text_inputs(clip: Clip, task: Task, ctx: Array) -> tuple[Array, Array, Array]:
    """The prefix/suffix split of :func:`prompted_text_inputs` for a shared context.

    Args:
      clip: the frozen model.
      task: the class set.
      ctx: [n, D] context shared by all classes (class name at the end).

    Returns:
      ``(prefix, suffix, eot)``: [1 + n, D] (start token and context), [C, L, D] (the task's
      class tokens) and [C] EOT positions in full-sequence coordinates, so that
      ``encode_text_shared(clip, prefix, suffix, eot)`` equals ``encode_text`` of
      ``prompted_text_inputs(clip, task, ctx)``.
    """
    if ctx.ndim != 2:
        raise ValueError(f"a shared prefix needs a [n, D] context, got {tuple(ctx.shape)}")
    return _prefix_and_suffix(clip, task, ctx)


def _prefix_and_suffix(clip: Clip, task: Task, ctx: Array) -> tuple[Array, Array, Array]:
    """``[SOT] ctx`` ([..., 1 + n, D]), class tokens ([C, L, D]) and EOT positions ([C]).

    ``ctx`` is [n, D] or [C, n, D]; the one place the prompted sequence's pieces are built.
    """
    n = ctx.shape[-2]
    check_context(clip, task, n)
    dt = jnp.dtype(clip.spec.dtype)
    sot = embed_tokens(clip, jnp.full((1,), clip.spec.sot_id, jnp.int32)).astype(dt)
    sot = jnp.broadcast_to(sot, ctx.shape[:-2] + sot.shape)
    prefix = jnp.concatenate([sot, ctx.astype(dt)], axis=-2)
    suffix = embed_tokens(clip, task.token_ids).astype(dt)
    return prefix, suffix, task.eot + 1 + n


def prompted_text_features(
    clip: Clip,
    task: Task,
    ctx: Array,
    *,
    position: str = "end",
    deep: Array | None = None,
    remat: bool = False,
    shared_prefix: bool = True,
) -> Array:
    """Text features of ``[SOT] ctx <class tokens>`` for every class, prefix-shared if possible.

    With a shared context ([n, D]), the class at the end and shared (or no) deep prompts, the
    start token and context are encoded once (:func:`encode_text_shared`); class-specific
    contexts ([C, n, D]), ``position="middle"`` / ``"front"``, per-class deep prompts or
    ``shared_prefix=False`` take the plain path (:func:`prompted_text_inputs` then
    :func:`encode_text`). Both give the same features.

    Args:
      clip: the frozen model.
      task: the class set.
      ctx: [n, D] shared or [C, n, D] class-specific context.
      position: where the class name goes, as in :func:`prompted_text_inputs`.
      deep: optional deep text prompts for positions ``1..n'`` (see :func:`encode_text`).
      remat: rematerialise each block in the backward pass.
      shared_prefix: allow the prefix-shared encoder (False: always the plain path, e.g. to
        compare the two).

    Returns:
      [C, E] float32 text features, not normalised.
    """
    if shared_prefix and ctx.ndim == 2 and position == "end" and (deep is None or deep.ndim == 3):
        prefix, suffix, eot = shared_text_inputs(clip, task, ctx)
        return encode_text_shared(clip, prefix, suffix, eot, deep=deep, remat=remat)
    embeds, eot = prompted_text_inputs(clip, task, ctx, position=position)
    return encode_text(clip, embeds, eot, deep=deep, remat=remat)


def encode_image(
    clip: Clip,
    images: Array,
    *,
    prompts: Array | None = None,
    deep: Array | None = None,
    remat: bool = False,
) -> Array:
    """Prompt-aware image tower: a ViT, or OpenAI's modified ResNet (:mod:`jaxprompt.resnet`,
    which takes no prompts).

    Args:
      clip: the frozen model.
      images: [B, H, W, 3] float32, NHWC, normalised with the CLIP mean and std.
      prompts: optional [n_v, Dv] or [B, n_v, Dv] tokens appended after CLS and patches (no
        positional embedding; they go through the pre-LayerNorm).
      deep: optional [J-1, n_v, Dv] or [J-1, B, n_v, Dv]; ``deep[i]`` replaces the last n_v
        tokens before layer i + 1. Requires ``prompts``.
      remat: rematerialise each block in the backward pass.

    Returns:
      [B, E] image features, float32, not normalised.
    """
    if deep is not None and prompts is None:
        raise ValueError("deep vision prompts need input-level prompts (the tokens they replace)")
    size = clip.spec.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images must be NHWC [B, {size}, {size}, 3] normalised with the CLIP mean/std, got "
            f"shape {tuple(images.shape)} (NCHW? use images.transpose(0, 2, 3, 1))"
        )
    params = clip.params["vision_model"]
    dt = jnp.dtype(clip.spec.dtype)
    if clip.spec.image_tower == "resnet":
        if prompts is not None:
            check_vision_prompts(clip)
        out = resnet.encode(
            params,
            images.astype(dt),
            layers=clip.spec.resnet_layers,
            heads=clip.spec.resnet_heads,
            remat=remat,
        )
        return out.astype(jnp.float32)
    mods = _modules(clip.spec.config_json, clip.spec.dtype)
    x = mods["vision_embed"].apply({"params": params["embeddings"]}, images.astype(dt))
    if prompts is not None:
        pr = prompts.astype(dt)
        if pr.ndim == 2:
            pr = jnp.broadcast_to(pr, (x.shape[0],) + pr.shape)
        x = jnp.concatenate([x, pr], axis=1)
    x = mods["vision_ln"].apply({"params": params["pre_layrnorm"]}, x)
    sl = slice(None) if deep is None else slice(x.shape[1] - deep.shape[-2], None)
    x = _run_layers(clip, "vision", x, deep, sl, remat)
    pooled = mods["vision_ln"].apply({"params": params["post_layernorm"]}, x[:, 0])
    out = pooled @ clip.params["visual_projection"]["kernel"]
    return out.astype(jnp.float32)


def normalize(x: Array, axis: int = -1) -> Array:
    """L2-normalises along ``axis`` (float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def logit_scale(clip: Clip) -> Array:
    """CLIP's frozen logit scale ``exp(logit_scale)`` (100 for the OpenAI checkpoints)."""
    return jnp.exp(jax.lax.stop_gradient(clip.params["logit_scale"]).astype(jnp.float32))


logging.getLogger("absl").setLevel(logging.WARNING)
