"""The frozen CLIP's types: :class:`Clip`, :class:`ClipSpec`, :class:`Task`, the load errors, and
the CLIP configuration (Hugging Face's ``config.json`` layout, read without transformers)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
PyTree = Any


class ClipLoadError(RuntimeError):
    """CLIP weights or tokenizer could not be loaded; the message says what to do."""


class CheckpointLoadError(ClipLoadError, ValueError):
    """A checkpoint file could not be used (unreadable, refused, truncated, not a CLIP)."""


# Hugging Face's CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (the values a config.json
# may leave out; transformers writes them all with use_diff=False). Entries that do not change
# what the towers compute (initialiser ranges, dropout, ...) are kept as given, not added.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
CLIP_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}


def full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A CLIP ``config.json`` (a mapping, as Hugging Face writes it) with every architecture entry
    filled in by Hugging Face's defaults, as a plain JSON-able dict."""
    out = {**CLIP_DEFAULTS, **json.loads(json.dumps(dict(config)))}
    out["model_type"] = out.get("model_type", "clip")
    out["text_config"] = {**TEXT_DEFAULTS, **(out.get("text_config") or {})}
    out["vision_config"] = {**VISION_DEFAULTS, **(out.get("vision_config") or {})}
    return out


def _block_shapes(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out[f"{prefix}self_attn/{proj}/kernel"] = (width, width)
        out[f"{prefix}self_attn/{proj}/bias"] = (width,)
    for norm in ("layer_norm1", "layer_norm2"):
        out[f"{prefix}{norm}/scale"] = (width,)
        out[f"{prefix}{norm}/bias"] = (width,)
    out[f"{prefix}mlp/fc1/kernel"] = (width, mlp)
    out[f"{prefix}mlp/fc1/bias"] = (mlp,)
    out[f"{prefix}mlp/fc2/kernel"] = (mlp, width)
    out[f"{prefix}mlp/fc2/bias"] = (width,)
    return out


def param_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter of a ViT CLIP in Hugging Face's Flax layout (``"/"``-joined names) -> its
    shape, from the config alone: what a checkpoint must hold to load (see
    :func:`jaxprompt.hf_checkpoint.to_flax`)."""
    c = full_config(config)
    tc, vc = c["text_config"], c["vision_config"]
    dt, dv, embed = int(tc["hidden_size"]), int(vc["hidden_size"]), int(c["projection_dim"])
    patch, channels = int(vc["patch_size"]), int(vc["num_channels"])
    grid = int(vc["image_size"]) // patch
    ln = lambda p, d: {f"{p}/scale": (d,), f"{p}/bias": (d,)}  # noqa: E731
    out: dict[str, tuple[int, ...]] = {
        "text_model/embeddings/token_embedding/embedding": (int(tc["vocab_size"]), dt),
        "text_model/embeddings/position_embedding/embedding": (
            int(tc["max_position_embeddings"]),
            dt,
        ),
        **ln("text_model/final_layer_norm", dt),
        "text_projection/kernel": (dt, embed),
        "vision_model/embeddings/class_embedding": (dv,),
        "vision_model/embeddings/patch_embedding/kernel": (patch, patch, channels, dv),
        "vision_model/embeddings/position_embedding/embedding": (grid * grid + 1, dv),
        **ln("vision_model/pre_layrnorm", dv),
        **ln("vision_model/post_layernorm", dv),
        "visual_projection/kernel": (dv, embed),
        "logit_scale": (),
    }
    for tower, d, cfg in (("text_model", dt, tc), ("vision_model", dv, vc)):
        for i in range(int(cfg["num_hidden_layers"])):
            out.update(
                _block_shapes(f"{tower}/encoder/layers/{i}/", d, int(cfg["intermediate_size"]))
            )
    return out


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Static description of a CLIP backbone (hashable: it is a jit-static field of `Clip`)."""

    name: str
    # The CLIP config as JSON (Hugging Face's config.json layout, defaults filled in): what the
    # backbone fingerprint is computed from.
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
    # What the transformer blocks compute, beyond the widths above.
    text_heads: int = 8
    text_act: str = "quick_gelu"
    text_eps: float = 1e-5
    vision_heads: int = 12
    vision_act: str = "quick_gelu"
    vision_eps: float = 1e-5


def spec_from_config(
    config: Mapping[str, Any], *, name: str, dtype: str, sot_id: int, eot_id: int
) -> ClipSpec:
    """The :class:`ClipSpec` of a CLIP config (see :func:`full_config`)."""
    c = full_config(config)
    tc, vc = c["text_config"], c["vision_config"]
    resnet: dict[str, Any] = {}
    if vc.get("resnet_layers"):
        resnet = {
            "image_tower": "resnet",
            "resnet_layers": tuple(int(n) for n in vc["resnet_layers"]),
            "resnet_heads": int(vc["num_attention_heads"]),
        }
    return ClipSpec(
        name=name,
        config_json=json.dumps(c, sort_keys=True),
        dtype=dtype,
        text_width=int(tc["hidden_size"]),
        text_layers=int(tc["num_hidden_layers"]),
        context_length=int(tc["max_position_embeddings"]),
        vision_width=int(vc["hidden_size"]),
        vision_layers=int(vc["num_hidden_layers"]),
        image_size=int(vc["image_size"]),
        patch_size=int(vc["patch_size"]),
        embed_dim=int(c["projection_dim"]),
        sot_id=int(sot_id),
        eot_id=int(eot_id),
        text_heads=int(tc["num_attention_heads"]),
        text_act=str(tc["hidden_act"]),
        text_eps=float(tc["layer_norm_eps"]),
        vision_heads=int(vc["num_attention_heads"]),
        vision_act=str(vc["hidden_act"]),
        vision_eps=float(vc["layer_norm_eps"]),
        **resnet,
    )


@struct.dataclass
class Clip:
    """A frozen CLIP: parameters in Hugging Face's Flax CLIP layout, a static spec, the tokenizer.

    A pytree whose only leaves are ``params``, so it is passed to jitted functions as an
    argument (and can be sharded), never captured as a closure constant. The parameters are
    run by :mod:`jaxprompt.clip`'s own tower functions.

    ``weights_id`` is the content fingerprint of the parameters and the tokenizer's vocabulary
    (:func:`weights_id`), set by :func:`jaxprompt.clip.from_params` (every loader ends there):
    static, so code traced under ``jit`` (a method's cached teacher,
    :func:`jaxprompt.methods.selfreg.cache_teacher`) can tell which weights it is given.
    ``clip.replace(params=...)`` (or ``tokenizer=``) computes it again for the new weights
    (None when they are traced, inside ``jit``); a Clip built by hand has None (nothing is
    cached for it). Tree maps keep it, which is right for what they are used for on a frozen
    model (``device_put``, sharding); a tree map that changes the values must go through
    ``replace``.
    """

    params: PyTree
    spec: ClipSpec = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False)
    weights_id: str | None = struct.field(pytree_node=False, default=None)


def _replace_clip(self: Clip, **updates: Any) -> Clip:
    """``dataclasses.replace`` that keeps ``weights_id`` true when the weights or the tokenizer
    change without a new one: the new weights' fingerprint when they are concrete arrays,
    None when they are traced (inside ``jit``, where they cannot be read)."""
    if ("params" in updates or "tokenizer" in updates) and "weights_id" not in updates:
        params = updates.get("params", self.params)
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params))
        tokenizer = updates.get("tokenizer", self.tokenizer)
        updates["weights_id"] = None if traced else weights_id(params, tokenizer)
    return dataclasses.replace(self, **updates)


Clip.replace = _replace_clip  # flax.struct's replace is plain dataclasses.replace


def weights_id(params: PyTree, tokenizer: Any = None) -> str:
    """Content fingerprint of CLIP ``params`` (and ``tokenizer``'s vocabulary): 16 hex digits.

    What a cache of anything computed from the frozen model is keyed on (PromptSRC's and
    KgCoOp's teacher features, :func:`jaxprompt.methods.selfreg.cache_teacher`): the same for
    the same weights loaded twice, so a cache (and jit's compilation cache, which the static
    field is part of) survives a reload; different for any change of a parameter's bits,
    shape, dtype or name, or of the vocabulary. SHA-1 over every parameter's bytes, once per
    loaded model (:func:`jaxprompt.clip.from_params` hashes the host arrays it is given, before
    they go to the device): about 0.8 s/GB on one core here, so 0.5 s for ViT-B/16 in float32
    and 1.4 s for ViT-L/14, beside the seconds reading and converting those bytes takes
    anyway. A cheaper key that is still right is not at hand: a random token per load would
    miss every reload (and recompile), a sample of the weights would miss a fine-tune that
    moves only some of them, and a digest on the device compiles one program per leaf shape
    (seconds on a CPU, for every process). SHA-1 is used as a checksum, not against forgery.

    Args:
      params: the parameter tree (arrays, not traced; device arrays are copied to the host).
      tokenizer: the CLIP's tokenizer (its ``get_vocab()`` is hashed), or None.
    """
    import hashlib

    import numpy as np

    h = hashlib.sha1(usedforsecurity=False)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.name}|{a.shape}\n".encode())
        h.update(a.reshape(-1).view(np.uint8))
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
        h.update(vocab.encode())
    return h.hexdigest()[:16]


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


def normalize(x: Array, axis: int = -1) -> Array:
    """L2-normalises along ``axis`` (float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def logit_scale(clip: Clip) -> Array:
    """CLIP's frozen logit scale ``exp(logit_scale)`` (100 for the OpenAI checkpoints)."""
    return jnp.exp(jax.lax.stop_gradient(clip.params["logit_scale"]).astype(jnp.float32))
