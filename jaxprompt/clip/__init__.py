"""The frozen CLIP: loading, class sets, and prompt-aware text and image towers, in plain JAX.

The towers are the project's own pure functions over parameters in Hugging Face's Flax CLIP
layout (so any checkpoint a user holds, Hugging Face or OpenAI, loads into them). Methods never
touch the layers: they build prompt tensors and call :func:`encode_text` /
:func:`encode_text_shared` / :func:`prompted_text_features` and :func:`encode_image`.

By concern:

* :mod:`jaxprompt.clip.model`: :class:`Clip`, :class:`ClipSpec`, :class:`Task`, the config.
* :mod:`jaxprompt.clip.loading`: :func:`load_clip` (hub ids, Hugging Face directories, OpenAI
  ``.pt`` files), :func:`from_openai_state_dict`, :func:`from_params`.
* :mod:`jaxprompt.clip.tokens`: :class:`Tokenizer`, :func:`load_tokenizer`, :func:`tokenize`,
  :func:`make_task`, :func:`openai_tokenizer`, and the checks that a prompt fits the model.
* :mod:`jaxprompt.clip.text`: the text tower (one block, a shared prefix as an argument).
* :mod:`jaxprompt.clip.image`: the ViT and (through :mod:`jaxprompt.resnet`) ResNet towers.
"""

from jaxprompt.clip.image import encode_image
from jaxprompt.clip.loading import from_openai_state_dict, from_params, load_clip
from jaxprompt.clip.model import (
    CheckpointLoadError,
    Clip,
    ClipLoadError,
    ClipSpec,
    Task,
    logit_scale,
    normalize,
    weights_id,
)
from jaxprompt.clip.text import (
    embed_tokens,
    encode_text,
    encode_text_shared,
    encode_token_ids,
    prompted_text_features,
    prompted_text_inputs,
    shared_text_inputs,
)
from jaxprompt.clip.tokens import (
    BPE_VOCAB,
    VIT_BACKBONES,
    Tokenizer,
    check_context,
    check_depth,
    check_vision_prompts,
    load_tokenizer,
    make_task,
    openai_tokenizer,
    tokenize,
)

__all__ = [
    "BPE_VOCAB",
    "CheckpointLoadError",
    "Clip",
    "ClipLoadError",
    "ClipSpec",
    "Task",
    "Tokenizer",
    "VIT_BACKBONES",
    "check_context",
    "check_depth",
    "check_vision_prompts",
    "embed_tokens",
    "encode_image",
    "encode_text",
    "encode_text_shared",
    "encode_token_ids",
    "from_openai_state_dict",
    "from_params",
    "load_clip",
    "load_tokenizer",
    "logit_scale",
    "make_task",
    "normalize",
    "openai_tokenizer",
    "prompted_text_features",
    "prompted_text_inputs",
    "shared_text_inputs",
    "tokenize",
    "weights_id",
]
