"""POUF for masked language models: label-free adaptation of a prompted RoBERTa.

Tanwisuth, Zhang, Zheng, He, Zhou, "POUF: Prompt-Oriented Unsupervised Fine-tuning for Large
Pre-trained Models", ICML 2023, arXiv 2305.00350; reference github.com/korawat-tanwisuth/POUF
@9e12dbb (``pouf_mlm/src/models.py``, ``src/dataset.py``, ``src/trainer.py``, ``run_exp.sh``).
Spec: ``specs/pouf.md`` sections 2 and 4. The CLIP half is :mod:`jaxprompt.methods.pouf`.

This is the only module besides :mod:`jaxprompt.clip` that imports ``transformers`` (for
``FlaxRobertaForMaskedLM``'s weights and its encoder module). A sentence (or pair) is put into
an LM-BFF template such as ``<s> {sentence} It was <mask> . </s>``; with ``h`` the encoder's
last hidden state at ``<mask>`` and ``W`` the (tied) word-embedding matrix:

* feature   ``f = LayerNorm(GELU(dense(h)))``, the lm_head before its decoder. The reference
  recomputes it with the tanh-approximate GELU (``feature_gelu="tanh"``, the default here);
* prototype ``w_k = W[label_word_k]``, the decoder rows of the K label words (no bias); the
  gradient flows into the shared embedding rows (they are also the input embeddings);
* logits    ``z = LayerNorm(GELU_exact(dense(h))) @ W[label_words].T + bias[label_words]``,
  the real MLM logits at the label words (the prediction, and the IM term's input);
* loss      ``1.0 * CT(f, w; scale 10) + 0.6 * IM(z)`` (fixed temperature 1/10 in CT, raw
  logits in IM), on batches of 2 unlabeled sentences: the batch softmax over 2 is the recipe.

The whole model trains (AdamW 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay, global-norm clip
1.0, linear decay to 0 over 1000 steps), with RoBERTa's dropout active. Target labels are
never read by the loss; model selection is the last step unless ``select_with_target_labels``
(label leakage: the reference's dev-set selection).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import struct

from jaxprompt import losses

Array = jax.Array
PyTree = Any

log = logging.getLogger("jaxprompt")

__all__ = [
    "TASKS",
    "MaskedLM",
    "MlmLoadError",
    "TextTask",
    "adapt",
    "encode",
    "label_logits",
    "label_word_ids",
    "load_mlm",
    "load_text_dataset",
    "make_optimizer",
    "mask_features",
    "pouf_mlm_loss",
    "prototypes",
    "save_random_mlm",
]

_FLAX_WEIGHTS = "flax_model.msgpack"
_SAFE_WEIGHTS = "model.safetensors"
_TORCH_WEIGHTS = "pytorch_model.bin"


class MlmLoadError(RuntimeError):
    """A masked LM could not be loaded; the message says what to do."""


@struct.dataclass
class MaskedLM:
    """A RoBERTa masked LM: Hugging Face Flax parameters, config JSON and tokenizer.

    ``params`` is the only pytree leaf (everything trains in POUF's MLM recipe); the config
    and tokenizer are static.
    """

    params: PyTree
    config_json: str = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="")


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def load_mlm(name_or_path: str | os.PathLike) -> MaskedLM:
    """Loads a RoBERTa masked LM and its tokenizer (e.g. ``"roberta-large"`` or a local dir).

    Args:
      name_or_path: a hub id or a local directory in Hugging Face format holding
        ``flax_model.msgpack``, ``model.safetensors`` or ``pytorch_model.bin`` (PyTorch weights
        are converted on load) and the tokenizer files.

    Returns:
      A :class:`MaskedLM` with float32 parameters.

    Raises:
      MlmLoadError: a one-line message naming the fix.
    """
    transformers = _transformers()
    path = os.path.expanduser(os.fspath(name_or_path))
    kwargs: dict[str, Any] = {}
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if _FLAX_WEIGHTS not in files:
            if not files & {_SAFE_WEIGHTS, _TORCH_WEIGHTS}:
                raise MlmLoadError(
                    f"no masked-LM weights in {path}: expected {_FLAX_WEIGHTS}, {_SAFE_WEIGHTS} "
                    f"or {_TORCH_WEIGHTS} (save a model there with save_pretrained)"
                )
            kwargs["from_pt"] = True
    elif os.path.exists(path) or path.startswith((".", "/", "~")):
        raise MlmLoadError(f"{path} is not a directory: pass a Hugging Face model directory")
    try:
        model = transformers.FlaxRobertaForMaskedLM.from_pretrained(path, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - turn hub/IO errors into one actionable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlmLoadError(
            f"could not load masked LM {path!r} ({first[:160]}): pass a local directory in "
            "Hugging Face format, or set HF_HOME to a cache that holds it (no network access?)"
        ) from e
    if tokenizer.mask_token_id is None:
        raise MlmLoadError(f"the tokenizer of {path!r} has no mask token: not a masked LM")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(model.params))
    return MaskedLM(
        params=params,
        config_json=model.config.to_json_string(use_diff=False),
        tokenizer=tokenizer,
        name=str(name_or_path),
    )


def save_random_mlm(
    directory: str | os.PathLike,
    words: Sequence[str],
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_len: int = 64,
    seed: int = 0,
) -> str:
    """Saves a tiny random RoBERTa masked LM with a byte-level BPE tokenizer (tests, demos).

    The tokenizer is trained on ``words`` (each repeated, with and without a leading space),
    so every given word is one token in both forms, like RoBERTa's ``Ġgreat``.

    Returns:
      ``directory`` as a string.
    """
    transformers = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = os.fspath(directory)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{w} {w}" for w in words for _ in range(4)]
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(specials) + 12 * len(words),
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = transformers.RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=max_len,
    )
    fast.save_pretrained(directory)
    config = transformers.RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_len + 2,  # RoBERTa's positions start after the pad id
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = transformers.FlaxRobertaForMaskedLM(config, seed=seed)
    model.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# Templates and verbalizers (spec 2.1, LM-BFF's run_experiment.sh)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextTask:
    """A text task's prompt: fields, LM-BFF template, and label names with their words.

    Attributes:
      name: task name.
      fields: record fields that fill ``sent_0``, ``sent_1``.
      template: LM-BFF template (``*cls*``, ``*mask*``, ``*sep+*``, ``*sent_0*``,
        ``*+sent_0*`` (leading space), ``*sentl_1*`` (first letter lower-cased),
        ``*sent-_0*`` (last character dropped); other text literal with ``_`` a space).
      labels: label names in the task's label order (LM-BFF's ``get_labels()`` order).
      words: the label word of each label (one token each, space-prefixed unless they start
        with ``<``, ``[``, ``.`` or ``,``).
      max_len: maximum sequence length (tail truncation).
      first_sent_limit: token limit of ``sent_0`` (None: none).
      other_sent_limit: token limit of the other sentences.
      tfds: TFDS name of the GLUE dataset, if there is one.
      test_split: the TFDS split used as test (GLUE's dev set, as LM-BFF).
    """

    name: str
    fields: tuple[str, ...]
    template: str
    labels: tuple[str, ...]
    words: tuple[str, ...]
    max_len: int = 128
    first_sent_limit: int | None = None
    other_sent_limit: int | None = None
    tfds: str | None = None
    test_split: str = "validation"


_IT_WAS = "*cls**sent_0*_It_was*mask*.*sep+*"
_THIS_IS = "*cls**sent_0*_This_is*mask*.*sep+*"
_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
_PARA = "*cls**sent_0**mask*,*+sentl_1**sep+*"
_POLARITY = (("negative", "positive"), ("terrible", "great"))

TASKS: dict[str, TextTask] = {
    t.name: t
    for t in (
        TextTask("sst2", ("sentence",), _IT_WAS, *_POLARITY, tfds="glue/sst2"),
        TextTask(
            "sst5", ("sentence",), _IT_WAS,
            ("very negative", "negative", "neutral", "positive", "very positive"),
            ("terrible", "bad", "okay", "good", "great"),
            first_sent_limit=110, other_sent_limit=20,
        ),
        TextTask("mr", ("sentence",), _IT_WAS, *_POLARITY),
        TextTask("cr", ("sentence",), _IT_WAS, *_POLARITY),
        TextTask("mpqa", ("sentence",), _IT_WAS, *_POLARITY),
        TextTask("subj", ("sentence",), _THIS_IS, ("subjective", "objective"),
                 ("subjective", "objective")),
        TextTask(
            "trec", ("sentence",), "*cls**mask*:*+sent_0**sep+*",
            ("description", "entity", "expression", "human", "location", "number"),
            ("Description", "Entity", "Expression", "Human", "Location", "Number"),
        ),
        TextTask("cola", ("sentence",), _THIS_IS, ("unacceptable", "acceptable"),
                 ("incorrect", "correct"), tfds="glue/cola"),
        TextTask(
            "mnli", ("premise", "hypothesis"), _NLI,
            ("contradiction", "entailment", "neutral"), ("No", "Yes", "Maybe"),
            max_len=256, tfds="glue/mnli", test_split="validation_matched",
        ),
        TextTask(
            "snli", ("premise", "hypothesis"), _NLI,
            ("contradiction", "entailment", "neutral"), ("No", "Yes", "Maybe"), max_len=256,
        ),
        TextTask("qnli", ("question", "sentence"), _NLI, ("entailment", "not_entailment"),
                 ("Yes", "No"), tfds="glue/qnli"),
        TextTask("rte", ("sentence1", "sentence2"), _NLI, ("entailment", "not_entailment"),
                 ("Yes", "No"), max_len=256, first_sent_limit=240, tfds="glue/rte"),
        TextTask("mrpc", ("sentence1", "sentence2"), _PARA, ("not_equivalent", "equivalent"),
                 ("No", "Yes"), tfds="glue/mrpc"),
        TextTask("qqp", ("question1", "question2"), _PARA, ("not_duplicate", "duplicate"),
                 ("No", "Yes"), tfds="glue/qqp"),
    )
}  # fmt: skip


def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_word_ids(tokenizer: Any, words: Sequence[str]) -> np.ndarray:
    """Token ids of the label words, each of which must be a single token.

    A word gets a leading space (RoBERTa's ``Ġ`` form) unless it starts with ``<``, ``[``,
    ``.`` or ``,``, as in LM-BFF.

    Raises:
      ValueError: a word that is not one token.
    """
    ids = []
    for w in words:
        text = w if w[:1] in ("<", "[", ".", ",") else " " + w
        toks = _encode_text(tokenizer, text)
        if len(toks) != 1:
            raise ValueError(
                f"label word {w!r} is {len(toks)} tokens ({text!r}) for this tokenizer: choose "
                "words that are single tokens"
            )
        ids.append(toks[0])
    return np.asarray(ids, np.int32)


_PART = re.compile(r"^(\+)?sent(l|-)?_(\d+)$")


def _template_ids(task: TextTask, tokenizer, sentences: Sequence[str]) -> list[int]:
    out: list[int] = []
    for part in (p for p in task.template.split("*") if p):
        if part == "cls":
            out.append(tokenizer.cls_token_id)
        elif part == "mask":
            out.append(tokenizer.mask_token_id)
        elif part in ("sep", "sep+"):
            out.append(tokenizer.sep_token_id)
        elif m := _PART.match(part):
            space, mod, i = m.group(1), m.group(2), int(m.group(3))
            s = sentences[i]
            if mod == "l" and s:
                s = s[:1].lower() + s[1:]
            elif mod == "-":
                s = s[:-1]
            ids = _encode_text(tokenizer, (" " if space else "") + s)
            limit = task.first_sent_limit if i == 0 else task.other_sent_limit
            out.extend(ids[:limit] if limit else ids)
        else:
            out.extend(_encode_text(tokenizer, part.replace("_", " ")))
    return out


def encode(
    task: TextTask, tokenizer: Any, records: Sequence[Mapping[str, Any]], *, max_len: int = 0
) -> dict[str, np.ndarray]:
    """Fills the template for each record: ``input_ids``, ``attention_mask``, ``mask_pos``.

    Sequences are cut at the tail to ``max_len`` (default ``task.max_len``) and right-padded
    with the pad token to the longest one.

    Raises:
      ValueError: a sequence whose ``<mask>`` was cut off.
    """
    max_len = max_len or task.max_len
    rows = []
    for r in records:
        ids = _template_ids(task, tokenizer, [str(r[f]) for f in task.fields])[:max_len]
        if tokenizer.mask_token_id not in ids:
            raise ValueError(
                f"the <mask> of {task.name}'s template falls past max_len={max_len}: lower "
                "first_sent_limit or raise max_len"
            )
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
    att = np.zeros((len(rows), width), np.int32)
    pos = np.zeros((len(rows),), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        att[i, : len(r)] = 1
        pos[i] = r.index(tokenizer.mask_token_id)
    return {"input_ids": ids, "attention_mask": att, "mask_pos": pos}


# --------------------------------------------------------------------------------------------
# Features, prototypes, logits, loss (spec 2.2)
# --------------------------------------------------------------------------------------------


_ENCODERS: dict[str, Any] = {}


def _encoder(config_json: str):
    """Hugging Face's Flax RoBERTa encoder (no pooler) for a config, built once."""
    if config_json not in _ENCODERS:
        transformers = _transformers()
        from transformers.models.roberta import modeling_flax_roberta as hf

        config = transformers.RobertaConfig.from_dict(json.loads(config_json))
        _ENCODERS[config_json] = (hf.FlaxRobertaModule(config, add_pooling_layer=False), config)
    return _ENCODERS[config_json]


def _word_embeddings(params: PyTree) -> Array:
    return params["roberta"]["embeddings"]["word_embeddings"]["embedding"]


def mask_hidden(
    model: MaskedLM,
    params: PyTree,
    batch: Mapping[str, Array],
    *,
    dropout_key: Array | None = None,
) -> Array:
    """The encoder's last hidden state at each sequence's ``<mask>`` -> [B, H] float32.

    ``dropout_key`` turns RoBERTa's dropout on (training; the reference trains in
    ``model.train()``); ``None`` is deterministic.
    """
    module, config = _encoder(model.config_json)
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    att = jnp.asarray(batch["attention_mask"], jnp.int32)
    # RoBERTa numbers positions from pad_id + 1, skipping padding (fairseq's make_positions).
    not_pad = (ids != config.pad_token_id).astype(jnp.int32)
    positions = jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    out = module.apply(
        {"params": params["roberta"]},
        ids,
        att,
        jnp.zeros_like(ids),
        positions,
        None,
        deterministic=dropout_key is None,
        rngs=rngs,
    )
    hidden = out[0]  # [B, L, H]
    pos = jnp.asarray(batch["mask_pos"], jnp.int32)
    return jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def _head_pre_decoder(params: PyTree, h: Array, gelu: str, eps: float) -> Array:
    head = params["lm_head"]
    x = h @ head["dense"]["kernel"] + head["dense"]["bias"]
    x = jax.nn.gelu(x, approximate=(gelu == "tanh"))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + eps)
    return x * head["layer_norm"]["scale"] + head["layer_norm"]["bias"]


def mask_features(model: MaskedLM, params: PyTree, h: Array, *, gelu: str = "tanh") -> Array:
    """POUF's target feature ``LayerNorm(GELU(dense(h)))`` at ``<mask>`` -> [B, H].

    Args:
      model: the masked LM (for its LayerNorm epsilon).
      params: its parameters.
      h: [B, H] hidden states at ``<mask>`` (:func:`mask_hidden`).
      gelu: ``"tanh"`` (the reference's own feature code) or ``"exact"`` (the lm_head's).
    """
    if gelu not in ("tanh", "exact"):
        raise ValueError(f"gelu must be 'tanh' or 'exact', got {gelu!r}")
    _, config = _encoder(model.config_json)
    return _head_pre_decoder(params, h, gelu, config.layer_norm_eps)


def prototypes(params: PyTree, label_ids: Array) -> Array:
    """The decoder rows of the label words (tied word embeddings, no bias) -> [K, H]."""
    return _word_embeddings(params)[jnp.asarray(label_ids)]


def label_logits(model: MaskedLM, params: PyTree, h: Array, label_ids: Array) -> Array:
    """The MLM logits at the label words (exact GELU, tied decoder + bias) -> [B, K]."""
    _, config = _encoder(model.config_json)
    x = _head_pre_decoder(params, h, "exact", config.layer_norm_eps)
    ids = jnp.asarray(label_ids)
    return x @ prototypes(params, ids).T + params["lm_head"]["bias"][ids]


def pouf_mlm_loss(
    model: MaskedLM,
    params: PyTree,
    batch: Mapping[str, Array],
    label_ids: Array,
    *,
    w_transport: float = 1.0,
    w_info: float = 0.6,
    scale: float = 10.0,
    feature_gelu: str = "tanh",
    dropout_key: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``w_transport * CT(f, W[labels]; scale) + w_info * IM(label logits)``, label-free.

    Returns:
      ``(loss, {"transport", "mutual_information"})``; ``batch["label"]`` is never read.
    """
    h = mask_hidden(model, params, batch, dropout_key=dropout_key)
    feats = mask_features(model, params, h, gelu=feature_gelu)
    ct = losses.transport_loss(feats, prototypes(params, label_ids), scale=scale)
    mi = losses.mutual_information_loss(label_logits(model, params, h, label_ids))
    return w_transport * ct + w_info * mi, {"transport": ct, "mutual_information": mi}


# --------------------------------------------------------------------------------------------
# Data (TFDS GLUE or CSV)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TextDataset:
    """Records ``{field: str, "label": int}`` per split (``label`` -1 when unknown)."""

    task: TextTask
    split: dict[str, list[dict[str, Any]]]
    source: str = ""


def _label_index(task: TextTask, value: Any) -> int:
    s = str(value).strip()
    if s == "" or s == "-1":
        return -1
    if s in task.labels:
        return task.labels.index(s)
    if re.fullmatch(r"\d+", s) and int(s) < len(task.labels):
        return int(s)
    raise ValueError(f"label {s!r} is not one of {task.name}'s labels {list(task.labels)}")


def _read_csv(path: str, task: TextTask) -> dict[str, list[dict[str, Any]]]:
    import csv

    split: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        fields = list(task.fields)
        if len(fields) == 1 and fields[0] not in cols and "text" in cols:
            fields = ["text"]
        missing = [c for c in fields if c not in cols]
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {missing} for task {task.name}; it has {sorted(cols)}"
            )
        for row in reader:
            rec = {f: row[c] for f, c in zip(task.fields, fields, strict=True)}
            rec["label"] = _label_index(task, row.get("label", ""))
            which = (row.get("split") or "train").strip().lower()
            split.setdefault(which, []).append(rec)
    if not split["test"]:
        # No held-out rows: evaluate on the adaptation pool itself (transductive, as POUF's
        # Office protocol); its labels are read only for the report.
        split["test"] = split["train"]
    return split


def _read_tfds(task: TextTask, data_dir: str | None) -> dict[str, list[dict[str, Any]]]:
    import tensorflow_datasets as tfds

    assert task.tfds is not None
    try:
        builder = tfds.builder(task.tfds, data_dir=data_dir)
        names = list(builder.info.features["label"].names)
        sources = {
            "train": builder.as_data_source(split="train"),
            "test": builder.as_data_source(split=task.test_split),
        }
    except Exception as e:  # noqa: BLE001 - not prepared: say how to prepare it
        raise FileNotFoundError(
            f"{task.tfds} is not prepared under {data_dir or '~/tensorflow_datasets'} "
            f"({type(e).__name__}): build it once with `tfds build {task.tfds} "
            "--file_format=array_record` (needs TensorFlow), or pass a csv: file"
        ) from e
    to_task = {i: task.labels.index(n) for i, n in enumerate(names) if n in task.labels}
    out: dict[str, list[dict[str, Any]]] = {}
    for s, src in sources.items():
        rows = []
        for i in range(len(src)):
            rec = src[i]
            row = {f: _text(rec[f]) for f in task.fields}
            row["label"] = to_task.get(int(rec["label"]), -1)
            rows.append(row)
        out[s] = rows
    return out


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_text_dataset(
    name: str, *, task: str | None = None, data_dir: str | None = None
) -> TextDataset:
    """A text dataset: ``"glue/sst2"`` (TFDS, prepared as array_record) or ``"csv:PATH"``.

    A CSV has a header with the task's text fields (``sentence`` or ``text`` for one-sentence
    tasks; e.g. ``premise,hypothesis`` for MNLI), optionally ``label`` (a label name or its
    index) and ``split`` (``train``/``test``; without it, the test split is the train pool).

    Args:
      name: the dataset.
      task: the :data:`TASKS` key (default: from a GLUE name, e.g. ``glue/sst2`` -> ``sst2``).
      data_dir: TFDS data dir.

    Raises:
      ValueError: an unknown task, or a CSV without the needed columns.
      FileNotFoundError: a TFDS dataset that is not prepared.
    """
    if task is None:
        task = name.split("/")[-1].split(":")[0] if not name.startswith("csv:") else None
    if task not in TASKS:
        raise ValueError(f"unknown text task {task!r}; choose one of: {', '.join(TASKS)}")
    spec = TASKS[task]
    if name.startswith("csv:"):
        path = os.path.abspath(os.path.expanduser(name[4:]))
        return TextDataset(spec, _read_csv(path, spec), path)
    if spec.tfds is None or name.split(":")[0] != spec.tfds:
        raise ValueError(
            f"text dataset {name!r}: use csv:PATH, or one of the TFDS names "
            f"{sorted(t.tfds for t in TASKS.values() if t.tfds)}"
        )
    return TextDataset(spec, _read_tfds(spec, data_dir), name)


# --------------------------------------------------------------------------------------------
# Optimiser and the adaptation loop (spec 2.3)
# --------------------------------------------------------------------------------------------


def make_optimizer(
    lr: float = 1e-5,
    *,
    steps: int = 1000,
    clip_norm: float = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """The reference's HF AdamW: linear decay from ``lr`` to 0 over ``steps``, no warm-up,
    global-norm clipping at ``clip_norm`` first (weight decay 0, the HF default)."""
    schedule = optax.linear_schedule(lr, 0.0, steps)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def _batches(n: int, batch_size: int, seed: int):
    """Endless shuffled index batches, reshuffled each pass, the last partial batch dropped."""
    rng = np.random.RandomState(seed)
    while True:
        order = rng.permutation(n)
        for i in range(n // batch_size):
            yield order[i * batch_size : (i + 1) * batch_size]


def adapt(
    model: MaskedLM,
    data: TextDataset,
    *,
    steps: int = 1000,
    batch_size: int = 2,
    lr: float = 1e-5,
    w_transport: float = 1.0,
    w_info: float = 0.6,
    scale: float = 10.0,
    feature_gelu: str = "tanh",
    dropout: bool = True,
    seed: int = 42,
    eval_every: int = 100,
    eval_batch_size: int = 32,
    select_with_target_labels: bool = False,
    log_every: int = 50,
    metrics_path: str | None = None,
) -> dict[str, Any]:
    """POUF on the unlabeled train split, accuracy on the test split before and after.

    Model selection: the LAST step (label-free) unless ``select_with_target_labels``, which
    evaluates on the labeled test split every ``eval_every`` steps and keeps the best: the
    reference's protocol, and label leakage (it reports both, see the returned dict).

    Returns:
      ``{"accuracy": {"zero_shot", "pouf"[, "pouf_best_by_target_labels"]}, "steps", ...}``
      (percent) and the final ``params`` under ``"params"``.
    """
    tok = model.tokenizer
    task = data.task
    label_ids = jnp.asarray(label_word_ids(tok, task.words))
    if len(data.split["train"]) < batch_size:
        raise ValueError(f"{len(data.split['train'])} training sentences < batch {batch_size}")
    train = encode(task, tok, data.split["train"])
    test_rows = [r for r in data.split["test"] if r["label"] >= 0]
    if not test_rows:
        raise ValueError(f"the test split of {data.source} has no labels to report accuracy")
    test = encode(task, tok, test_rows)
    test_labels = np.asarray([r["label"] for r in test_rows], np.int32)
    tx = make_optimizer(lr, steps=steps)
    opts = dict(w_transport=w_transport, w_info=w_info, scale=scale, feature_gelu=feature_gelu)

    @jax.jit
    def step(params, opt_state, batch, key):
        def loss_fn(p):
            return pouf_mlm_loss(
                model, p, batch, label_ids, dropout_key=key if dropout else None, **opts
            )

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "loss": loss}

    @jax.jit
    def predict(params, batch):
        h = mask_hidden(model, params, batch)
        return jnp.argmax(label_logits(model, params, h, label_ids), axis=-1)

    def accuracy(params) -> float:
        preds = []
        for i in range(0, len(test_labels), eval_batch_size):
            b = {k: v[i : i + eval_batch_size] for k, v in test.items()}
            n = len(b["input_ids"])
            if n < eval_batch_size:  # pad to a fixed shape: one compilation
                b = {k: np.concatenate([v, np.repeat(v[-1:], eval_batch_size - n, 0)])
                     for k, v in b.items()}  # fmt: skip
            preds.append(np.asarray(predict(params, b))[:n])
        return round(100.0 * float(np.mean(np.concatenate(preds) == test_labels)), 2)

    t0 = time.time()
    params = model.params
    zero_shot = accuracy(params)
    log.info("%s zero-shot (prompt, no training): %.2f%%", task.name, zero_shot)
    opt_state = tx.init(params)
    key = jax.random.key(seed)
    best = (-math.inf, 0, None)
    # Through epath, rewritten whole at each logged step: an object store (gs://) cannot
    # append, and the file is small (one line per logged step).
    metrics = epath.Path(metrics_path) if metrics_path else None
    logged = [metrics.read_text()] if metrics is not None and metrics.exists() else []
    batches = _batches(len(train["input_ids"]), batch_size, seed)
    for t, idx in zip(range(steps), batches, strict=False):
        # The batch holds the template inputs only: no label reaches the step.
        batch = {k: v[idx] for k, v in train.items()}
        params, opt_state, m = step(params, opt_state, batch, jax.random.fold_in(key, t))
        done = t + 1
        if done % log_every == 0 or done == steps:
            rec = {"step": done, **{k: float(v) for k, v in m.items()}}
            log.info("pouf_mlm step %d/%d %s", done, steps, json.dumps(rec))
            if metrics is not None and jax.process_index() == 0:
                logged.append(json.dumps(rec) + "\n")
                metrics.write_text("".join(logged))
        if select_with_target_labels and (done % eval_every == 0 or done == steps):
            acc = accuracy(params)
            if acc > best[0]:
                best = (acc, done, jax.device_get(params))
    result: dict[str, Any] = {"accuracy": {"zero_shot": zero_shot, "pouf": accuracy(params)}}
    result["selection"] = "last step (label-free)"
    if select_with_target_labels:
        result["accuracy"]["pouf_best_by_target_labels"] = best[0]
        result["best_step_by_target_labels"] = best[1]
        result["best_params"] = best[2]
        result["selection"] = "best by target-label accuracy (label leakage), last also reported"
    result.update(task=task.name, steps=steps, batch_size=batch_size,
                  n_train=len(train["input_ids"]), n_test=len(test_labels),
                  wall_time_s=round(time.time() - t0, 1), params=params)  # fmt: skip
    return result
