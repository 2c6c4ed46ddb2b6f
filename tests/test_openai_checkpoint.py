"""OpenAI-format CLIP checkpoints (issue 19, part 1): the bundled BPE tokenizer, and ViT
checkpoints saved as a torch state dict or a TorchScript archive, read without running code.

The tokenizer reference below is an independent byte-level BPE written in this file from the
algorithm's description (OpenAI's ``clip.tokenize``: clean HTML entities and whitespace, lower
case, split words with CLIP's pattern, merge byte pairs by rank, ``<|startoftext|>`` 49406 and
``<|endoftext|>`` 49407, context 77). A PyPI implementation (open_clip's SimpleTokenizer) was not
used: it imports ``ftfy``, which this environment lacks, and the package would pull torchvision
and timm into the test extra. ``ftfy.fix_text`` only changes mojibake and non-ASCII text; the
class names checked here are asserted to be ASCII, where it is the identity.
"""

import functools
import gzip
import html
import importlib.resources
import os
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import testing

ATOL = 1e-5


def _features(out) -> np.ndarray:
    """``CLIPModel.get_*_features``'s result as NumPy: transformers 4 returns the projected
    tensor, transformers 5 a model output holding it as ``pooler_output``."""
    return (out if hasattr(out, "numpy") else out.pooler_output).numpy()


# ------------------------------------------------------------------------------------------------
# An independent CLIP BPE tokenizer (the reference)
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _reference_tables():
    raw = importlib.resources.files("jaxprompt").joinpath("assets/bpe_simple_vocab_16e6.txt.gz")
    text = gzip.decompress(raw.read_bytes()).decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n")[1:48895]]
    # Byte -> printable symbol: bytes that print in Latin-1 (except space and the soft hyphen
    # region) keep their code point; every other byte gets 256 + (its rank among those).
    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or b >= 174]
    others = [b for b in range(256) if b not in printable]
    byte_sym = {b: chr(b) for b in printable}
    byte_sym.update({b: chr(256 + i) for i, b in enumerate(others)})
    order = [byte_sym[b] for b in printable + others]
    tokens = order + [s + "</w>" for s in order] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {t: i for i, t in enumerate(tokens)}
    ranks = {m: i for i, m in enumerate(merges)}
    return byte_sym, encoder, ranks


def _reference_bpe(word: str) -> list[str]:
    byte_sym, _, ranks = _reference_tables()
    syms = [byte_sym[b] for b in word.encode("utf-8")]
    syms[-1] += "</w>"
    while len(syms) > 1:
        pairs = [(ranks.get((syms[i], syms[i + 1]), 1 << 30), i) for i in range(len(syms) - 1)]
        best, _ = min(pairs)
        if best == 1 << 30:
            break
        pair = min(p for p in pairs if p[0] == best)
        a, b = syms[pair[1]], syms[pair[1] + 1]
        merged, i = [], 0
        while i < len(syms):  # merge every occurrence of the best pair, left to right
            if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(syms[i])
                i += 1
        syms = merged
    return syms


def reference_tokenize(text: str, context: int = 77) -> np.ndarray:
    import regex

    _, encoder, _ = _reference_tables()
    text = html.unescape(html.unescape(text))
    text = " ".join(text.split()).strip().lower()
    pattern = (
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
        r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    )
    ids = [49406]
    for word in regex.findall(pattern, text, regex.IGNORECASE):
        ids += [encoder[s] for s in _reference_bpe(word)]
    ids.append(49407)
    assert len(ids) <= context
    out = np.zeros(context, np.int64)
    out[: len(ids)] = ids
    return out


def _catalog_classnames() -> dict[str, list[str]]:
    """Class names of every catalog dataset that can be listed offline: TFDS label names (from
    the builders' metadata, no data needed) through the catalog's label rules, and the toy world.
    FGVCAircraft and UCF101 read their names from the user's raw files, so they are not here."""
    import tempfile

    import tensorflow_datasets as tfds

    from jaxprompt import data
    from jaxprompt.data import catalog

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in catalog.DATASETS.values():
            if spec.tfds and spec.labels:
                builder = tfds.builder(spec.tfds.split(":")[0], data_dir=tmp)
                names, _ = spec.labels(builder.info.features["label"].names)
                out[spec.name] = list(names)
            elif spec.generator is not None:
                out[spec.name] = list(data.load_dataset(spec.name).classnames)
    return out


def test_reference_matches_known_clip_ids():
    # ids of OpenAI's clip.tokenize("a photo of a cat.") and ("a photo of a dog.")
    want = [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert list(reference_tokenize("a photo of a cat.")[:8]) == want
    assert list(reference_tokenize("A  photo of a DOG.")[:8]) == want[:5] + [1929, 269, 49407]


def test_bundled_tokenizer_equals_reference_on_every_catalog_dataset():
    tok = clip_lib.openai_tokenizer()
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    by_dataset = _catalog_classnames()
    assert {"ImageNet", "Caltech101", "Food101", "SUN397", "toy_textures"} <= set(by_dataset)
    texts = sorted(
        {
            f"a photo of a {n.replace('_', ' ')}." if u else f"a photo of a {n}."
            for names in by_dataset.values()
            for n in names
            for u in (True, False)
        }
    )
    assert len(texts) > 2000 and all(t.isascii() for t in texts)
    rows = tok(texts, add_special_tokens=True)["input_ids"]
    for text, row in zip(texts, rows, strict=True):
        ref = reference_tokenize(text)
        got = np.zeros(77, np.int64)
        got[: len(row)] = row
        np.testing.assert_array_equal(got, ref, err_msg=text)


# ------------------------------------------------------------------------------------------------
# A tiny random ViT CLIP in OpenAI's layout
# ------------------------------------------------------------------------------------------------


def _tiny_pt_model():
    import torch
    import transformers

    text = dict(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    vision = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, hidden_act="quick_gelu",
    )  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1/0: make every weight matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_to_openai(sd: dict) -> dict:
    """Hugging Face CLIPModel state dict -> OpenAI's names (written for this test)."""
    out = {}

    def tower(hf, oa, n_layers):
        for i in range(n_layers):
            h, o = f"{hf}encoder.layers.{i}.", f"{oa}transformer.resblocks.{i}."
            out[o + "attn.in_proj_weight"] = np.concatenate(
                [sd[f"{h}self_attn.{x}_proj.weight"] for x in "qkv"]
            )
            out[o + "attn.in_proj_bias"] = np.concatenate(
                [sd[f"{h}self_attn.{x}_proj.bias"] for x in "qkv"]
            )
            for hn, on in (
                ("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
            ):  # fmt: skip
                for wb in ("weight", "bias"):
                    out[f"{o}{on}.{wb}"] = sd[f"{h}{hn}.{wb}"]

    n_text = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder."))
    n_vis = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder."))
    tower("text_model.", "", n_text)
    tower("vision_model.", "visual.", n_vis)
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    for wb in ("weight", "bias"):
        out[f"ln_final.{wb}"] = sd[f"text_model.final_layer_norm.{wb}"]
        out[f"visual.ln_pre.{wb}"] = sd[f"vision_model.pre_layrnorm.{wb}"]
        out[f"visual.ln_post.{wb}"] = sd[f"vision_model.post_layernorm.{wb}"]
    out["text_projection"] = sd["text_projection.weight"].T.copy()
    out["visual.proj"] = sd["visual_projection.weight"].T.copy()
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["logit_scale"] = sd["logit_scale"]
    return out


@pytest.fixture(scope="module")
def pt_model():
    return _tiny_pt_model()


@pytest.fixture(scope="module")
def openai_files(pt_model, tmp_path_factory):
    import torch

    sd = {k: v.detach().numpy().copy() for k, v in pt_model.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    oa = hf_to_openai(sd)
    d = tmp_path_factory.mktemp("openai")
    state = d / "ViT-tiny-state.pt"
    torch.save({k: torch.tensor(v) for k, v in oa.items()}, state)
    script = d / "ViT-tiny-jit.pt"
    testing.save_torchscript(oa, script)
    return {"state_dict": str(state), "torchscript": str(script), "tensors": oa}


def test_torchscript_archive_is_a_zip_with_data_pkl(openai_files):
    names = zipfile.ZipFile(openai_files["torchscript"]).namelist()
    assert any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def test_reader_returns_the_saved_tensors(openai_files):
    from jaxprompt import openai_checkpoint as oc

    for kind in ("state_dict", "torchscript"):
        got = oc.read_state_dict(openai_files[kind])
        assert set(got) == set(openai_files["tensors"]), kind
        for k, v in openai_files["tensors"].items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{kind}: {k}")


def test_reader_handles_half_bfloat16_and_strided_tensors(tmp_path):
    import torch

    from jaxprompt import openai_checkpoint as oc

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "half": base.half(),  # OpenAI's TorchScript archives hold float16 weights
        "bf16": base.bfloat16(),
        "view": base.t()[1:3],  # a strided view with an offset into a shared storage
        "scalar": torch.tensor(4.6052),
        "ints": torch.arange(5),
    }
    torch.save(sd, tmp_path / "mixed.pt")
    got = oc.read_state_dict(str(tmp_path / "mixed.pt"))
    for k, v in sd.items():
        assert got[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(np.asarray(got[k], np.float64), v.double().numpy(), k)
    assert got["half"].dtype == np.float16 and got["ints"].dtype == np.int64


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_openai_checkpoint_features_equal_pytorch_clip(kind, openai_files, pt_model):
    import torch

    clip = jp.load_clip(openai_files[kind])
    assert clip.spec.patch_size == 8 and clip.spec.image_size == 32
    assert clip.spec.text_layers == 2 and clip.spec.vision_width == 128
    assert (clip.spec.sot_id, clip.spec.eot_id) == (49406, 49407)
    texts = ["a photo of a golden retriever.", "a photo of a cat.", "a photo of a tench."]
    ids77, _ = clip_lib.tokenize(clip, texts, pad_to=77)
    np.testing.assert_array_equal(ids77[0, :3], [49406, 320, 1125])
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_t = pt_model.get_text_features(input_ids=torch.tensor(ids77, dtype=torch.long))
        ref_i = pt_model.get_image_features(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
    ids, eot = clip_lib.tokenize(clip, texts)
    got_t = clip_lib.encode_token_ids(clip, jnp.asarray(ids), jnp.asarray(eot))
    np.testing.assert_allclose(got_t, _features(ref_t), atol=ATOL)
    np.testing.assert_allclose(clip_lib.encode_image(clip, images), _features(ref_i), atol=ATOL)
    np.testing.assert_allclose(
        float(clip_lib.logit_scale(clip)), float(pt_model.logit_scale.detach().exp()), rtol=1e-6
    )


def test_zeroshot_runs_on_an_openai_checkpoint(openai_files):
    import jax

    clip = jp.load_clip(openai_files["torchscript"])
    task = jp.make_task(clip, ["golden retriever", "tabby cat", "tench"])
    method = jp.methods.get("zeroshot")
    prompt = method.init(jax.random.PRNGKey(0), clip, task)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    logits = method.logits(prompt, clip, task, jnp.asarray(images))
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(clip_lib.ClipLoadError) as e:
        jp.load_clip(str(path))
    assert "not a PyTorch zip checkpoint" in _one_line(e)
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("broken/data.pkl", b"\x80\x02garbage")
    with pytest.raises(clip_lib.ClipLoadError) as e:
        jp.load_clip(str(broken))
    assert "could not read" in _one_line(e)


def test_state_dict_of_another_model_is_a_one_line_error(tmp_path):
    import torch

    path = tmp_path / "resnet18.pt"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError) as e:
        jp.load_clip(str(path))
    assert "not an OpenAI CLIP checkpoint" in _one_line(e)


def test_self_referencing_pickle_is_a_one_line_error(tmp_path):
    loop: dict = {}
    loop["visual"] = loop
    path = tmp_path / "loop.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("loop/data.pkl", pickle.dumps(loop, protocol=2))
    with pytest.raises(clip_lib.ClipLoadError) as e:
        jp.load_clip(str(path))
    assert "64 deep" in _one_line(e)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "zip"])
def test_code_in_the_pickle_is_refused_and_never_runs(how, tmp_path):
    import torch

    marker = tmp_path / "pwned_X"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"visual.conv1.weight": torch.zeros(2), "x": _Evil(marker)}, path)
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("evil/data.pkl", pickle.dumps({"x": _Evil(marker)}, protocol=2))
            z.writestr("evil/version", "3\n")
    assert zipfile.is_zipfile(path)
    with pytest.raises(clip_lib.ClipLoadError) as e:
        jp.load_clip(str(path))
    assert "refused" in _one_line(e) and "system" in str(e.value)
    assert not marker.exists()


def test_incomplete_resnet_checkpoint_is_a_one_line_value_error(tmp_path, openai_files):
    """A ResNet tower (loaded since issue 19 part 2; tests/test_resnet.py) missing its tensors."""
    import torch

    sd = {k: torch.tensor(v) for k, v in openai_files["tensors"].items() if "visual." not in k}
    sd["visual.conv1.weight"] = torch.zeros(4, 3, 3, 3)
    sd["visual.layer1.0.conv1.weight"] = torch.zeros(4, 4, 1, 1)
    path = tmp_path / "RN50.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        jp.load_clip(str(path))
    assert "lacks tensor" in _one_line(e)


def test_same_weights_from_the_pt_file_or_hf_format_share_a_fingerprint(
    openai_files, pt_model, tmp_path
):
    """A prompt trained on "ViT-B/16" found as OpenAI's file must load where the name falls
    back to the hub's Hugging Face copy: the architecture fingerprint ignores config entries
    that only the conversion differs in (init values, "architectures")."""
    from jaxprompt import share

    pt_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    clip_lib.openai_tokenizer().save_pretrained(tmp_path / "hf")
    from_hf = jp.load_clip(str(tmp_path / "hf"))
    from_pt = jp.load_clip(openai_files["state_dict"])
    assert from_hf.spec.config_json != from_pt.spec.config_json  # the configs do differ
    assert share.backbone_fingerprint(from_hf) == share.backbone_fingerprint(from_pt)
    meta = {"backbone": {"name": "ViT-B/16", "fingerprint": share.backbone_fingerprint(from_pt)}}
    share.check_backbone(meta, from_hf)
    # A file written before the architecture digest carries the whole-config digest.
    legacy = {"backbone": {"name": "x", "fingerprint": {
        "config": share._legacy_config_digest(from_pt),
        "vocab": share.backbone_fingerprint(from_pt)["vocab"],
    }}}  # fmt: skip
    share.check_backbone(legacy, from_pt)
    with pytest.raises(share.BackboneMismatchError, match="different config"):
        share.check_backbone(legacy, from_hf)


# ------------------------------------------------------------------------------------------------
# jaxprompt's tokenizer (tokenizers alone) against transformers' own
# ------------------------------------------------------------------------------------------------

# Beyond the catalog's ASCII names: case, runs of spaces and newlines, contractions, digits,
# punctuation runs, accents in composed and decomposed form, CJK, emoji, the special tokens.
HARD_TEXTS = [
    "a photo of a cat.", "A  PHOTO\tof\na   Dog!!", "it's the dog's toy, isn't it?",
    "1080p 4k 12:30", "caf\u00e9 cafe\u0301 na\u00efve", "\u6771\u4eac\u30bf\u30ef\u30fc",
    "\U0001f436 dog", "<|startoftext|> x <|endoftext|>", "--- ... ///", "", "  ",
]  # fmt: skip


def test_bundled_tokenizer_equals_transformers_clip_tokenizer(tmp_path):
    """transformers' CLIPTokenizer (fast, what transformers 5 has) built from the same files
    is the reference: same ids with and without special tokens, same vocabulary."""
    import transformers

    ours = clip_lib.openai_tokenizer()
    ours.save_pretrained(tmp_path)
    raw = importlib.resources.files("jaxprompt").joinpath(clip_lib.BPE_VOCAB).read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 1 + 49152 - 256 - 2]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    vocab = ours.get_vocab()
    (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
    ref = transformers.CLIPTokenizerFast(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    assert ref.get_vocab() == vocab and len(vocab) == 49408
    for special in (True, False):
        assert (
            ours(HARD_TEXTS, add_special_tokens=special)["input_ids"]
            == ref(HARD_TEXTS, add_special_tokens=special)["input_ids"]
        )
    # What save_pretrained wrote is read back the same by transformers and by jaxprompt.
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    mine = clip_lib.load_tokenizer(tmp_path)
    assert (again.bos_token_id, again.eos_token_id) == (mine.bos_token_id, mine.eos_token_id)
    assert again(HARD_TEXTS)["input_ids"] == mine(HARD_TEXTS)["input_ids"]
    assert ours("a photo of a cat.")["input_ids"] == ours(["a photo of a cat."])["input_ids"][0]


def test_loading_a_clip_imports_neither_transformers_nor_torch(tiny_clip_dir):
    """The tokenizer comes from tokenizer.json through `tokenizers`: transformers' tokenizer
    classes would import torch (seconds of start-up in every command that loads a CLIP)."""
    import subprocess
    import sys

    code = (
        "import sys, jaxprompt as jp; c = jp.load_clip(sys.argv[1]); "
        "c.tokenizer(['a photo of a cat.']); jp.load_clip('toy'); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_clip_dir)], capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_directory_tokenizer_equals_transformers_on_the_same_files(tiny_clip_dir):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_clip_dir))
    mine = clip_lib.load_tokenizer(tiny_clip_dir)
    texts = [t for t in HARD_TEXTS if t.isascii()] + ["a photo of a golden retriever."]
    assert mine(texts)["input_ids"] == ref(texts)["input_ids"]
    assert (mine.bos_token_id, mine.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert mine.get_vocab() == ref.get_vocab()
