"""Tokenizing and class sets: :func:`tokenize`, :func:`make_task`, OpenAI's BPE tokenizer, and
the checks that a prompt fits the model (context length, prompt depth, a ViT for vision prompts).

Tokenizers are Hugging Face ``tokenizers`` pipelines held by :class:`Tokenizer`; ``transformers``
is imported only for a directory whose tokenizer has no ``tokenizer.json``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

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


class Tokenizer:
    """A CLIP tokenizer: a Hugging Face ``tokenizers`` pipeline and its start/end tokens.

    Holds what the library reads of a tokenizer, through the ``tokenizers`` package (the Rust
    library Hugging Face's fast tokenizers run on) rather than ``transformers``: importing
    ``transformers``' tokenizer classes imports torch, about 4 s of CPU in every process that
    loads a CLIP. Called like a Hugging Face tokenizer (``tok(texts)["input_ids"]``), so code
    written for one keeps working.

    Attributes:
      backend: the ``tokenizers.Tokenizer`` (normaliser, pre-tokeniser, model, post-processor).
      bos_token, eos_token: the start- and end-of-text tokens.
      bos_token_id, eos_token_id: their ids.
    """

    def __init__(self, backend: Any, *, bos_token: str, eos_token: str, max_length: int = 77):
        # Ids are padded and truncated by jaxprompt (tokenize, make_task), never by the backend.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = backend.token_to_id(bos_token)
        self.eos_token_id = backend.token_to_id(eos_token)
        self.model_max_length = max_length

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True) -> dict:
        """``{"input_ids": ids}``: a list of ids for one text, a list of lists for several."""
        if isinstance(texts, str):
            ids = self.backend.encode(texts, add_special_tokens=add_special_tokens).ids
            return {"input_ids": list(ids)}
        out = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [list(e.ids) for e in out]}

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, special tokens included (what Hugging Face's ``get_vocab`` returns)."""
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` and the special tokens in Hugging Face's format, which
        :func:`jaxprompt.load_clip` and ``transformers.AutoTokenizer`` both read."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, _TOKENIZER_FILE))
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "unk_token": self.eos_token,
        }
        config = {
            **special,
            "model_max_length": self.model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        for name, content in ((_TOKENIZER_CONFIG, config), ("special_tokens_map.json", special)):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)


_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"


def _special_token(config: dict, key: str, default: str) -> str:
    value = config.get(key, default)
    if isinstance(value, dict):  # {"content": "<|startoftext|>", "lstrip": false, ...}
        value = value.get("content", default)
    return str(value) if value else default


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer of a Hugging Face CLIP directory.

    ``tokenizer.json`` (every fast tokenizer saves it, the hub's CLIP repositories have it) is
    read with ``tokenizers`` alone, the start and end tokens from ``tokenizer_config.json`` or
    ``special_tokens_map.json`` (CLIP's ``<|startoftext|>`` / ``<|endoftext|>`` if neither
    names them). A directory with only the slow files (``vocab.json`` and ``merges.txt``) goes
    through ``transformers.AutoTokenizer``.

    Raises:
      OSError or ValueError: unreadable tokenizer files (the caller turns it into one line).
    """
    directory = os.fspath(directory)
    file = os.path.join(directory, _TOKENIZER_FILE)
    if not os.path.exists(file):
        tokenizer = quiet_transformers().AutoTokenizer.from_pretrained(directory)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow-only tokenizer: used as it is
            return tokenizer
        return Tokenizer(backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    import tokenizers

    config: dict = {}
    for name in (_TOKENIZER_CONFIG, "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                config = {**json.load(f), **config}
    max_length = config.get("model_max_length", 77)
    return Tokenizer(
        tokenizers.Tokenizer.from_file(file),
        bos_token=_special_token(config, "bos_token", _SOT),
        eos_token=_special_token(config, "eos_token", _EOT),
        max_length=int(max_length) if isinstance(max_length, int) and max_length < 10**6 else 77,
    )


# OpenAI's pattern (CLIP's simple_tokenizer): the special tokens, English contractions, runs of
# letters, single digits, runs of anything else that is not a space.
_OPENAI_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


@functools.lru_cache(maxsize=1)
def openai_tokenizer() -> Tokenizer:
    """OpenAI CLIP's tokenizer, built offline from the CLIP BPE vocabulary shipped with the
    package (MIT; see the LICENSE file beside it).

    The vocabulary is the 256 byte symbols, the same with the end-of-word mark ``</w>``, the
    first 48,894 merges of the BPE file joined, then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407): 49,408 ids. Text is NFC-normalised, whitespace runs become one
    space and letters are lowercased (OpenAI's ``whitespace_clean`` and ``lower``; its ftfy
    repair is not applied, which changes only mis-decoded text), split with OpenAI's pattern,
    mapped to byte symbols and merged by BPE, every word ending in ``</w>``.
    """
    import gzip
    import importlib.resources

    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    raw = importlib.resources.files("jaxprompt").joinpath(BPE_VOCAB).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 1 + 49152 - 256 - 2]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += [_SOT, _EOT]
    ids = {tok: i for i, tok in enumerate(vocab)}
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=ids,
            merges=merges,
            unk_token=_EOT,
            end_of_word_suffix="</w>",
            continuing_subword_prefix="",
            fuse_unk=False,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_OPENAI_SPLIT), behavior="removed", invert=True),
            # Bytes to symbols only: the pattern above has already split the words.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_SOT} $A {_EOT}", special_tokens=[(_SOT, ids[_SOT]), (_EOT, ids[_EOT])]
    )
    backend.add_special_tokens([_SOT, _EOT])
    return Tokenizer(backend, bos_token=_SOT, eos_token=_EOT)


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
