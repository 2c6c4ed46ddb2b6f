"""jaxprompt: prompt learning for a frozen CLIP in JAX.

The public surface (everything else is private and may change without notice)::

    import jaxprompt as jp
    clip = jp.load_clip("openai/clip-vit-base-patch16")   # hub id or local HF directory
    task = jp.make_task(clip, ["cat", "golden retriever"])
    method = jp.methods.get("coop", n_ctx=4, init_words="a photo of a")
    prompt = method.init(key, clip, task)
    logits = method.logits(prompt, clip, task, images)   # [B, C]
"""

from jaxprompt import methods, templates
from jaxprompt.clip import (
    Clip,
    ClipLoadError,
    ClipSpec,
    Task,
    encode_image,
    encode_text,
    load_clip,
    make_task,
)
from jaxprompt.methods import PromptMethod

__version__ = "0.1.0.dev0"

__all__ = [
    "Clip",
    "ClipLoadError",
    "ClipSpec",
    "PromptMethod",
    "Task",
    "encode_image",
    "encode_text",
    "load_clip",
    "make_task",
    "methods",
    "templates",
]
