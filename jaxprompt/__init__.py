"""jaxprompt: prompt learning for a frozen CLIP in JAX.

The public surface (everything else is private and may change without notice)::

    import jaxprompt as jp
    clip = jp.load_clip("openai/clip-vit-base-patch16")   # hub id or local HF directory,
                                                          # or "RN50", "ViT-B/16", a .pt file
    task = jp.make_task(clip, ["cat", "golden retriever"])
    method = jp.methods.get("coop", n_ctx=4, init_words="a photo of a")
    prompt = method.init(key, clip, task)
    logits = method.logits(prompt, clip, task, images)   # [B, C]
"""

# Everything loads on first use: `import jaxprompt` itself imports neither jax nor
# transformers (the command answers --help at once), and research code that only needs the
# methods does not import the data and checkpoint stack (orbax, grain).
_LAZY = {
    "backbones": "jaxprompt.backbones",
    "methods": "jaxprompt.methods",
    "templates": "jaxprompt.templates",
    "testing": "jaxprompt.testing",
    "checkpoint": "jaxprompt.checkpoint",
    "evaluate": "jaxprompt.evaluate",
    "sharding": "jaxprompt.sharding",
    "train": "jaxprompt.train",
    "gpa": "jaxprompt.gpa",
    "losses": "jaxprompt.losses",
    "data": "jaxprompt.data",
    "share": "jaxprompt.share",
}
_LAZY_NAMES = {
    "Clip": "jaxprompt.clip",
    "ClipLoadError": "jaxprompt.clip",
    "ClipSpec": "jaxprompt.clip",
    "Task": "jaxprompt.clip",
    "encode_image": "jaxprompt.clip",
    "encode_text": "jaxprompt.clip",
    "load_clip": "jaxprompt.clip",
    "make_task": "jaxprompt.clip",
    "load_prompt": "jaxprompt.share",
    "PromptMethod": "jaxprompt.methods",
    "TrainState": "jaxprompt.train",
    "init_train_state": "jaxprompt.train",
    "make_train_step": "jaxprompt.train",
    "make_optimizer": "jaxprompt.train",
    "fit": "jaxprompt.train",
    "make_eval_step": "jaxprompt.evaluate",
    "make_mesh": "jaxprompt.sharding",
    "put_batch": "jaxprompt.sharding",
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'jaxprompt' has no attribute {name!r}")


__version__ = "0.1.0.dev0"

__all__ = [
    "Clip",
    "TrainState",
    "backbones",
    "checkpoint",
    "data",
    "evaluate",
    "fit",
    "gpa",
    "init_train_state",
    "losses",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "put_batch",
    "share",
    "sharding",
    "train",
    "ClipLoadError",
    "ClipSpec",
    "PromptMethod",
    "Task",
    "encode_image",
    "encode_text",
    "load_clip",
    "load_prompt",
    "make_task",
    "methods",
    "templates",
]
