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

from jaxprompt.clip import _quiet_transformers

__all__ = ["PRESETS", "clip_config", "save_random_clip", "save_word_tokenizer"]


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


def clip_config(vocab_size: int, *, preset: str = "tiny", **overrides: int) -> Any:
    """A Hugging Face ``CLIPConfig`` of a preset's shapes (QuickGELU, logit scale 100).

    The tokenizer's start and end ids are the last two of the vocabulary, as
    :func:`save_word_tokenizer` writes them.
    """
    transformers = _quiet_transformers()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    shape = {**PRESETS[preset], **overrides}
    text = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=shape["text_width"],
        intermediate_size=4 * shape["text_width"],
        num_hidden_layers=shape["text_layers"],
        num_attention_heads=shape["text_heads"],
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=shape["embed_dim"],
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=shape["vision_width"],
        intermediate_size=4 * shape["vision_width"],
        num_hidden_layers=shape["vision_layers"],
        num_attention_heads=shape["vision_heads"],
        image_size=shape["image_size"],
        patch_size=shape["patch_size"],
        hidden_act="quick_gelu",
        projection_dim=shape["embed_dim"],
    )
    return transformers.CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=shape["embed_dim"],
        logit_scale_init_value=float(np.log(100.0)),
    )


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

    The result loads through :func:`load_clip` exactly like a downloaded checkpoint; this is how
    tests and benchmarks get a model on a machine without hub access.

    Args:
      directory: output directory.
      words: vocabulary words for :func:`save_word_tokenizer`.
      preset: ``"tiny"`` or ``"vit-b/16"`` (shapes only; weights are random).
      seed: initialisation seed.
      weights: ``"flax"`` (flax_model.msgpack), ``"safetensors"`` or ``"bin"`` (PyTorch
        formats; need torch to write).
      **overrides: any preset field (e.g. ``text_layers=4``).

    Returns:
      The directory, as a string.
    """
    transformers = _quiet_transformers()
    directory = os.fspath(directory)
    vocab_size = save_word_tokenizer(directory, words)
    config = clip_config(vocab_size, preset=preset, **overrides)
    if weights == "flax":
        model = transformers.FlaxCLIPModel(config, _do_init=False)
        # Jitted init: Hugging Face's eager init compiles op by op and is several times slower.
        init = jax.jit(model.init_weights, static_argnums=1)
        params = init(jax.random.key(seed), model.input_shape)
        model.save_pretrained(directory, params=params)
    elif weights in ("safetensors", "bin"):
        import torch

        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
        model.save_pretrained(directory, safe_serialization=weights == "safetensors")
    else:
        raise ValueError(f"weights must be 'flax', 'safetensors' or 'bin', got {weights!r}")
    return directory
