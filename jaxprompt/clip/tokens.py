"""Tokenizing and class sets: :func:`tokenize`, :func:`make_task`, OpenAI's BPE tokenizer, and
the checks that a prompt fits the model (context length, prompt depth, a ViT for vision prompts).

Tokenizers are Hugging Face ``tokenizers`` objects through ``transformers`` (the one thing of
transformers the library uses besides the tests' PyTorch reference models).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxprompt.clip.model import Clip, Task


def quiet_transformers():
    """``transformers``, with its logging set to errors only."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


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

    transformers = quiet_transformers()
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
        # The fast (Rust) tokenizer: what transformers 5 calls CLIPTokenizer. Transformers 4's slow
        # CLIPTokenizer cleans text like BERT without ftfy (CJK characters split apart), unlike
        # OpenAI's and the fast one, so ids would depend on the transformers version.
        tokenizer = transformers.CLIPTokenizerFast(
            vocab_file,
            merges_file,
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )
    return tokenizer


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
