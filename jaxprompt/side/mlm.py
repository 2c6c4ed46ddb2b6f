"""POUF for masked language models: label-free adaptation of a prompted RoBERTa.

Tanwisuth, Zhang, Zheng, He, Zhou, "POUF: Prompt-Oriented Unsupervised Fine-tuning for Large
Pre-trained Models", ICML 2023, arXiv 2305.00350; reference github.com/korawat-tanwisuth/POUF
@9e12dbb (``pouf_mlm/src/models.py``, ``src/dataset.py``, ``src/trainer.py``, ``run_exp.sh``).
Spec: ``specs/pouf.md`` sections 2 and 4. The CLIP half is :mod:`jaxprompt.methods.pouf`.

The RoBERTa masked LM is our own: pure functions (:func:`hidden_states`, :func:`mlm_logits`)
over Hugging Face's Flax parameter tree, built from :mod:`jaxprompt.transformer`, and a loader
that reads ``config.json`` and the weights (Flax msgpack, safetensors or ``pytorch_model.bin``)
itself. ``transformers`` is imported only for the tokenizer. A sentence (or pair) is put into
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
never read by the loss.

Protocol (spec 2.3, 3.1): adaptation on LM-BFF's k-shot train split (16 per class, labels
dropped; :func:`kshot_dataset`, seeds :data:`KSHOT_SEEDS`), model selection on the labeled
k-shot dev split (16 per class), the task's metric (:func:`task_metrics`: F1 for MRPC/QQP,
Matthews correlation for CoLA, Pearson/Spearman for STS-B, accuracy otherwise) on the
original evaluation split. The last step is reported too (label-free). Selection on the test
labels (``select_with_target_labels``) is label leakage, kept opt-in for comparison only.
"""

from __future__ import annotations

import dataclasses
import functools
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
from jaxprompt import transformer as tfm

Array = jax.Array
PyTree = Any

log = logging.getLogger("jaxprompt")

__all__ = [
    "KSHOT_SEEDS",
    "TASKS",
    "TASK_METRIC",
    "MaskedLM",
    "MlmLoadError",
    "TextDataset",
    "TextTask",
    "accuracy",
    "adapt",
    "encode",
    "evaluate",
    "f1_score",
    "hidden_states",
    "kshot_dataset",
    "kshot_splits",
    "label_logits",
    "label_word_ids",
    "load_mlm",
    "load_text_dataset",
    "main_metric",
    "make_optimizer",
    "mask_features",
    "mask_hidden",
    "matthews_corrcoef",
    "mlm_logits",
    "pearson_corr",
    "pouf_mlm_loss",
    "prototypes",
    "save_random_mlm",
    "spearman_corr",
    "task_metrics",
]

_CONFIG = "config.json"
_SAFE_WEIGHTS = "model.safetensors"


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


# --------------------------------------------------------------------------------------------
# The RoBERTa masked LM as pure functions over Hugging Face's Flax parameter tree
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    """The fields of a Hugging Face RoBERTa ``config.json`` that the forward pass reads."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1


# The sizes have no sensible default: a config without them is not a RoBERTa config. The other
# fields default as in Hugging Face's RobertaConfig (released checkpoints spell them all out).
_REQUIRED = tuple(f.name for f in dataclasses.fields(_Config) if f.default is dataclasses.MISSING)


@functools.lru_cache(maxsize=16)
def _config(config_json: str) -> _Config:
    raw = json.loads(config_json)
    # BERT numbers positions from 0 and XLM-R-likes share RoBERTa's layout; anything else is
    # refused rather than run with RoBERTa's position rule.
    kind = raw.get("model_type", "roberta")
    if kind not in ("roberta", "xlm-roberta", "camembert"):
        raise MlmLoadError(
            f"config.json is a {kind!r} model: POUF's masked-LM variant runs RoBERTa "
            "(pass e.g. roberta-large)"
        )
    if raw.get("tie_word_embeddings") is False:
        raise MlmLoadError(
            "config.json unties the decoder from the word embeddings: POUF's prototypes are the "
            "tied rows; pass a RoBERTa with tie_word_embeddings true"
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise MlmLoadError(
            f"config.json lacks {', '.join(missing)}: not a RoBERTa config (pass a directory "
            "saved by RobertaForMaskedLM.save_pretrained)"
        )
    names = [f.name for f in dataclasses.fields(_Config)]
    return _Config(**{k: raw[k] for k in names if raw.get(k) is not None})


def _shapes(c: _Config) -> dict[str, Any]:
    """Hugging Face's Flax RoBERTa masked-LM parameter tree as shapes (tied decoder: none)."""
    h, f = c.hidden_size, c.intermediate_size

    def dense(n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        return {"kernel": (n_in, n_out), "bias": (n_out,)}

    def norm() -> dict[str, tuple[int, ...]]:
        return {"scale": (h,), "bias": (h,)}

    layer = {
        "attention": {
            "self": {"query": dense(h, h), "key": dense(h, h), "value": dense(h, h)},
            "output": {"dense": dense(h, h), "LayerNorm": norm()},
        },
        "intermediate": {"dense": dense(h, f)},
        "output": {"dense": dense(f, h), "LayerNorm": norm()},
    }
    embeddings = {
        "word_embeddings": {"embedding": (c.vocab_size, h)},
        "position_embeddings": {"embedding": (c.max_position_embeddings, h)},
        "token_type_embeddings": {"embedding": (c.type_vocab_size, h)},
        "LayerNorm": norm(),
    }
    return {
        "roberta": {
            "embeddings": embeddings,
            "encoder": {"layer": {str(i): layer for i in range(c.num_hidden_layers)}},
        },
        "lm_head": {"dense": dense(h, h), "layer_norm": norm(), "bias": (c.vocab_size,)},
    }


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout (flax.linen.Dropout's): keep with ``1 - rate``, scale by its inverse."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _layer(p: PyTree, x: Array, key_mask: Array, c: _Config, keys) -> Array:
    """One post-LayerNorm RoBERTa layer: ``LN(x + attn(x))``, then ``LN(x + ffn(x))``."""
    f32, eps = jnp.float32, c.layer_norm_eps
    a = p["attention"]
    q, k, v = (
        tfm.split_heads(tfm.dense(x, a["self"][n], f32), c.num_attention_heads)
        for n in ("query", "key", "value")
    )
    o = tfm.attention(
        q, k, v, causal=False, key_mask=key_mask,
        dropout_rate=c.attention_probs_dropout_prob, dropout_key=keys[0],
    )  # fmt: skip
    o = tfm.dense(o.reshape(x.shape), a["output"]["dense"], f32)
    o = _dropout(o, c.hidden_dropout_prob, keys[1])
    x = tfm.layer_norm(x + o, a["output"]["LayerNorm"], eps=eps, dtype=f32)
    h = tfm.activation(c.hidden_act)(tfm.dense(x, p["intermediate"]["dense"], f32))
    h = _dropout(tfm.dense(h, p["output"]["dense"], f32), c.hidden_dropout_prob, keys[2])
    return tfm.layer_norm(x + h, p["output"]["LayerNorm"], eps=eps, dtype=f32)


def hidden_states(
    model: MaskedLM,
    params: PyTree,
    batch: Mapping[str, Array],
    *,
    dropout_key: Array | None = None,
) -> Array:
    """The encoder's last hidden states -> ``[B, L, H]`` float32.

    Args:
      model: the masked LM (its config).
      params: its parameters (Hugging Face's Flax tree, ``{"roberta", "lm_head"}``).
      batch: ``input_ids`` and ``attention_mask``, ``[B, L]``.
      dropout_key: turns RoBERTa's dropout on (training): after the embeddings, on the
        attention probabilities, and after each layer's two output projections, at the config's
        rates, as Hugging Face's Flax RoBERTa with ``deterministic=False``. None: deterministic.
    """
    c = _config(model.config_json)
    r = params["roberta"]
    emb = r["embeddings"]
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    key_mask = jnp.asarray(batch["attention_mask"]) > 0
    # RoBERTa numbers positions from pad_id + 1, skipping padding (fairseq's make_positions).
    not_pad = (ids != c.pad_token_id).astype(jnp.int32)
    positions = jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
    x = (
        emb["word_embeddings"]["embedding"][ids]
        + emb["position_embeddings"]["embedding"][positions]
        + emb["token_type_embeddings"]["embedding"][0]  # one segment: token type 0 throughout
    ).astype(jnp.float32)
    x = tfm.layer_norm(x, emb["LayerNorm"], eps=c.layer_norm_eps, dtype=jnp.float32)
    n = c.num_hidden_layers
    keys: list = [None] * (1 + 3 * n)
    if dropout_key is not None:
        keys = list(jax.random.split(dropout_key, 1 + 3 * n))
    x = _dropout(x, c.hidden_dropout_prob, keys[0])
    layers = r["encoder"]["layer"]
    for i in range(n):
        x = _layer(layers[str(i)], x, key_mask, c, keys[1 + 3 * i : 4 + 3 * i])
    return x


def mlm_logits(
    model: MaskedLM,
    params: PyTree,
    batch: Mapping[str, Array],
    *,
    dropout_key: Array | None = None,
) -> Array:
    """The masked-LM logits over the whole vocabulary at every position -> ``[B, L, V]``
    (the lm_head with its exact GELU and tied decoder)."""
    h = hidden_states(model, params, batch, dropout_key=dropout_key)
    c = _config(model.config_json)
    x = _head_pre_decoder(params, h, "exact", c.layer_norm_eps)
    return x @ _word_embeddings(params).T + params["lm_head"]["bias"]


# --------------------------------------------------------------------------------------------
# Loading: config.json as JSON, the weights through jaxprompt.hf_checkpoint
# --------------------------------------------------------------------------------------------


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _old_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Today's PyTorch names for older spellings of a RoBERTa MLM's tensors.

    BERT-era saves call the LayerNorm parameters ``gamma``/``beta``; the tied decoder bias is
    saved as ``lm_head.bias``, ``lm_head.decoder.bias`` or both (the same tensor).
    """
    sd = dict(state_dict)
    for k in list(sd):
        for old, new in (("LayerNorm.gamma", "LayerNorm.weight"),
                         ("LayerNorm.beta", "LayerNorm.bias")):  # fmt: skip
            if k.endswith(old):
                sd.setdefault(k[: -len(old)] + new, sd[k])
    if "lm_head.bias" not in sd and "lm_head.decoder.bias" in sd:
        sd["lm_head.bias"] = sd["lm_head.decoder.bias"]
    return sd


def _read_params(directory: str, c: _Config) -> PyTree:
    """The weights of ``directory`` (:func:`jaxprompt.hf_checkpoint.find_weights`'s choice) as
    the Flax tree of the config ``c``, float32. Buffers (``position_ids``), a pooler and the
    tied decoder weight are not read."""
    from jaxprompt import hf_checkpoint

    try:
        path = hf_checkpoint.find_weights(directory)
        state_dict = _old_names(hf_checkpoint.read_weights(path))
        tree = hf_checkpoint.to_flax(state_dict, _flat(_shapes(c)), source=path)
    except hf_checkpoint.CheckpointError as e:
        raise MlmLoadError(f"masked LM: {e}") from None
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def load_mlm(name_or_path: str | os.PathLike) -> MaskedLM:
    """Loads a RoBERTa masked LM and its tokenizer (e.g. ``"roberta-large"`` or a local dir).

    Args:
      name_or_path: a hub id or a local directory in Hugging Face format: ``config.json``, the
        tokenizer files, and ``model.safetensors``, ``pytorch_model.bin`` or
        ``flax_model.msgpack`` (tried in that order; PyTorch's names and layout are converted
        here, and the ``.bin`` is read without running code from it).

    Returns:
      A :class:`MaskedLM` with float32 parameters.

    Raises:
      MlmLoadError: a one-line message naming the fix.
    """
    from jaxprompt import hf_checkpoint

    path = os.path.expanduser(os.fspath(name_or_path))
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/", "~")):
            raise MlmLoadError(f"{path} is not a directory: pass a Hugging Face model directory")
        try:
            path = hf_checkpoint.snapshot(path, local_only=False)
        except Exception as e:  # noqa: BLE001 - turn hub/IO errors into one actionable line
            first = hf_checkpoint.first_line(e)
            raise MlmLoadError(
                f"could not load masked LM {path!r} ({first}): pass a local directory in "
                "Hugging Face format, or set HF_HOME to a cache that holds it (no network?)"
            ) from e
    try:
        hf_checkpoint.find_weights(path)
    except hf_checkpoint.CheckpointError as e:
        raise MlmLoadError(f"masked LM: {e}") from None
    try:
        with open(os.path.join(path, _CONFIG)) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise MlmLoadError(
            f"could not read {path}/{_CONFIG} ({type(e).__name__}): save the model with "
            "save_pretrained, which writes it"
        ) from None
    config_json = json.dumps(raw, sort_keys=True)
    params = _read_params(path, _config(config_json))
    try:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer: one line
        first = hf_checkpoint.first_line(e)
        raise MlmLoadError(
            f"could not load the tokenizer of {path!r} ({first}): save it there with "
            "the tokenizer's save_pretrained"
        ) from e
    if tokenizer.mask_token_id is None:
        raise MlmLoadError(f"the tokenizer of {path!r} has no mask token: not a masked LM")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return MaskedLM(params=params, config_json=config_json, tokenizer=tokenizer,
                    name=str(name_or_path))  # fmt: skip


def _random_params(c: _Config, seed: int) -> dict[str, np.ndarray]:
    """Random parameters under PyTorch's names, large enough that every part of the forward
    pass moves the logits (LayerNorm scales and all biases away from 1 and 0)."""
    from jaxprompt import hf_checkpoint

    rng = np.random.default_rng(seed)
    tree: dict[str, Any] = {}
    for path, shape in _flat(_shapes(c)).items():
        leaf = path.rsplit("/", 1)[1]
        if leaf == "kernel":  # scaled by 1/sqrt(fan_in) so activations stay O(1)
            arr = rng.normal(0.0, shape[0] ** -0.5, shape)
        elif leaf == "embedding":
            arr = rng.normal(0.0, 0.5, shape)
        elif leaf == "scale":
            arr = 1.0 + rng.normal(0.0, 0.1, shape)
        else:
            arr = rng.normal(0.0, 0.1, shape)
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr.astype(np.float32)
    return hf_checkpoint.to_torch(tree)


def save_random_mlm(
    directory: str | os.PathLike,
    words: Sequence[str],
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_len: int = 64,
    seed: int = 0,
) -> str:
    """Saves a tiny random RoBERTa masked LM with a byte-level BPE tokenizer (tests, demos).

    The model is written as Hugging Face writes a ``RobertaForMaskedLM``: ``config.json`` and
    ``model.safetensors`` under PyTorch's names (the decoder tied to the word embeddings), so
    PyTorch's class loads the same directory. The tokenizer is trained on ``words`` (each
    repeated, with and without a leading space), so every given word is one token in both
    forms, like RoBERTa's ``Ġgreat``.

    Args:
      intermediate: the feed-forward width (default ``2 * hidden``).

    Returns:
      ``directory`` as a string.
    """
    transformers = _transformers()
    from safetensors.numpy import save_file
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
    config = {
        "architectures": ["RobertaForMaskedLM"],
        "model_type": "roberta",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate or 2 * hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": max_len + 2,  # RoBERTa's positions start after the pad id
        "type_vocab_size": 1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
    }
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    weights = _random_params(_config(json.dumps(config, sort_keys=True)), seed)
    save_file(weights, os.path.join(directory, _SAFE_WEIGHTS), metadata={"format": "pt"})
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
    hidden = hidden_states(model, params, batch, dropout_key=dropout_key)  # [B, L, H]
    pos = jnp.asarray(batch["mask_pos"], jnp.int32)
    return jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def _head_pre_decoder(params: PyTree, h: Array, gelu: str, eps: float) -> Array:
    head = params["lm_head"]
    x = jax.nn.gelu(tfm.dense(h, head["dense"], jnp.float32), approximate=(gelu == "tanh"))
    return tfm.layer_norm(x, head["layer_norm"], eps=eps, dtype=jnp.float32)


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
    return _head_pre_decoder(params, h, gelu, _config(model.config_json).layer_norm_eps)


def prototypes(params: PyTree, label_ids: Array) -> Array:
    """The decoder rows of the label words (tied word embeddings, no bias) -> [K, H]."""
    return _word_embeddings(params)[jnp.asarray(label_ids)]


def label_logits(model: MaskedLM, params: PyTree, h: Array, label_ids: Array) -> Array:
    """The MLM logits at the label words (exact GELU, tied decoder + bias) -> [B, K]."""
    x = _head_pre_decoder(params, h, "exact", _config(model.config_json).layer_norm_eps)
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
        rows, order = [], []
        for i in range(len(src)):
            rec = src[i]
            row = {f: _text(rec[f]) for f in task.fields}
            row["label"] = to_task.get(int(rec["label"]), -1)
            rows.append(row)
            order.append(int(rec["idx"]) if "idx" in rec else i)
        # TFDS stores GLUE shuffled; ``idx`` numbers the rows in GLUE's file order, the order
        # LM-BFF's k-shot sampler permutes (kshot_splits). Not checked byte for byte against
        # LM-BFF's released splits (no GLUE files here).
        out[s] = [rows[i] for i in sorted(range(len(rows)), key=order.__getitem__)]
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
# LM-BFF k-shot splits (spec 2.3)
# --------------------------------------------------------------------------------------------

#: The five split seeds of LM-BFF and POUF (each split's training seed too: split 16-42 trains
#: with seed 42 in the reference's run_exp.sh).
KSHOT_SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)


def kshot_splits(
    records: Sequence[Mapping[str, Any]], *, k: int = 16, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """LM-BFF's k-shot train and dev splits of a full, labeled training pool.

    The procedure of LM-BFF's ``tools/generate_k_shot_data.py`` (princeton-nlp/LM-BFF; the spec
    names only the seeds, this is the sampler that made the splits POUF trains on):

    1. permute the pool with NumPy's legacy generator seeded with ``seed``
       (``np.random.seed(seed); np.random.shuffle(lines)`` there; the same permutation as
       ``np.random.RandomState(seed).permutation(len(records))``);
    2. group the permuted records by label, the groups in order of first appearance;
    3. train = the first ``k`` of each group, dev = the next ``k`` of each group (dev is
       labeled and used only for model selection; the test split is the task's original
       evaluation split, never sampled here).

    The result is a pure function of ``(records in their given order, k, seed)``. It is NOT
    independent of the input order, and must not be: LM-BFF permutes the file's lines, so the
    pool has to be in the original file order (:func:`load_text_dataset` restores it for
    GLUE) for the splits to be LM-BFF's.

    Args:
      records: the full training pool, each with an int ``label`` >= 0.
      k: examples per class in each of train and dev.
      seed: the split seed (one of :data:`KSHOT_SEEDS` for the paper's protocol).

    Returns:
      ``(train, dev)``: shallow copies of the records, ``k`` per class each, disjoint.

    Raises:
      ValueError: ``k < 1``, an unlabeled record, or a class with fewer than ``2 * k`` records.
    """
    if k < 1:
        raise ValueError(f"k-shot needs k >= 1, got k={k}: set data.k_shot to 16 (or 0 for none)")
    labels = [int(r["label"]) for r in records]
    if any(y < 0 for y in labels):
        raise ValueError(
            "the k-shot splits need a labeled training pool (a record has no label): add "
            "labels to the train split, or set data.k_shot=0"
        )
    order = np.random.RandomState(seed).permutation(len(records))
    groups: dict[int, list[int]] = {}  # insertion order = first appearance, as LM-BFF's dict
    for i in order:
        groups.setdefault(labels[i], []).append(int(i))
    short = {y: len(g) for y, g in groups.items() if len(g) < 2 * k}
    if short:
        raise ValueError(
            f"classes {sorted(short)} have {sorted(short.values())} training records, fewer "
            f"than 2*k={2 * k} (train + dev): lower data.k_shot or use a larger pool"
        )
    train = [dict(records[i]) for g in groups.values() for i in g[:k]]
    dev = [dict(records[i]) for g in groups.values() for i in g[k : 2 * k]]
    return train, dev


def kshot_dataset(data: TextDataset, *, k: int = 16, seed: int) -> TextDataset:
    """The dataset with LM-BFF's k-shot ``train`` and ``dev`` (:func:`kshot_splits` of the full
    train split) and the original ``test`` split.

    Raises:
      ValueError: as :func:`kshot_splits`; a task label absent from the pool; or a CSV without
        held-out test rows (its test split would contain the k-shot train examples).
    """
    if data.split["test"] is data.split["train"]:
        raise ValueError(
            f"{data.source} has no held-out test rows (split=test): the k-shot protocol tests "
            "on the task's evaluation split; add them, or set data.k_shot=0"
        )
    missing = sorted(set(range(len(data.task.labels))) - {r["label"] for r in data.split["train"]})
    if missing:
        names = [data.task.labels[i] for i in missing]
        raise ValueError(
            f"label(s) {names} never occur in the train split of {data.source}: the k-shot "
            "splits need k of every class; add them, or set data.k_shot=0"
        )
    train, dev = kshot_splits(data.split["train"], k=k, seed=seed)
    split = {"train": train, "dev": dev, "test": data.split["test"]}
    return dataclasses.replace(data, split=split, source=f"{data.source} ({k}-shot, seed {seed})")


# --------------------------------------------------------------------------------------------
# Task metrics (LM-BFF's: spec 2.3 and 3.1), in NumPy
# --------------------------------------------------------------------------------------------

#: The metric each task is selected and reported on (LM-BFF's); every other task: ``acc``.
TASK_METRIC: dict[str, str] = {"mrpc": "f1", "qqp": "f1", "cola": "mcc", "stsb": "pearson"}
# STS-B is a regression task (scores in [0, 5]); it is not in TASKS yet, but its metrics are.
_REGRESSION = ("stsb",)


def _pair(labels: Any, preds: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels, dtype).ravel(), np.asarray(preds, dtype).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels {y.shape} and predictions {p.shape}: need equal, non-empty")
    return y, p


def accuracy(labels: Any, preds: Any) -> float:
    """The fraction of predictions equal to the labels (0..1)."""
    y, p = _pair(labels, preds, np.int64)
    return float(np.mean(y == p))


def f1_score(labels: Any, preds: Any, *, positive: int = 1) -> float:
    """F1 of the ``positive`` class (0..1); 0 when it has no true positive (as scikit-learn's
    ``f1_score`` with ``zero_division=0``)."""
    y, p = _pair(labels, preds, np.int64)
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(labels: Any, preds: Any) -> float:
    """Matthews correlation (-1..1), the multiclass form (Gorodkin 2004) that is the binary
    MCC for two classes; 0 when undefined (all labels or all predictions one class)."""
    y, p = _pair(labels, preds, np.int64)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    n_cls = len(classes)
    conf = np.zeros((n_cls, n_cls), np.float64)
    np.add.at(conf, (inv[: y.size], inv[y.size :]), 1.0)
    t, q = conf.sum(1), conf.sum(0)  # true and predicted counts per class
    n, correct = conf.sum(), np.trace(conf)
    cov_yp = correct * n - t @ q
    denom = np.sqrt((n * n - q @ q) * (n * n - t @ t))
    return 0.0 if denom == 0 else float(cov_yp / denom)


def pearson_corr(x: Any, y: Any) -> float:
    """Pearson correlation (-1..1); NaN when either input is constant (as SciPy)."""
    a, b = _pair(x, y, np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float("nan") if denom == 0 else float(np.clip(np.sum(a * b) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank (SciPy's ``rankdata(method="average")``)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Runs of equal values: each run's members share the mean of the run's positions.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end), 1-based
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman_corr(x: Any, y: Any) -> float:
    """Spearman rank correlation (Pearson of the average ranks); NaN for a constant input."""
    a, b = _pair(x, y, np.float64)
    return pearson_corr(_average_ranks(a), _average_ranks(b))


def main_metric(task: str) -> str:
    """The metric a task is selected and reported on: ``f1`` (MRPC, QQP), ``mcc`` (CoLA),
    ``pearson`` (STS-B), else ``acc``."""
    return TASK_METRIC.get(task, "acc")


def task_metrics(task: str, labels: Any, preds: Any) -> dict[str, float]:
    """LM-BFF's metrics of a task, in percent (x100, 2 decimals).

    ``acc`` always, except for regression (STS-B: ``pearson`` and ``spearman`` of the predicted
    and gold scores); ``f1`` of the positive class (label 1: equivalent / duplicate) for MRPC
    and QQP; ``mcc`` for CoLA.
    """
    if task in _REGRESSION:
        out = {"pearson": pearson_corr(labels, preds), "spearman": spearman_corr(labels, preds)}
    else:
        out = {"acc": accuracy(labels, preds)}
        if main_metric(task) == "f1":
            out["f1"] = f1_score(labels, preds, positive=1)
        elif main_metric(task) == "mcc":
            out["mcc"] = matthews_corrcoef(labels, preds)
    return {k: round(100.0 * v, 2) for k, v in out.items()}


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


def _predictor(model: MaskedLM, task: TextTask, batch_size: int):
    """``predict(params, records_or_encoded) -> [N] int`` label predictions, jitted once."""
    label_ids = jnp.asarray(label_word_ids(model.tokenizer, task.words))

    @jax.jit
    def step(params, batch):
        h = mask_hidden(model, params, batch)
        return jnp.argmax(label_logits(model, params, h, label_ids), axis=-1)

    def predict(params: PyTree, enc: Mapping[str, np.ndarray]) -> np.ndarray:
        n_all, out = len(enc["input_ids"]), []
        for i in range(0, n_all, batch_size):
            b = {k: v[i : i + batch_size] for k, v in enc.items()}
            n = len(b["input_ids"])
            if n < batch_size:  # pad to a fixed shape: one compilation
                b = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)])
                     for k, v in b.items()}  # fmt: skip
            out.append(np.asarray(step(params, b))[:n])
        return np.concatenate(out)

    return predict


def _labeled(records: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], np.ndarray]:
    rows = [r for r in records if r["label"] >= 0]
    return rows, np.asarray([r["label"] for r in rows], np.int32)


def evaluate(
    model: MaskedLM,
    params: PyTree,
    records: Sequence[Mapping[str, Any]],
    *,
    task: TextTask,
    batch_size: int = 32,
) -> dict[str, float]:
    """The task's metrics (:func:`task_metrics`, percent) of the prompt's predictions on the
    labeled ``records``.

    Raises:
      ValueError: no labeled record.
    """
    rows, labels = _labeled(records)
    if not rows:
        raise ValueError(f"no labeled {task.name} records to evaluate: add a label column")
    preds = _predictor(model, task, batch_size)(params, encode(task, model.tokenizer, rows))
    return task_metrics(task.name, labels, preds)


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
    select_on_dev: bool = True,
    select_with_target_labels: bool = False,
    zero_shot: bool = True,
    log_every: int = 50,
    metrics_path: str | None = None,
    log_fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """POUF on the unlabeled ``train`` split; the task's metrics on ``test`` before and after.

    Model selection (spec 2.3):

    * ``pouf``: the LAST step, label-free; always reported.
    * ``pouf_best_by_dev`` (``select_on_dev``, the reference's protocol): the step with the best
      main metric (:func:`main_metric`) on the labeled ``dev`` split (LM-BFF's k-shot dev,
      :func:`kshot_dataset`), evaluated every ``eval_every`` steps and at the end; the earliest
      wins a tie. Only dev labels are read for it: the test split is evaluated once, after
      training, with the selected parameters.
    * ``pouf_best_by_target_labels`` (``select_with_target_labels``, off by default): the same
      selection on the TEST labels. That is label leakage (an oracle upper bound), kept only to
      compare with numbers that were selected that way; never report it as POUF's result.

    Args:
      model: the masked LM.
      data: ``train`` (labels never read), ``test`` (labeled), and ``dev`` (labeled) when
        ``select_on_dev``.
      steps, batch_size, lr: the optimisation (AdamW, linear decay to 0 over ``steps``).
      w_transport, w_info, scale, feature_gelu: the loss (:func:`pouf_mlm_loss`).
      dropout: RoBERTa's dropout during training.
      seed: the batch order and dropout.
      eval_every: steps between selection evaluations.
      eval_batch_size: evaluation batch.
      select_on_dev: select on the dev split.
      select_with_target_labels: also select on the test labels (label leakage).
      zero_shot: evaluate the untrained prompt on test too (``zero_shot`` entry).
      log_every: steps between training-loss lines.
      metrics_path: ``metrics.jsonl`` to append the training and dev lines to.
      log_fields: extra fields for every line there (e.g. the seed).

    Returns:
      ``{"metric": main metric name, "metrics": {"zero_shot", "pouf", "pouf_best_by_dev",
      ...: {metric: percent}}, "best_step_by_dev", "dev_curve": [{"step", metric}], "selection",
      "task", "steps", "batch_size", "n_train", "n_dev", "n_test", "wall_time_s"}``, with the
      last parameters under ``"params"`` and the dev-selected ones under
      ``"best_params_by_dev"``.

    Raises:
      ValueError: too few training sentences, no labeled test split, or ``select_on_dev``
        without a labeled dev split (each message names the fix).
    """
    tok = model.tokenizer
    task = data.task
    metric = main_metric(task.name)
    label_ids = jnp.asarray(label_word_ids(tok, task.words))
    if len(data.split["train"]) < batch_size:
        raise ValueError(
            f"{len(data.split['train'])} training sentences < batch {batch_size}: lower "
            "optim.batch_size or add sentences"
        )
    train = encode(task, tok, data.split["train"])
    test_rows, test_labels = _labeled(data.split["test"])
    if not test_rows:
        raise ValueError(f"the test split of {data.source} has no labels: add a label column")
    test = encode(task, tok, test_rows)
    dev_rows, dev_labels = _labeled(data.split.get("dev", []))
    if select_on_dev and not dev_rows:
        raise ValueError(
            f"{data.source} has no labeled dev split to select on: build the k-shot splits "
            "(data.k_shot=16, kshot_dataset) or set select_on_dev=False (last step)"
        )
    dev = encode(task, tok, dev_rows) if select_on_dev else None
    predict = _predictor(model, task, eval_batch_size)
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

    def on_test(params) -> dict[str, float]:
        return task_metrics(task.name, test_labels, predict(params, test))

    t0 = time.time()
    params = model.params
    results: dict[str, dict[str, float]] = {}
    if zero_shot:
        results["zero_shot"] = on_test(params)
        log.info("%s zero-shot (prompt, no training): %s", task.name, results["zero_shot"])
    opt_state = tx.init(params)
    key = jax.random.key(seed)
    extra = dict(log_fields or {})
    # (score, step, host params); strict ">" below keeps the earliest of equal scores.
    by_dev: tuple[float, int, Any] = (-math.inf, 0, None)
    by_test: tuple[float, int, dict[str, float]] = (-math.inf, 0, {})
    curve: list[dict[str, Any]] = []
    # Through epath, rewritten whole at each logged step: an object store (gs://) cannot
    # append, and the file is small (one line per logged step).
    out = epath.Path(metrics_path) if metrics_path else None
    logged = [out.read_text()] if out is not None and out.exists() else []

    def write(rec: dict[str, Any]) -> None:
        if out is not None and jax.process_index() == 0:
            logged.append(json.dumps({**rec, **extra}) + "\n")
            out.write_text("".join(logged))

    batches = _batches(len(train["input_ids"]), batch_size, seed)
    for t, idx in zip(range(steps), batches, strict=False):
        # The batch holds the template inputs only: no label reaches the step.
        batch = {k: v[idx] for k, v in train.items()}
        params, opt_state, m = step(params, opt_state, batch, jax.random.fold_in(key, t))
        done = t + 1
        if done % log_every == 0 or done == steps:
            rec = {"step": done, **{k: float(v) for k, v in m.items()}}
            log.info("pouf_mlm step %d/%d %s", done, steps, json.dumps(rec))
            write(rec)
        if done % eval_every != 0 and done != steps:
            continue
        if dev is not None:  # the dev labels only
            score = task_metrics(task.name, dev_labels, predict(params, dev))[metric]
            curve.append({"step": done, metric: score})
            write({"step": done, f"eval/dev_{metric}": score})
            if score > by_dev[0]:
                by_dev = (score, done, jax.device_get(params))
        if select_with_target_labels:  # label leakage, opt-in
            on = on_test(params)
            if on[metric] > by_test[0]:
                by_test = (on[metric], done, on)
    results["pouf"] = on_test(params)
    result: dict[str, Any] = {"metric": metric, "metrics": results}
    selection = ["last step as 'pouf' (label-free)"]
    if dev is not None:
        best_params = params if by_dev[1] == steps else by_dev[2]
        results["pouf_best_by_dev"] = (
            results["pouf"] if by_dev[1] == steps else on_test(best_params)
        )
        result.update(best_step_by_dev=by_dev[1], dev_curve=curve, best_params_by_dev=best_params)
        selection.append(f"best {metric} on the labeled k-shot dev split as 'pouf_best_by_dev'")
    if select_with_target_labels:
        results["pouf_best_by_target_labels"] = by_test[2]
        result["best_step_by_target_labels"] = by_test[1]
        selection.append(
            "best on the TEST labels as 'pouf_best_by_target_labels' (label leakage, an oracle)"
        )
    result.update(
        selection="; ".join(selection), task=task.name, steps=steps, batch_size=batch_size,
        n_train=len(train["input_ids"]), n_dev=len(dev_rows) if dev is not None else 0,
        n_test=len(test_labels), wall_time_s=round(time.time() - t0, 1), params=params,
    )  # fmt: skip
    return result
