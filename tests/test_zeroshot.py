"""Zero-shot CLIP against an independent computation with transformers' PyTorch CLIPModel."""

import hf_reference
import jax
import numpy as np
import pytest
from conftest import CLASSNAMES

import jaxprompt as jp


@pytest.fixture(scope="module")
def hf(tiny_clip, tiny_clip_dir):
    """transformers' PyTorch CLIP and transformers' own tokenizer of the same directory (the
    reference does not share jaxprompt's tokenizer)."""
    import transformers

    return hf_reference.torch_clip(tiny_clip), transformers.AutoTokenizer.from_pretrained(
        str(tiny_clip_dir)
    )


def _hf_classifier(model, tok, templates, names):
    per_template = []
    for t in templates:
        ids = tok(
            [t.format(n.replace("_", " ")) for n in names], padding="max_length", max_length=77
        )["input_ids"]
        f = hf_reference.text_features(model, ids)
        per_template.append(f / np.linalg.norm(f, axis=-1, keepdims=True))
    mean = np.mean(per_template, axis=0)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def _hf_logits(hf, clip, templates, names, images):
    """Zero-shot logits computed with transformers' PyTorch CLIP (the independent reference)."""
    model, tok = hf
    txt = _hf_classifier(model, tok, templates, names)
    img = hf_reference.image_features(model, images)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    return np.exp(float(clip.params["logit_scale"])) * img @ txt.T


@pytest.mark.parametrize(
    "templates", [("a photo of a {}.",), ("a photo of a {}.", "itap of the {}.", "{} dotted.")]
)
def test_zeroshot_logits_equal_hf_ensemble(tiny_clip, hf, images, templates):
    names = CLASSNAMES[:-1] + ["red_fish"]  # underscores become spaces
    task = jp.make_task(tiny_clip, names)
    method = jp.methods.get("zeroshot", templates=templates)
    logits = method.logits(method.init(jax.random.key(0), tiny_clip, task), tiny_clip, task, images)
    ref = _hf_logits(hf, tiny_clip, templates, names, images)
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_zeroshot_chunks_and_named_sets(tiny_clip, tiny_task, images):
    a = jp.methods.zeroshot(templates="imagenet_select_7")
    b = jp.methods.zeroshot(templates="imagenet_select_7", chunk=3)
    la = a.logits({}, tiny_clip, tiny_task, images)
    lb = jax.jit(b.logits)({}, tiny_clip, tiny_task, images)
    np.testing.assert_allclose(la, lb, atol=1e-4)
    assert len(a.config["templates"]) == 7


def test_template_lists():
    t = jp.templates
    assert len(t.IMAGENET_80) == len(set(t.IMAGENET_80)) == 80
    assert t.IMAGENET_80[39] == "a photo of a {}."
    assert t.PROMPTSRC_60[0] == "a photo of a {}." and len(t.PROMPTSRC_60) == 60
    assert t.PROMPTSRC_60[-1] == "itap of the {}." and "a photo of a {}." not in t.PROMPTSRC_60[1:]
    assert set(t.IMAGENET_SELECT_7) <= set(t.IMAGENET_80)


def test_bad_templates_and_unknown_method():
    with pytest.raises(ValueError, match="imagenet_80"):
        jp.methods.zeroshot(templates="no such set")
    with pytest.raises(ValueError, match="coop"):
        jp.methods.get("copo")
    with pytest.raises(ValueError, match="bad arguments"):
        jp.methods.get("coop", n_cxt=4)
    assert {"zeroshot", "coop"} <= set(jp.methods.names())


def test_dataset_template_comes_from_the_task(tiny_clip, hf, images):
    """templates="dataset" (the protocols' zero-shot baseline, protocol.md 1.2) uses each task's
    own template: one method, a different template per dataset, each equal to HF's features of
    that template's sentences."""
    method = jp.methods.get("zeroshot", templates="dataset")
    for template in ("{} texture.", "a centered satellite photo of {}."):
        task = jp.make_task(tiny_clip, CLASSNAMES, template=template)
        logits = method.logits({}, tiny_clip, task, images)
        ref = _hf_logits(hf, tiny_clip, (template,), CLASSNAMES, images)
        np.testing.assert_allclose(logits, ref, atol=1e-4)
    assert method.config["templates"] == "dataset"
    with pytest.raises(ValueError, match="template="):
        method.logits({}, tiny_clip, jp.make_task(tiny_clip, CLASSNAMES), images)
    with pytest.raises(ValueError, match="no '{}'"):
        jp.make_task(tiny_clip, CLASSNAMES, template="a photo")


def test_protocol_zero_shot_runs_use_the_dataset_template(tiny_clip_dir, tmp_path):
    """The runner gives every task its dataset's template: a toy dataset registered with
    another template gets a different zero-shot accuracy than with the generic one, equal to
    the zero-shot method told that template explicitly."""
    import dataclasses
    import json

    from jaxprompt import cli
    from jaxprompt.data import catalog

    spec = catalog.get_dataset("toy_textures")
    catalog.register(dataclasses.replace(spec, name="toy_textures_tmpl", template="{} dotted."))
    try:
        accuracy = {}
        for label, extra in (
            ("dataset", []),
            ("explicit", ["--config.method.kw.templates={} dotted."]),
            ("generic", ["--config.method.kw.templates=a photo of a {}."]),
        ):
            workdir = str(tmp_path / label)
            args = ["jaxprompt", "train", "--config",
                    "fewshot:zeroshot,dataset=toy_textures_tmpl,runlocal=true",
                    "--config.clip.name=toy", *extra,
                    "--workdir", workdir]  # fmt: skip
            assert cli.main(args) == 0
            accuracy[label] = json.load(open(f"{workdir}/results.json"))["accuracy"]["test"]
    finally:
        catalog.DATASETS.pop("toy_textures_tmpl")
    assert accuracy["dataset"] == accuracy["explicit"] != accuracy["generic"], accuracy
