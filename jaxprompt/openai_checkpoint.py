"""OpenAI-format CLIP checkpoints (``ViT-B-16.pt`` and friends), read without running their code.

OpenAI released its CLIP weights as TorchScript archives; users also keep them as plain state
dicts saved with ``torch.save``. Both are zip files holding a pickle (``<root>/data.pkl``) whose
tensors point at raw storages (``<root>/data/<key>``). Unpickling such a file with the standard
machinery can run arbitrary code, so this module reads it with a restricted unpickler: the only
callables it resolves are its own NumPy versions of torch's tensor-rebuild functions, the storage
types (which only name a dtype), ``OrderedDict`` and TorchScript's type-tag helpers; a TorchScript
module class (``__torch__.*``) becomes an inert record of its attributes. Anything else (say
``os.system``) is refused before it is called. torch is not needed.

:func:`read_state_dict` returns the tensors under OpenAI's names; :func:`convert` turns a CLIP
into a Hugging Face CLIP ``config.json`` mapping and a parameter tree, inferring the sizes from
the tensor shapes (heads are ``width // 64``, as in every OpenAI model): a ViT goes entirely to
Hugging Face's Flax CLIP layout (:func:`convert_vit`); a modified ResNet (RN50, RN101, ...)
keeps the text tower in that layout and its image tower in :mod:`jaxprompt.resnet`'s
(:func:`convert_resnet`).
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "convert",
    "convert_resnet",
    "convert_vit",
    "is_resnet",
    "read_state_dict",
]


class CheckpointError(ValueError):
    """The file is not a readable OpenAI CLIP checkpoint; the message is one line."""


def _dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {
        "FloatStorage": np.float32,
        "DoubleStorage": np.float64,
        "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }


class _StorageType:
    """What a ``torch.<X>Storage`` global resolves to: just the dtype."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _ScriptObject:
    """A TorchScript module (``__torch__.*`` class): an inert record of its pickled state."""

    def __init__(self, *args, **kwargs):
        self.state: Any = None

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
    size, stride = tuple(size), tuple(stride)
    count = 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else 0
    if offset < 0 or offset + count > storage.size:
        raise CheckpointError("a tensor points outside its storage")
    if count == 0:
        return np.zeros(size, storage.dtype)
    base = storage[offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, *unused):
    return data


def _identity(value, *unused):
    return value


_TORCH_JIT = {
    "restore_type_tag": _identity,
    "build_intlist": list,
    "build_doublelist": list,
    "build_boollist": list,
    "build_tensorlist": list,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}
        self._dtypes = _dtypes()

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in (
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        ):
            return _rebuild_parameter
        if module == "torch" and name in self._dtypes:
            return _StorageType(self._dtypes[name])
        if module == "torch.jit._pickle" and name in _TORCH_JIT:
            return _TORCH_JIT[name]
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})
        raise CheckpointError(
            f"refused to load {module}.{name}: the checkpoint asks to run code that a CLIP "
            "checkpoint never needs (is the file tampered with?)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent id {str(pid)[:60]} in the checkpoint")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type {storage_type!r} in the checkpoint")
        if key not in self._storages:
            if not re.fullmatch(r"[0-9A-Za-z_]+", key):
                raise CheckpointError(f"bad storage key {key[:40]!r} in the checkpoint")
            try:
                raw = self._archive.read(f"{self._root}data/{key}")
            except KeyError:
                raise CheckpointError(f"the checkpoint lacks storage data/{key}") from None
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            arr = np.frombuffer(raw, dtype=dtype)
            self._storages[key] = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        return self._storages[key]


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], depth: int = 0) -> None:
    if depth > 64:
        raise CheckpointError("the checkpoint nests modules more than 64 deep (or in a cycle)")
    if isinstance(obj, _ScriptObject):
        obj = obj.state
    if isinstance(obj, np.ndarray):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                _flatten(v, f"{prefix}{k}.", out, depth + 1)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads the tensors of a ``torch.save`` state dict or a TorchScript archive, without torch.

    Returns:
      OpenAI's parameter names (``"visual.conv1.weight"``, ...) -> NumPy arrays.

    Raises:
      CheckpointError: a one-line message (not a zip checkpoint, refused code, missing data).
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch zip checkpoint (a TorchScript archive or a state dict "
            "saved by torch.save with torch>=1.6)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            pickles = [n for n in pickles if n.count("/") <= 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} holds no single data.pkl: not a PyTorch checkpoint")
            root = pickles[0][: -len("data.pkl")]
            names = set(archive.namelist())
            byteorder = "little"
            if f"{root}byteorder" in names:
                byteorder = archive.read(f"{root}byteorder").decode().strip() or "little"
            with archive.open(pickles[0]) as f:
                obj = _RestrictedUnpickler(f, archive, root, byteorder).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt archive or pickle: one line
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).strip()[:120]})"
        ) from None
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    if (
        isinstance(obj, dict)
        and "state_dict" in obj
        and not any(k.startswith("visual.") for k in out)
    ):
        out = {}
        _flatten(obj["state_dict"], "", out)
    # Some saves prefix every name (e.g. "module." from DataParallel).
    if not any(k.startswith("visual.") for k in out):
        for prefix in ("module.", "model."):
            if any(k.startswith(prefix + "visual.") for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"{path} holds no tensors: not a CLIP checkpoint")
    return out


def _layers(sd: dict[str, np.ndarray], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _block(sd: dict[str, np.ndarray], p: str) -> dict[str, Any]:
    w, b = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
    width = w.shape[1]
    attn = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(i * width, (i + 1) * width)
        attn[name] = {"kernel": w[rows].T, "bias": b[rows]}
    attn["out_proj"] = _dense(sd, p + "attn.out_proj")

    return {
        "self_attn": attn,
        "layer_norm1": _norm(sd, p + "ln_1"),
        "mlp": {"fc1": _dense(sd, p + "mlp.c_fc"), "fc2": _dense(sd, p + "mlp.c_proj")},
        "layer_norm2": _norm(sd, p + "ln_2"),
    }


def _dense(sd, p):
    return {"kernel": sd[p + ".weight"].T, "bias": sd[p + ".bias"]}


def _norm(sd, p):
    return {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}


def _text_tower(sd: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The text tower (common to OpenAI's ViT and ResNet CLIPs): HF ``text_config``, the
    ``text_model`` parameters and the joint embedding width."""
    vocab, text_width = sd["token_embedding.weight"].shape
    context = sd["positional_embedding"].shape[0]
    text_layers = _layers(sd, "transformer.resblocks.")
    embed_dim = int(sd["text_projection"].shape[1])
    if text_width % 64:
        raise CheckpointError(
            f"text width {text_width} is not a multiple of 64: OpenAI's head count "
            "(width // 64) cannot be inferred"
        )
    config = {
        "vocab_size": int(vocab),
        "hidden_size": int(text_width),
        "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": text_layers,
        "num_attention_heads": int(text_width) // 64,
        "max_position_embeddings": int(context),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": embed_dim,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    params = {
        "embeddings": {
            "token_embedding": {"embedding": sd["token_embedding.weight"]},
            "position_embedding": {"embedding": sd["positional_embedding"]},
        },
        "encoder": {
            "layers": {
                str(i): _block(sd, f"transformer.resblocks.{i}.") for i in range(text_layers)
            }
        },
        "final_layer_norm": _norm(sd, "ln_final"),
    }
    return config, params, embed_dim


def is_resnet(sd: dict[str, np.ndarray]) -> bool:
    """Whether an OpenAI state dict has a modified-ResNet image tower (RN50, RN101, ...)."""
    return any(k.startswith("visual.layer1.") for k in sd)


def convert(sd: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts an OpenAI CLIP state dict, ViT (:func:`convert_vit`) or ResNet
    (:func:`convert_resnet`)."""
    return convert_resnet(sd) if is_resnet(sd) else convert_vit(sd)


def _check_clip(sd: dict[str, np.ndarray], image_key: str) -> dict[str, np.ndarray]:
    if image_key not in sd or "token_embedding.weight" not in sd:
        raise CheckpointError(
            f"not an OpenAI CLIP checkpoint: it lacks {image_key} / token_embedding.weight"
        )
    # num_batches_tracked (int64) and any other integer or boolean buffer are not weights.
    # (bfloat16 is not an np.floating subtype, so the test is on what is dropped.)
    return {
        k: np.asarray(v, np.float32)
        for k, v in sd.items()
        if not (np.issubdtype(np.asarray(v).dtype, np.integer) or np.asarray(v).dtype == bool)
    }


def convert_vit(sd: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts an OpenAI ViT CLIP state dict to Hugging Face's layout.

    Returns:
      ``(config_kwargs, params)``: the CLIP ``config.json`` entries (with ``text_config`` /
      ``vision_config`` dicts) and the parameter tree in Hugging Face's Flax CLIP layout
      (float32).

    Raises:
      CheckpointError: a ResNet image tower (use :func:`convert_resnet`) or missing tensors.
    """
    if is_resnet(sd):
        raise CheckpointError("a ResNet CLIP checkpoint: convert it with convert_resnet")
    sd = _check_clip(sd, "visual.conv1.weight")
    try:
        text_config, text, embed_dim = _text_tower(sd)
        vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_layers = _layers(sd, "visual.transformer.resblocks.")
        vision_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        config = {
            "projection_dim": int(embed_dim),
            "logit_scale_init_value": float(sd["logit_scale"]),
            "text_config": text_config,
            "vision_config": {
                "hidden_size": int(vision_width),
                "intermediate_size": int(vision_mlp),
                "num_hidden_layers": vision_layers,
                "num_attention_heads": int(vision_width) // 64,
                "image_size": int(grid * patch),
                "patch_size": int(patch),
                "num_channels": 3,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": int(embed_dim),
            },
        }
        vision = {
            "embeddings": {
                "class_embedding": sd["visual.class_embedding"],
                "patch_embedding": {"kernel": sd["visual.conv1.weight"].transpose(2, 3, 1, 0)},
                "position_embedding": {"embedding": sd["visual.positional_embedding"]},
            },
            "pre_layrnorm": _norm(sd, "visual.ln_pre"),
            "encoder": {
                "layers": {
                    str(i): _block(sd, f"visual.transformer.resblocks.{i}.")
                    for i in range(vision_layers)
                }
            },
            "post_layernorm": _norm(sd, "visual.ln_post"),
        }
        params = {
            "text_model": text,
            "vision_model": vision,
            "text_projection": {"kernel": sd["text_projection"]},
            "visual_projection": {"kernel": sd["visual.proj"]},
            "logit_scale": sd["logit_scale"].reshape(()),
        }
    except KeyError as e:
        raise CheckpointError(f"the OpenAI CLIP checkpoint lacks tensor {e.args[0]}") from None
    if vision_width % 64:
        raise CheckpointError(
            f"vision width {vision_width} is not a multiple of 64: OpenAI's head count "
            "(width // 64) cannot be inferred"
        )
    return config, params


def _conv_kernel(sd, name):
    return sd[name].transpose(2, 3, 1, 0)  # PyTorch OIHW -> HWIO


def _batchnorm(sd, p):
    from jaxprompt import resnet

    return resnet.fold_batchnorm(
        sd[p + ".weight"], sd[p + ".bias"], sd[p + ".running_mean"], sd[p + ".running_var"]
    )


def _bottleneck(sd, p):
    block = {}
    for i in (1, 2, 3):
        block[f"conv{i}"] = {"kernel": _conv_kernel(sd, f"{p}conv{i}.weight")}
        block[f"bn{i}"] = _batchnorm(sd, f"{p}bn{i}")
    # OpenAI's shortcut is Sequential(AvgPool2d, Conv2d 1x1, BatchNorm2d): indices -1, 0, 1.
    if p + "downsample.0.weight" in sd:
        block["downsample"] = {
            "conv": {"kernel": _conv_kernel(sd, p + "downsample.0.weight")},
            "bn": _batchnorm(sd, p + "downsample.1"),
        }
    return block


def convert_resnet(sd: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts an OpenAI ResNet CLIP state dict (RN50, RN101, RN50x4, ...).

    The text tower goes to Hugging Face's layout as for a ViT; the image tower goes to
    :mod:`jaxprompt.resnet`'s layout (HWIO kernels, BatchNorm folded into scale and bias with the
    running statistics). ``vision_config`` describes the ResNet: ``resnet_layers`` (blocks per
    stage), ``resnet_width`` (stem width), ``hidden_size`` (channels into the attention pool,
    ``32 * width``), ``num_attention_heads`` (``32 * width // 64``, OpenAI's rule), ``image_size``
    and ``patch_size`` 32 (the tower's total downsampling).

    Returns:
      ``(config_kwargs, params)`` as :func:`convert_vit`; ``params["vision_model"]`` is the
      ResNet tree and there is no ``visual_projection`` (the pool's ``c_proj`` projects).

    Raises:
      CheckpointError: missing tensors, or shapes that do not form a modified ResNet.
    """
    sd = _check_clip(sd, "visual.layer1.0.conv1.weight")
    try:
        text_config, text, embed_dim = _text_tower(sd)
        layers = [_layers(sd, f"visual.layer{s}.") for s in (1, 2, 3, 4)]
        width = int(sd["visual.layer1.0.conv1.weight"].shape[0])
        pos = sd["visual.attnpool.positional_embedding"]
        grid = round((pos.shape[0] - 1) ** 0.5)
        channels = int(pos.shape[1])
        if grid * grid + 1 != pos.shape[0] or channels != 32 * width or 0 in layers:
            raise CheckpointError(
                "the ResNet checkpoint's shapes do not form OpenAI's modified ResNet (stages "
                f"{layers}, width {width}, attention-pool positions {pos.shape[0]})"
            )
        if channels % 64:
            raise CheckpointError(
                f"attention-pool width {channels} is not a multiple of 64: OpenAI's head count "
                "(width // 64) cannot be inferred"
            )
        stem = {}
        for i in (1, 2, 3):
            stem[f"conv{i}"] = {"kernel": _conv_kernel(sd, f"visual.conv{i}.weight")}
            stem[f"bn{i}"] = _batchnorm(sd, f"visual.bn{i}")
        vision: dict[str, Any] = {"stem": stem}
        for s, n in enumerate(layers, start=1):
            vision[f"layer{s}"] = {
                str(j): _bottleneck(sd, f"visual.layer{s}.{j}.") for j in range(n)
            }
        vision["attnpool"] = {"positional_embedding": pos}
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            vision["attnpool"][name] = _dense(sd, f"visual.attnpool.{name}")
        config = {
            "projection_dim": int(embed_dim),
            "logit_scale_init_value": float(sd["logit_scale"]),
            "text_config": text_config,
            "vision_config": {
                "hidden_size": channels,
                "num_hidden_layers": sum(layers),
                "num_attention_heads": channels // 64,
                "image_size": int(grid * 32),
                "patch_size": 32,
                "num_channels": 3,
                "projection_dim": int(embed_dim),
                "resnet_layers": layers,
                "resnet_width": width,
            },
        }
        params = {
            "text_model": text,
            "vision_model": vision,
            "text_projection": {"kernel": sd["text_projection"]},
            "logit_scale": sd["logit_scale"].reshape(()),
        }
    except KeyError as e:
        raise CheckpointError(f"the OpenAI CLIP checkpoint lacks tensor {e.args[0]}") from None
    return config, params
