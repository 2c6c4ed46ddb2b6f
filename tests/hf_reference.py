"""transformers' PyTorch ``CLIPModel`` as the independent reference for the frozen towers.

:func:`torch_clip` builds it from a :class:`~jaxprompt.clip.Clip`'s config and holds the Clip's
own parameters (which tests may have modified, e.g. sharpened kernels), converted here from
Hugging Face's Flax layout to PyTorch's names by a mapping written for the tests, apart from the
library's loader. The model runs in float32 (as the Flax reference it replaces did); features
come back as float64 NumPy arrays.
"""

from __future__ import annotations

import json

import numpy as np


def _torch_names(tree, prefix=""):
    """Flat PyTorch state-dict names and arrays for a Flax-layout CLIP tree."""
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _torch_names(v, name + ".")
            continue
        a = np.asarray(v, np.float32)
        if k == "kernel" and a.ndim == 4:  # conv HWIO -> OIHW
            yield prefix + "weight", a.transpose(3, 2, 0, 1)
        elif k == "kernel":  # dense [in, out] -> Linear [out, in]
            yield prefix + "weight", a.T
        elif k in ("scale", "embedding"):  # LayerNorm, Embedding
            yield prefix + "weight", a
        else:
            yield name, a


def torch_clip(clip):
    """An eval-mode PyTorch ``CLIPModel`` with ``clip``'s config and parameters (float32:
    transformers' causal mask does not build in float64)."""
    import torch
    import transformers

    config = transformers.CLIPConfig.from_dict(json.loads(clip.spec.config_json))
    model = transformers.CLIPModel(config).eval()
    state = {k: torch.tensor(v, dtype=torch.float32) for k, v in _torch_names(clip.params)}
    want = set(model.state_dict())
    extra = set(state) - want
    missing = {k for k in want - set(state) if not k.endswith("position_ids")}
    assert not extra and not missing, (sorted(extra)[:3], sorted(missing)[:3])
    model.load_state_dict(state, strict=False)
    return model


def _tensor(out):
    # transformers 5 may return a model output with the features in pooler_output.
    if hasattr(out, "numpy"):
        return out
    for name in ("text_embeds", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise TypeError(f"unexpected feature output {type(out).__name__}")


def text_features(model, ids) -> np.ndarray:
    """``get_text_features`` of token ids [N, L] (EOT = the first end-of-text token)."""
    import torch

    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long))
    return _tensor(out).numpy().astype(np.float64)


def image_features(model, images) -> np.ndarray:
    """``get_image_features`` of NHWC images (in the model's dtype)."""
    import torch

    dtype = next(model.parameters()).dtype
    pix = torch.tensor(np.asarray(images).transpose(0, 3, 1, 2)).to(dtype)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pix)
    return _tensor(out).numpy().astype(np.float64)
