"""POUF for masked LMs on a tiny random RoBERTa saved and loaded through ``from_pretrained``:
loader errors, templates and label words, mask features / prototypes / logits / loss against
NumPy computed from the saved parameters, gradients into the tied embedding rows, labels
ignored, CSV data and the adapt loop."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.side import mlm

WORDS = [
    "terrible", "great", "It", "was", "movie", "film", "fine", "dull", "a", "the", "plot",
    "Yes", "No", "Maybe", "okay", "good", "bad", "The", "cat", "sat", "dog", "ran",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_roberta")
    return mlm.save_random_mlm(d, WORDS, hidden=32, layers=2, heads=4, max_len=64, seed=0)


@pytest.fixture(scope="module")
def model(model_dir):
    return mlm.load_mlm(model_dir)


@pytest.fixture(scope="module")
def saved(model_dir):
    """The saved parameters read back with flax's msgpack reader (not through the loader)."""
    from flax import serialization

    with open(os.path.join(model_dir, "flax_model.msgpack"), "rb") as f:
        return serialization.msgpack_restore(f.read())


SST2 = mlm.TASKS["sst2"]
RECORDS = [
    {"sentence": "a great movie", "label": 1},
    {"sentence": "the plot was dull", "label": 0},
    {"sentence": "a fine film", "label": 1},
    {"sentence": "bad", "label": 0},
]


def test_loader_errors(tmp_path):
    with pytest.raises(mlm.MlmLoadError, match="no masked-LM weights"):
        mlm.load_mlm(tmp_path)
    with pytest.raises(mlm.MlmLoadError, match="not a directory"):
        mlm.load_mlm(tmp_path / "missing")


def test_template_and_label_words(model):
    tok = model.tokenizer
    ids = mlm.label_word_ids(tok, SST2.words)
    assert [tok.convert_ids_to_tokens(int(i)) for i in ids] == ["Ġterrible", "Ġgreat"]
    enc = mlm.encode(SST2, tok, RECORDS)
    first = [int(i) for i in enc["input_ids"][0] if i != tok.pad_token_id]
    assert tok.decode(first) == "<s>a great movie It was<mask>.</s>"
    assert enc["input_ids"][0, enc["mask_pos"][0]] == tok.mask_token_id
    assert enc["attention_mask"].sum(1).tolist() == [
        sum(1 for i in row if i != tok.pad_token_id) for row in enc["input_ids"]
    ]
    # NLI: sentence 0 loses its last character, sentence 1 its capital, with a leading space.
    nli = mlm.encode(mlm.TASKS["mnli"], tok, [{"premise": "The cat sat.", "hypothesis": "The dog"}])
    assert tok.decode(nli["input_ids"][0]) == "<s>The cat sat?<mask>, the dog</s>"
    with pytest.raises(ValueError, match="single tokens"):
        mlm.label_word_ids(tok, ["zyzzyva"])


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_features_prototypes_logits_loss_vs_numpy(model, model_dir, saved):
    import transformers

    tok = model.tokenizer
    batch = mlm.encode(SST2, tok, RECORDS)
    label_ids = mlm.label_word_ids(tok, SST2.words)
    # Hidden state at <mask> from Hugging Face's own wrapper (its own position ids).
    hf = transformers.FlaxRobertaForMaskedLM.from_pretrained(model_dir)
    out = hf(
        batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    rows = np.arange(len(RECORDS))
    h_hf = np.asarray(out.hidden_states[-1])[rows, batch["mask_pos"]]
    h = np.asarray(mlm.mask_hidden(model, model.params, batch))
    np.testing.assert_allclose(h, h_hf, rtol=1e-5, atol=1e-5)

    head = saved["lm_head"]
    emb = saved["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    eps = hf.config.layer_norm_eps
    x = h @ head["dense"]["kernel"] + head["dense"]["bias"]
    f_np = np_layer_norm(np_gelu_tanh(x), head["layer_norm"]["scale"], head["layer_norm"]["bias"],
                         eps)  # fmt: skip
    f = mlm.mask_features(model, model.params, jnp.asarray(h))
    np.testing.assert_allclose(f, f_np, rtol=1e-5, atol=1e-5)
    w_np = emb[label_ids]
    np.testing.assert_allclose(mlm.prototypes(model.params, label_ids), w_np, rtol=0, atol=0)
    # Label-word logits = Hugging Face's full MLM logits at <mask>, at the label words.
    z_hf = np.asarray(out.logits)[rows, batch["mask_pos"]][:, label_ids]
    z = np.asarray(mlm.label_logits(model, model.params, jnp.asarray(h), label_ids))
    np.testing.assert_allclose(z, z_hf, rtol=1e-4, atol=1e-5)

    # Loss: CT at the fixed scale 10 on the normalised features/prototypes + 0.6 IM(logits).
    fn = f_np / np.linalg.norm(f_np, axis=1, keepdims=True)
    wn = w_np / np.linalg.norm(w_np, axis=1, keepdims=True)
    cos = fn @ wn.T
    cost, a = 1 - cos, 10 * cos
    ct = (cost * np_softmax(a, 1)).sum(1).mean() + (cost * np_softmax(a, 0)).sum(0).mean()
    p = np_softmax(z_hf, 1)
    pbar = p.mean(0)
    im = np.mean(-(p * np.log(p + 1e-5)).sum(1)) + (pbar * np.log(pbar + 1e-6)).sum()
    loss, metrics = mlm.pouf_mlm_loss(model, model.params, batch, label_ids)
    np.testing.assert_allclose(metrics["transport"], ct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["mutual_information"], im, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, ct + 0.6 * im, rtol=1e-4, atol=1e-5)


def test_gradients_reach_tied_rows_and_labels_are_ignored(model):
    tok = model.tokenizer
    batch = mlm.encode(SST2, tok, RECORDS[:2])
    label_ids = mlm.label_word_ids(tok, SST2.words)

    def f(p, b):
        return mlm.pouf_mlm_loss(model, p, b, label_ids, dropout_key=jax.random.key(0))[0]

    g = jax.jit(jax.grad(f))(model.params, batch)
    emb_g = np.asarray(g["roberta"]["embeddings"]["word_embeddings"]["embedding"])
    # The label-word rows get the prototype gradient (CT) on top of any input-side one.
    assert np.abs(emb_g[label_ids]).min() > 0
    assert float(jnp.abs(g["lm_head"]["dense"]["kernel"]).max()) > 0
    # No label in, same loss: the loss reads the template inputs only.
    with_labels = {**batch, "label": np.asarray([1, 0], np.int32)}
    assert float(f(model.params, batch)) == float(f(model.params, with_labels))


def test_csv_dataset_and_adapt(model, tmp_path):
    path = tmp_path / "reviews.csv"
    lines = ["sentence,label,split"]
    for r in RECORDS * 2:
        lines.append(f"{r['sentence']},{['negative', 'positive'][r['label']]},train")
    lines += ["a great film,1,test", "the plot was bad,negative,test"]
    path.write_text("\n".join(lines) + "\n")
    data = mlm.load_text_dataset(f"csv:{path}", task="sst2")
    assert len(data.split["train"]) == 8 and [r["label"] for r in data.split["test"]] == [1, 0]
    with pytest.raises(ValueError, match="unknown text task"):
        mlm.load_text_dataset(f"csv:{path}", task="nope")
    with pytest.raises(FileNotFoundError, match="tfds build glue/sst2"):
        mlm.load_text_dataset("glue/sst2", data_dir=str(tmp_path / "no_tfds"))
    res = mlm.adapt(
        model, data, steps=3, lr=1e-3, eval_every=1, log_every=1,
        select_with_target_labels=True, metrics_path=str(tmp_path / "m.jsonl"),
    )  # fmt: skip
    acc = res["accuracy"]
    assert set(acc) == {"zero_shot", "pouf", "pouf_best_by_target_labels"}
    assert all(0 <= v <= 100 for v in acc.values())
    assert res["n_train"] == 8 and res["steps"] == 3
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), res["params"], model.params)
    assert max(jax.tree.leaves(moved)) > 0
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3


def test_optimizer_is_clipped_linear_adamw():
    tx = mlm.make_optimizer(1e-5, steps=10)
    p = {"w": jnp.ones((3,))}
    g = {"w": jnp.asarray([30.0, 40.0, 0.0])}  # norm 50 -> clipped to 1
    s = tx.init(p)
    u, s = tx.update(g, s, p)
    # First Adam step: -lr * m_hat / (sqrt(v_hat) + eps) = -lr * sign(g) for clipped g != 0.
    np.testing.assert_allclose(u["w"], [-1e-5, -1e-5, 0.0], rtol=1e-4, atol=1e-12)
    for _ in range(9):
        u, s = tx.update(g, s, p)
    u, s = tx.update(g, s, p)  # past the end: the rate is 0
    np.testing.assert_allclose(u["w"], 0.0, atol=0)
