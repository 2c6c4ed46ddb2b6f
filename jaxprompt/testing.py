"""Small random CLIPs in Hugging Face format, for tests, benchmarks and the toy world.

Real CLIP checkpoints come from the hub or a local directory (:func:`jaxprompt.load_clip`).
No machine of this project reaches the hub, so tests and benchmarks save a randomly initialised
CLIP with a word-level tokenizer to a directory and load it through the same ``load_clip`` path
as a downloaded checkpoint; the toy world's CLIP (:mod:`jaxprompt.side.toyclip`) starts from one.

    from jaxprompt import testing
    path = testing.save_random_clip(tmp_dir, words=["cat", "dog"])   # preset "tiny"
    clip = jaxprompt.load_clip(path)

Transformers is reached through :mod:`jaxprompt.clip` (the one module that imports it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxprompt.clip.tokens import quiet_transformers as _quiet_transformers

__all__ = [
    "PRESETS",
    "RESNET_PRESETS",
    "clip_config",
    "openai_resnet_tensors",
    "openai_text_tensors",
    "random_clip_params",
    "random_openai_resnet",
    "save_clip_weights",
    "save_random_clip",
    "save_torchscript",
    "save_word_tokenizer",
]


_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,-'?!/&()"


def save_word_tokenizer(directory: str | os.PathLike, words: Sequence[str]) -> int:
    """Writes a small word-level tokenizer in Hugging Face format, for small CLIPs.

    Real CLIP checkpoints bring their own BPE tokenizer; this one serves tiny test models and the
    toy world's CLIP. It lowercases, splits on spaces and punctuation, and maps each given word to
    one token (greedy WordPiece): any other word falls back to single characters, so every ASCII
    text tokenizes. ``<|startoftext|>`` and ``<|endoftext|>`` wrap each text and the end token
    has the largest id, as in CLIP.

    Args:
      directory: where to write the tokenizer files.
      words: words or phrases (split on spaces and punctuation) to make whole tokens.

    Returns:
      The vocabulary size, to use as the model's ``vocab_size``.
    """
    transformers = _quiet_transformers()
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    for tok in ["<unk>", *_ALPHABET, *("##" + c for c in _ALPHABET)]:
        vocab.setdefault(tok, len(vocab))
    for w in words:
        for piece in re.findall(r"[a-z0-9]+", w.lower()):
            vocab.setdefault(piece, len(vocab))
    sot, eot = "<|startoftext|>", "<|endoftext|>"
    vocab[sot] = len(vocab)
    vocab[eot] = len(vocab)
    tok = tokenizers.Tokenizer(
        models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64)
    )
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, vocab[sot]), (eot, vocab[eot])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sot,
        eos_token=eot,
        pad_token=eot,
        unk_token="<unk>",
        model_max_length=77,
    )
    fast.save_pretrained(os.fspath(directory))
    return len(vocab)


PRESETS: dict[str, dict[str, int]] = {
    # A 2-layer model that compiles and runs in well under a second (tests).
    "tiny": dict(
        text_width=32,
        text_layers=2,
        text_heads=4,
        vision_width=32,
        vision_layers=2,
        vision_heads=4,
        image_size=32,
        patch_size=8,
        embed_dim=16,
    ),
    # The toy world's CLIP (jaxprompt.side.toyclip): small enough to pretrain on 2 CPU cores.
    "toy": dict(
        text_width=128,
        text_layers=4,
        text_heads=4,
        vision_width=128,
        vision_layers=4,
        vision_heads=4,
        image_size=32,
        patch_size=8,
        embed_dim=128,
    ),
    # ViT-B/16 shapes (benchmarks with random weights).
    "vit-b/16": dict(
        text_width=512,
        text_layers=12,
        text_heads=8,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        image_size=224,
        patch_size=16,
        embed_dim=512,
    ),
}


def clip_config(vocab_size: int, *, preset: str = "tiny", **overrides: int) -> dict[str, Any]:
    """A CLIP ``config.json`` (Hugging Face's layout, as a plain dict) of a preset's shapes:
    QuickGELU, logit scale 100.

    ``transformers.CLIPConfig(**config)`` and ``CLIPModel.from_pretrained`` of a directory
    holding it accept it. The tokenizer's start and end ids are the last two of the
    vocabulary, as :func:`save_word_tokenizer` writes them.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    shape = {**PRESETS[preset], **overrides}
    unknown = sorted(set(shape) - set(PRESETS[preset]))
    if unknown:
        raise ValueError(
            f"unknown preset field(s) {unknown}; choose from {sorted(PRESETS['tiny'])}"
        )
    # Initialiser entries are written out because transformers' PyTorch CLIP reads them.
    init = {"attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}
    text = {
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": shape["text_width"],
        "intermediate_size": 4 * shape["text_width"],
        "num_hidden_layers": shape["text_layers"],
        "num_attention_heads": shape["text_heads"],
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        "projection_dim": shape["embed_dim"],
        **init,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": shape["vision_width"],
        "intermediate_size": 4 * shape["vision_width"],
        "num_hidden_layers": shape["vision_layers"],
        "num_attention_heads": shape["vision_heads"],
        "num_channels": 3,
        "image_size": shape["image_size"],
        "patch_size": shape["patch_size"],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": shape["embed_dim"],
        **init,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": shape["embed_dim"],
        "logit_scale_init_value": float(np.log(100.0)),
        "initializer_factor": 1.0,
        "text_config": text,
        "vision_config": vision,
    }


def random_clip_params(
    config: dict[str, Any], *, seed: int = 0, init: str = "flax"
) -> dict[str, Any]:
    """Random CLIP parameters in Hugging Face's Flax layout (float32 NumPy), of every shape
    :func:`jaxprompt.clip.model.param_shapes` lists for ``config``.

    Biases are 0, LayerNorms scale 1 and bias 0, the logit scale ``log(100)``. The other scales
    follow one of Hugging Face's two CLIP initialisations (the tests were tuned on each, for
    the formats that transformers' Flax and PyTorch classes used to write):

    * ``init="flax"``: token, position and patch embeddings and every attention and MLP kernel
      0.01, the class token and both projections 0.02;
    * ``init="pytorch"``: embeddings 0.02, the class token ``width**-0.5``, attention and MLP
      inputs to the residual stream ``width**-0.5 * (2 * layers)**-0.5``, attention outputs
      ``width**-0.5``, the first MLP layer ``(2 * width)**-0.5``, projections ``width**-0.5``
      (features about ten times larger).
    """
    from jaxprompt import hf_checkpoint
    from jaxprompt.clip.model import full_config, param_shapes

    if init not in ("flax", "pytorch"):
        raise ValueError(f"init must be 'flax' or 'pytorch', got {init!r}")
    c = full_config(config)
    rng = np.random.default_rng(seed)
    flat: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(c).items():
        tower = c["text_config"] if name.startswith("text") else c["vision_config"]
        width = int(tower["hidden_size"])
        residual = width**-0.5 * (2 * int(tower["num_hidden_layers"])) ** -0.5
        leaf = name.rsplit("/", 1)[-1]
        if name == "logit_scale":
            value = np.asarray(np.log(100.0))
        elif leaf == "scale":
            value = np.ones(shape)
        elif leaf == "bias":
            value = np.zeros(shape)
        elif init == "flax":
            big = name.endswith(("class_embedding", "projection/kernel"))
            value = rng.normal(0, 0.02 if big else 0.01, shape)
        elif name.endswith("class_embedding"):
            value = rng.normal(0, width**-0.5, shape)
        elif leaf == "embedding" or name.endswith("patch_embedding/kernel"):
            value = rng.normal(0, 0.02, shape)
        elif name.endswith("projection/kernel") or "/out_proj/" in name:
            value = rng.normal(0, width**-0.5, shape)
        elif "/fc1/" in name:
            value = rng.normal(0, (2 * width) ** -0.5, shape)
        else:  # q, k, v and fc2: the inputs to the residual stream
            value = rng.normal(0, residual, shape)
        flat[name] = np.asarray(value, np.float32)
    return hf_checkpoint._nest(flat)


def save_clip_weights(
    directory: str | os.PathLike,
    config: dict[str, Any],
    params: Any,
    *,
    weights: str = "flax",
) -> str:
    """Writes ``config.json`` and CLIP parameters in Hugging Face's Flax layout to a directory,
    as ``flax_model.msgpack`` (``weights="flax"``), ``model.safetensors`` or
    ``pytorch_model.bin`` (PyTorch names, for transformers' ``CLIPModel`` too; ``"bin"``
    needs torch to write).

    Returns:
      The weights file's path.
    """
    import json

    from jaxprompt import hf_checkpoint

    if weights not in ("flax", "safetensors", "bin"):
        raise ValueError(f"weights must be 'flax', 'safetensors' or 'bin', got {weights!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    # Stale weights of another format would win the loader's preference order.
    for name in hf_checkpoint.WEIGHT_FILES:
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    if weights == "flax":
        import flax.serialization

        path = os.path.join(directory, "flax_model.msgpack")
        with open(path, "wb") as f:
            f.write(flax.serialization.msgpack_serialize(tree))
        return path
    tensors = hf_checkpoint.to_torch(tree)
    if weights == "safetensors":
        import safetensors.numpy

        path = os.path.join(directory, "model.safetensors")
        # transformers refuses safetensors files without a "format" entry.
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
        return path
    import torch

    path = os.path.join(directory, "pytorch_model.bin")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    return path


def save_random_clip(
    directory: str | os.PathLike,
    *,
    words: Sequence[str],
    preset: str = "tiny",
    seed: int = 0,
    weights: str = "flax",
    **overrides: int,
) -> str:
    """Saves a randomly initialised CLIP and a word tokenizer in Hugging Face format.

    The result loads through :func:`load_clip` exactly like a downloaded checkpoint (and, as
    ``"safetensors"`` or ``"bin"``, through transformers' ``CLIPModel.from_pretrained``); this
    is how tests and benchmarks get a model on a machine without hub access.

    Args:
      directory: output directory.
      words: vocabulary words for :func:`save_word_tokenizer`.
      preset: ``"tiny"``, ``"toy"`` or ``"vit-b/16"`` (shapes only; weights are random).
      seed: initialisation seed (:func:`random_clip_params`; the scales of Hugging Face's
        Flax initialisation for ``"flax"``, of its PyTorch one for the PyTorch formats).
      weights: ``"flax"`` (flax_model.msgpack), ``"safetensors"`` (no torch needed) or
        ``"bin"`` (needs torch to write).
      **overrides: any preset field (e.g. ``text_layers=4``).

    Returns:
      The directory, as a string.
    """
    if weights not in ("flax", "safetensors", "bin"):
        raise ValueError(f"weights must be 'flax', 'safetensors' or 'bin', got {weights!r}")
    directory = os.fspath(directory)
    vocab_size = save_word_tokenizer(directory, words)
    config = clip_config(vocab_size, preset=preset, **overrides)
    # The initialisation transformers' class for each format used to draw (see
    # random_clip_params): what the tests' tolerances and thresholds were tuned on.
    init = "flax" if weights == "flax" else "pytorch"
    params = random_clip_params(config, seed=seed, init=init)
    save_clip_weights(directory, config, params, weights=weights)
    return directory


# ------------------------------------------------------------------------------------------------
# OpenAI-format checkpoints (RN50.pt, ViT-B-16.pt), for the ResNet tower and the .pt loader
# ------------------------------------------------------------------------------------------------

# Shapes of OpenAI's modified-ResNet CLIPs: stem width, bottlenecks per stage, image size, joint
# embedding, text width and layers. "rn-tiny" is for tests (a 2 x 2 final map, a stage with a
# block that has no shortcut projection); "rn50" is RN50's shapes for benchmarks.
RESNET_PRESETS = {
    "rn-tiny": dict(
        width=8, layers=(1, 2, 1, 1), image_size=64, embed_dim=32, text_width=64, text_layers=2
    ),
    "rn50": dict(
        width=64, layers=(3, 4, 6, 3), image_size=224, embed_dim=1024, text_width=512,
        text_layers=12,
    ),
}  # fmt: skip

CLIP_VOCAB = 49408  # the BPE vocabulary OpenAI's checkpoints use (jaxprompt ships it)


def _openai_resblock(rng, p: str, d: int) -> dict[str, np.ndarray]:
    return {
        p + "attn.in_proj_weight": rng.normal(0, d**-0.5, (3 * d, d)),
        p + "attn.in_proj_bias": rng.normal(0, 0.02, 3 * d),
        p + "attn.out_proj.weight": rng.normal(0, d**-0.5, (d, d)),
        p + "attn.out_proj.bias": rng.normal(0, 0.02, d),
        p + "ln_1.weight": 1 + rng.normal(0, 0.1, d),
        p + "ln_1.bias": rng.normal(0, 0.1, d),
        p + "ln_2.weight": 1 + rng.normal(0, 0.1, d),
        p + "ln_2.bias": rng.normal(0, 0.1, d),
        p + "mlp.c_fc.weight": rng.normal(0, d**-0.5, (4 * d, d)),
        p + "mlp.c_fc.bias": rng.normal(0, 0.02, 4 * d),
        p + "mlp.c_proj.weight": rng.normal(0, (4 * d) ** -0.5, (d, 4 * d)),
        p + "mlp.c_proj.bias": rng.normal(0, 0.02, d),
    }


def _openai_conv(rng, name: str, cout: int, cin: int, k: int) -> dict[str, np.ndarray]:
    return {name: rng.normal(0, (cin * k * k) ** -0.5, (cout, cin, k, k))}


def _openai_batchnorm(rng, name: str, c: int) -> dict[str, np.ndarray]:
    # Running statistics away from (0, 1) and affine terms away from (1, 0), so that a
    # BatchNorm read wrongly (or in training mode) changes the features.
    return {
        f"{name}.weight": 1 + rng.normal(0, 0.2, c),
        f"{name}.bias": rng.normal(0, 0.2, c),
        f"{name}.running_mean": rng.normal(0, 0.3, c),
        f"{name}.running_var": rng.uniform(0.5, 2.0, c),
        f"{name}.num_batches_tracked": np.array(1000, np.int64),
    }


def _openai_conv_bn(rng, conv: str, bn: str, cout: int, cin: int, k: int) -> dict[str, np.ndarray]:
    """A convolution and the BatchNorm after it, with the statistics real checkpoints have.

    Released ResNets have nearly dead channels, running variance 1e-6..1e-3, where ``eps``
    (1e-5) is a large part of ``var + eps``: putting it outside the square root, or dropping
    it, changes their output severalfold, which variances of 0.5..2 would never show. Such a
    channel's convolution is scaled by ``sqrt(var)`` here, so its activations are as small as
    its statistics say and the normalised output stays O(1) (otherwise it would blow up by
    1/sqrt(var + eps) through every later layer). A few channels also get large running means
    (|mean| 5..20), with variances that put the mean 1..3 standard deviations from 0: their
    outputs shift by a few units, as a live channel's do; a mean 20 deviations away would
    only make the tower's activations huge (and loosen every float32 comparison).
    """
    out = _openai_conv(rng, conv, cout, cin, k)
    out.update(_openai_batchnorm(rng, bn, cout))
    n_quiet, n_shifted = max(1, cout // 8), max(1, cout // 16)
    chans = rng.permutation(cout)
    quiet, shifted = chans[:n_quiet], chans[n_quiet : n_quiet + n_shifted]
    var = 10.0 ** rng.uniform(-6.0, -3.0, n_quiet)
    out[conv][quiet] *= np.sqrt(var)[:, None, None, None]
    out[f"{bn}.running_var"][quiet] = var
    out[f"{bn}.running_mean"][quiet] *= np.sqrt(var)
    big = rng.choice([-1.0, 1.0], n_shifted) * rng.uniform(5.0, 20.0, n_shifted)
    out[f"{bn}.running_mean"][shifted] = big
    out[f"{bn}.running_var"][shifted] = (big / rng.uniform(1.0, 3.0, n_shifted)) ** 2
    return out


def openai_text_tensors(
    *, text_width: int, text_layers: int, embed_dim: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A random text tower (and logit scale 100) in OpenAI's state-dict names, float32."""
    rng = np.random.default_rng(seed)
    d = text_width
    out = {
        "token_embedding.weight": rng.normal(0, 0.02, (CLIP_VOCAB, d)),
        "positional_embedding": rng.normal(0, 0.01, (77, d)),
        "ln_final.weight": 1 + rng.normal(0, 0.1, d),
        "ln_final.bias": rng.normal(0, 0.1, d),
        "text_projection": rng.normal(0, d**-0.5, (d, embed_dim)),
        "logit_scale": np.array(np.log(100.0)),
    }
    for i in range(text_layers):
        out.update(_openai_resblock(rng, f"transformer.resblocks.{i}.", d))
    return _float32(out)


def openai_resnet_tensors(
    *, width: int, layers: Sequence[int], image_size: int, embed_dim: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A random modified-ResNet image tower in OpenAI's state-dict names (``visual.*``): the
    three-conv stem, four stages of bottlenecks (the first block of a stage projects its
    shortcut when the shape changes), the attention pool; float32, BatchNorm with running
    statistics that include nearly dead channels and large means (:func:`_openai_conv_bn`)."""
    rng = np.random.default_rng(seed)
    w, out = width, {}
    for i, (cin, cout) in enumerate(((3, w // 2), (w // 2, w // 2), (w // 2, w)), start=1):
        out.update(_openai_conv_bn(rng, f"visual.conv{i}.weight", f"visual.bn{i}", cout, cin, 3))
    inplanes = w
    for s, n in enumerate(layers, start=1):
        planes = w * 2 ** (s - 1)
        for j in range(n):
            p = f"visual.layer{s}.{j}."
            for i, (cin, cout, k) in enumerate(
                ((inplanes, planes, 1), (planes, planes, 3), (planes, 4 * planes, 1)), start=1
            ):
                out.update(_openai_conv_bn(rng, f"{p}conv{i}.weight", f"{p}bn{i}", cout, cin, k))
            if j == 0 and (s > 1 or inplanes != 4 * planes):
                out.update(
                    _openai_conv_bn(
                        rng, p + "downsample.0.weight", p + "downsample.1", 4 * planes, inplanes, 1
                    )
                )
            inplanes = 4 * planes
    c, grid = 32 * w, image_size // 32
    out["visual.attnpool.positional_embedding"] = rng.normal(0, c**-0.5, (grid * grid + 1, c))
    for name, cout in (("q", c), ("k", c), ("v", c), ("c", embed_dim)):
        out[f"visual.attnpool.{name}_proj.weight"] = rng.normal(0, c**-0.5, (cout, c))
        out[f"visual.attnpool.{name}_proj.bias"] = rng.normal(0, 0.02, cout)
    return _float32(out)


def random_openai_resnet(preset: str = "rn-tiny", *, seed: int = 0) -> dict[str, np.ndarray]:
    """A whole random ResNet CLIP state dict in OpenAI's layout, of a :data:`RESNET_PRESETS`
    shape; load it with :func:`jaxprompt.clip.from_openai_state_dict` or save it with
    ``torch.save`` / :func:`save_torchscript` for :func:`jaxprompt.load_clip`."""
    if preset not in RESNET_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(RESNET_PRESETS)}")
    p = RESNET_PRESETS[preset]
    text = openai_text_tensors(
        text_width=p["text_width"], text_layers=p["text_layers"], embed_dim=p["embed_dim"],
        seed=seed,
    )  # fmt: skip
    image = openai_resnet_tensors(
        width=p["width"], layers=p["layers"], image_size=p["image_size"],
        embed_dim=p["embed_dim"], seed=seed + 1,
    )  # fmt: skip
    return {**text, **image}


def _float32(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in sd.items()}


def save_torchscript(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> str:
    """Saves ``tensors`` as a TorchScript archive, the format OpenAI released CLIP in: a scripted
    module tree with each tensor under its dotted name (floating tensors as parameters; running
    statistics and integers as buffers). Needs torch.

    Returns:
      The path, as a string.
    """
    import torch

    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for name, value in tensors.items():
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, Node())
            node = node._modules[part]
        t = torch.tensor(np.asarray(value))
        if t.is_floating_point() and not leaf.startswith("running_"):
            node.register_parameter(leaf, torch.nn.Parameter(t))
        else:
            node.register_buffer(leaf, t)
    path = os.fspath(path)
    torch.jit.script(root).save(path)
    return path
