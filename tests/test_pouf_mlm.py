"""POUF for masked LMs on a tiny random RoBERTa written by ``save_random_mlm`` and read by our
loader: logits and hidden states against Hugging Face's PyTorch RobertaForMaskedLM (two
configs, padded batches), PyTorch ``save_pretrained`` directories (safetensors and ``.bin``),
a Flax msgpack, loader errors, dropout, templates and label words, mask features / prototypes /
logits / loss against NumPy computed from the saved parameters, gradients into the tied
embedding rows, labels ignored, CSV data and the adapt loop."""

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
    """The saved parameters read back under PyTorch's names (not through the loader)."""
    from safetensors.numpy import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def torch_mlm(directory):
    """Hugging Face's PyTorch RobertaForMaskedLM of ``directory``, in eval mode (no dropout)."""
    import transformers

    transformers.logging.set_verbosity_error()
    model, info = transformers.RobertaForMaskedLM.from_pretrained(
        directory, output_loading_info=True
    )
    # Every parameter came from the file (a tied decoder is not "missing").
    assert not [k for k in info["missing_keys"] if not k.startswith("lm_head.decoder")], info
    return model.eval()


def torch_forward(model, batch):
    """``(logits [B, L, V], last hidden states [B, L, H])`` of a PyTorch masked LM."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(batch["attention_mask"])),
            output_hidden_states=True,
        )
    return out.logits.numpy(), out.hidden_states[-1].numpy()


SST2 = mlm.TASKS["sst2"]
RECORDS = [
    {"sentence": "a great movie", "label": 1},
    {"sentence": "the plot was dull", "label": 0},
    {"sentence": "a fine film", "label": 1},
    {"sentence": "bad", "label": 0},
]


def test_loader_errors(tmp_path):
    with pytest.raises(mlm.MlmLoadError, match="no weights in"):
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
    tok = model.tokenizer
    batch = mlm.encode(SST2, tok, RECORDS)
    label_ids = mlm.label_word_ids(tok, SST2.words)
    # Hidden state at <mask> from Hugging Face's PyTorch model (its own position ids).
    logits_pt, hidden_pt = torch_forward(torch_mlm(model_dir), batch)
    rows = np.arange(len(RECORDS))
    h_hf = hidden_pt[rows, batch["mask_pos"]]
    h = np.asarray(mlm.mask_hidden(model, model.params, batch))
    np.testing.assert_allclose(h, h_hf, rtol=1e-5, atol=1e-5)

    eps = 1e-5  # save_random_mlm's layer_norm_eps
    dense_kernel, dense_bias = saved["lm_head.dense.weight"].T, saved["lm_head.dense.bias"]
    ln_scale, ln_bias = saved["lm_head.layer_norm.weight"], saved["lm_head.layer_norm.bias"]
    emb = saved["roberta.embeddings.word_embeddings.weight"]
    x = h @ dense_kernel + dense_bias
    f_np = np_layer_norm(np_gelu_tanh(x), ln_scale, ln_bias, eps)
    f = mlm.mask_features(model, model.params, jnp.asarray(h))
    np.testing.assert_allclose(f, f_np, rtol=1e-5, atol=1e-5)
    w_np = emb[label_ids]
    np.testing.assert_allclose(mlm.prototypes(model.params, label_ids), w_np, rtol=0, atol=0)
    # Label-word logits = Hugging Face's full MLM logits at <mask>, at the label words.
    z_hf = logits_pt[rows, batch["mask_pos"]][:, label_ids]
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


# Two tiny configs that differ in width, heads, head size, layers and feed-forward width.
CONFIGS = {
    "h32_l2_a4": dict(hidden=32, layers=2, heads=4, seed=1),
    "h48_l3_a3": dict(hidden=48, layers=3, heads=3, intermediate=80, seed=2),
}
# Rows of different lengths: the batch is right-padded (padding positions and masked keys).
PADDED = [
    {"sentence": "a great movie the plot was dull and the cat sat"},
    {"sentence": "bad"},
    {"sentence": "the dog ran"},
]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_mask_hidden_match_pytorch_roberta(name, tmp_path):
    d = mlm.save_random_mlm(tmp_path, WORDS, **CONFIGS[name])
    model = mlm.load_mlm(d)
    batch = mlm.encode(SST2, model.tokenizer, PADDED)
    assert batch["attention_mask"].min() == 0  # padding in the batch
    logits_pt, hidden_pt = torch_forward(torch_mlm(d), batch)
    logits = np.asarray(mlm.mlm_logits(model, model.params, batch))
    assert logits.shape == logits_pt.shape
    # Every position, padding included (its queries still see the real keys only).
    np.testing.assert_allclose(logits, logits_pt, rtol=1e-5, atol=1e-5)
    rows = np.arange(len(PADDED))
    h = np.asarray(mlm.mask_hidden(model, model.params, batch))
    np.testing.assert_allclose(h, hidden_pt[rows, batch["mask_pos"]], rtol=1e-5, atol=1e-5)


def _save_pytorch(src, dst, *, binary):
    """A directory as ``RobertaForMaskedLM.save_pretrained`` writes it (``.bin`` if binary)."""
    import torch
    import transformers

    model = torch_mlm(src)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    if binary and int(transformers.__version__.split(".")[0]) < 5:
        model.save_pretrained(dst, safe_serialization=False)
    elif binary:
        # transformers 5 writes only safetensors; a .bin is torch.save of the state dict, as
        # earlier versions (and the hub's older models) wrote it.
        model.save_pretrained(dst)
        os.remove(os.path.join(dst, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(dst, "pytorch_model.bin"))
    else:
        model.save_pretrained(dst)
    weights = {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(dst))
    assert weights == {"pytorch_model.bin" if binary else "model.safetensors"}
    return model


@pytest.mark.parametrize("binary", [False, True], ids=["safetensors", "bin"])
def test_pytorch_save_pretrained_directory_loads(binary, model_dir, model, tmp_path):
    torch_model = _save_pytorch(model_dir, tmp_path, binary=binary)
    loaded = mlm.load_mlm(tmp_path)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded.params, model.params)
    assert all(jax.tree.leaves(same)) and jax.tree.structure(same) == jax.tree.structure(
        model.params
    )
    batch = mlm.encode(SST2, loaded.tokenizer, PADDED)
    logits_pt, _ = torch_forward(torch_model, batch)
    logits = np.asarray(mlm.mlm_logits(loaded, loaded.params, batch))
    np.testing.assert_allclose(logits, logits_pt, rtol=1e-5, atol=1e-5)


def test_flax_msgpack_loads_and_bad_weights_name_the_fix(model_dir, model, tmp_path):
    import shutil

    from flax import serialization

    flax_dir = tmp_path / "flax"
    shutil.copytree(model_dir, flax_dir)
    os.remove(flax_dir / "model.safetensors")
    params = jax.tree.map(np.asarray, model.params)
    (flax_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    loaded = mlm.load_mlm(flax_dir)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded.params, model.params)
    assert all(jax.tree.leaves(same))

    from safetensors.numpy import load_file, save_file

    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    # Older spellings: LayerNorm gamma/beta, the decoder bias under the decoder's name.
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        .replace("lm_head.bias", "lm_head.decoder.bias"): v
        for k, v in sd.items()
    }  # fmt: skip
    assert "roberta.embeddings.LayerNorm.gamma" in renamed and "lm_head.bias" not in renamed
    save_file(renamed, str(old / "model.safetensors"))
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), mlm.load_mlm(old).params,
                        model.params)  # fmt: skip
    assert all(jax.tree.leaves(same))

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    save_file({k: v for k, v in sd.items() if "layer.1.output" not in k},
              str(bad / "model.safetensors"))  # fmt: skip
    with pytest.raises(mlm.MlmLoadError, match=r"e\.g\. roberta\.encoder\.layer\.1\.output"):
        mlm.load_mlm(bad)
    save_file({**sd, "lm_head.dense.weight": sd["lm_head.dense.weight"][:, :3]},
              str(bad / "model.safetensors"))  # fmt: skip
    with pytest.raises(mlm.MlmLoadError, match="another model size"):
        mlm.load_mlm(bad)
    config = (bad / "config.json").read_text()
    (bad / "config.json").write_text(config.replace('"roberta"', '"bert"'))
    with pytest.raises(mlm.MlmLoadError, match="runs RoBERTa"):
        mlm.load_mlm(bad)
    os.remove(bad / "config.json")
    with pytest.raises(mlm.MlmLoadError, match="config.json"):
        mlm.load_mlm(bad)


def test_dropout_is_hf_flax_roberta_s(model):
    """Training-mode dropout: random per key, a no-op without one, and the attention dropout
    one [T, S] mask for every row and head, scaled by 1 / (1 - rate)."""
    from jaxprompt import transformer as tfm

    batch = mlm.encode(SST2, model.tokenizer, PADDED)
    h0 = mlm.mask_hidden(model, model.params, batch)
    ha = mlm.mask_hidden(model, model.params, batch, dropout_key=jax.random.key(1))
    hb = mlm.mask_hidden(model, model.params, batch, dropout_key=jax.random.key(2))
    assert float(jnp.abs(ha - h0).max()) > 1e-3 and float(jnp.abs(ha - hb).max()) > 1e-3
    again = mlm.mask_hidden(model, model.params, batch, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(ha, again)

    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 3, 4))
    key_mask = np.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    rate, key = 0.4, jax.random.key(7)
    out = tfm.attention(q, k, v, causal=False, key_mask=key_mask, dropout_rate=rate,
                        dropout_key=key)  # fmt: skip
    keep = np.asarray(jax.random.bernoulli(key, 1 - rate, (1, 1, 5, 5)))
    s = np.einsum("bthd,bshd->bhts", q, k) / 2.0 + np.where(key_mask, 0, -1e30)[:, None, None]
    p = np_softmax(s, -1) * keep / (1 - rate)
    np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", p, v), rtol=1e-5, atol=1e-6)
    plain = tfm.attention(q, k, v, causal=False, key_mask=key_mask)
    np.testing.assert_allclose(
        tfm.attention(q, k, v, causal=False, key_mask=key_mask, dropout_rate=rate),
        plain, rtol=0, atol=0,
    )  # fmt: skip


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
    # Dev selection is the default: without a dev split it says how to get one.
    with pytest.raises(ValueError, match="select_on_dev=False"):
        mlm.adapt(model, data, steps=1)
    res = mlm.adapt(
        model, data, steps=3, lr=1e-3, eval_every=1, log_every=1, select_on_dev=False,
        select_with_target_labels=True, metrics_path=str(tmp_path / "m.jsonl"),
    )  # fmt: skip
    assert res["metric"] == "acc"
    assert set(res["metrics"]) == {"zero_shot", "pouf", "pouf_best_by_target_labels"}
    assert all(0 <= v["acc"] <= 100 for v in res["metrics"].values())
    assert "label leakage" in res["selection"] and "best_step_by_dev" not in res
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


# --------------------------------------------------------------------------------------------
# The LM-BFF protocol: k-shot splits, task metrics, dev selection, runs over seeds
# --------------------------------------------------------------------------------------------


def _pool(counts, seed=0):
    """A synthetic full training set: ``counts[c]`` records of class c, interleaved."""
    rng = np.random.RandomState(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    rng.shuffle(labels)
    return [{"sentence": f"s{i}", "label": int(y)} for i, y in enumerate(labels)]


def _lmbff_reference(records, k, seed):
    """LM-BFF's sampler as its script does it: global seed, in-place list shuffle, dict of
    label lists in order of first appearance, [:k] to train and [k:2k] to dev."""
    lines = list(records)
    np.random.seed(seed)
    np.random.shuffle(lines)
    by_label = {}
    for line in lines:
        by_label.setdefault(line["label"], []).append(line)
    train = [x for g in by_label.values() for x in g[:k]]
    dev = [x for g in by_label.values() for x in g[k : 2 * k]]
    return train, dev


def test_kshot_splits_follow_lmbff():
    pool = _pool([40, 75, 33])
    frozen = [dict(r) for r in pool]
    splits = {}
    for seed in mlm.KSHOT_SEEDS:
        train, dev = mlm.kshot_splits(pool, k=16, seed=seed)
        for part in (train, dev):
            assert np.bincount([r["label"] for r in part]).tolist() == [16, 16, 16]
        ids_t, ids_d = {r["sentence"] for r in train}, {r["sentence"] for r in dev}
        assert len(ids_t) == len(ids_d) == 48 and not ids_t & ids_d
        assert (ids_t | ids_d) <= {r["sentence"] for r in pool}
        assert (train, dev) == mlm.kshot_splits(pool, k=16, seed=seed)  # deterministic
        assert (train, dev) == _lmbff_reference(pool, 16, seed)  # LM-BFF's own procedure
        splits[seed] = frozenset(ids_t)
    assert pool == frozen  # the pool is not shuffled in place
    assert len(set(splits.values())) == len(mlm.KSHOT_SEEDS)  # each seed its own split
    # LM-BFF permutes the file's lines: the pool's order is part of the input, by design.
    reordered = pool[::-1]
    assert mlm.kshot_splits(reordered, k=16, seed=42) == _lmbff_reference(reordered, 16, 42)
    assert mlm.kshot_splits(reordered, k=16, seed=42) != mlm.kshot_splits(pool, k=16, seed=42)


def test_kshot_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"classes \[2\] have \[31\].*lower data.k_shot"):
        mlm.kshot_splits(_pool([40, 40, 31]), k=16, seed=13)
    with pytest.raises(ValueError, match="labeled training pool.*data.k_shot=0"):
        mlm.kshot_splits([*_pool([40, 40]), {"sentence": "x", "label": -1}], k=16, seed=13)
    with pytest.raises(ValueError, match="k >= 1"):
        mlm.kshot_splits(_pool([4, 4]), k=0, seed=13)
    # A csv without test rows tests on its train pool: no held-out split for the protocol.
    path = tmp_path / "pool.csv"
    path.write_text("sentence,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(40)))
    with pytest.raises(ValueError, match="no held-out test rows.*data.k_shot=0"):
        mlm.kshot_dataset(mlm.load_text_dataset(f"csv:{path}", task="sst2"), k=4, seed=13)
    path.write_text(
        "sentence,label,split\n" + "".join(f"s{i},0,train\n" for i in range(20)) + "t,1,test\n"
    )
    with pytest.raises(ValueError, match=r"\['positive'\] never occur"):
        mlm.kshot_dataset(mlm.load_text_dataset(f"csv:{path}", task="sst2"), k=4, seed=13)


# scikit-learn warns on one-class inputs (the degenerate cases compared on purpose).
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_metrics_match_scikit_learn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.RandomState(0)
    for trial in range(200):
        n, k = int(rng.randint(1, 60)), [2, 2, 3, 5][trial % 4]
        y, p = rng.randint(0, k, n), rng.randint(0, k, n)
        if trial % 10 == 0:
            p = np.full(n, rng.randint(0, k))  # one predicted class: MCC's 0/0 case
        assert mlm.accuracy(y, p) == pytest.approx(sk.accuracy_score(y, p), abs=1e-12)
        want_mcc = sk.matthews_corrcoef(y, p)
        assert mlm.matthews_corrcoef(y, p) == pytest.approx(want_mcc, abs=1e-9)
        if k == 2:
            want = sk.f1_score(y, p, pos_label=1, average="binary", zero_division=0)
            assert mlm.f1_score(y, p) == pytest.approx(want, abs=1e-12)
        x, z = rng.randn(n + 2), rng.randn(n + 2)
        if trial % 2:  # ties: integer scores, as STS-B's rounded ones
            x, z = rng.randint(0, 6, n + 2).astype(float), rng.randint(0, 6, n + 2).astype(float)
        if np.ptp(x) > 0 and np.ptp(z) > 0:
            assert mlm.pearson_corr(x, z) == pytest.approx(stats.pearsonr(x, z)[0], abs=1e-9)
            assert mlm.spearman_corr(x, z) == pytest.approx(stats.spearmanr(x, z)[0], abs=1e-9)
    assert np.isnan(mlm.pearson_corr([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal, non-empty"):
        mlm.accuracy([1, 0], [1])
    # Per task: LM-BFF's metric set, in percent.
    y, p = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert mlm.task_metrics("mrpc", y, p) == {"acc": 60.0, "f1": 66.67}
    assert mlm.task_metrics("qqp", y, p).keys() == {"acc", "f1"}
    assert mlm.task_metrics("cola", y, p) == {
        "acc": 60.0, "mcc": round(100 * sk.matthews_corrcoef(y, p), 2)
    }  # fmt: skip
    assert mlm.task_metrics("sst2", y, p) == {"acc": 60.0}
    assert mlm.task_metrics("stsb", [0.5, 2.0, 4.5], [1.0, 3.0, 2.0]).keys() == {
        "pearson", "spearman"
    }  # fmt: skip
    assert [mlm.main_metric(t) for t in ("mrpc", "qqp", "cola", "mnli", "sst2")] == [
        "f1", "f1", "mcc", "acc", "acc"
    ]  # fmt: skip


SENTS = ["a great movie", "the plot was dull", "a fine film", "bad", "a dull film",
         "the movie was great", "good", "the film was bad", "a good plot", "okay"]  # fmt: skip


def _csv(path, n_train=12, flip_test=False):
    """Two classes, ``n_train`` train rows each (a "full" pool), 6 labeled test rows."""
    rows = ["sentence,label,split"]
    for i in range(2 * n_train):
        rows.append(f"{SENTS[i % len(SENTS)]} {WORDS[i % len(WORDS)]},{i % 2},train")
    for i in range(6):
        y = (i % 2) ^ int(flip_test)
        rows.append(f"{SENTS[(3 * i + 1) % len(SENTS)]},{y},test")
    path.write_text("\n".join(rows) + "\n")
    return f"csv:{path}"


def test_dev_selection_never_reads_test_labels(model, tmp_path):
    runs = {}
    for flip in (False, True):
        data = mlm.load_text_dataset(_csv(tmp_path / f"d{flip}.csv", flip_test=flip), task="sst2")
        kshot = mlm.kshot_dataset(data, k=4, seed=21)
        assert [len(kshot.split[s]) for s in ("train", "dev", "test")] == [8, 8, 6]
        runs[flip] = mlm.adapt(model, kshot, steps=4, lr=3e-3, eval_every=1, seed=21)
    a, b = runs[False], runs[True]
    assert a["dev_curve"] == b["dev_curve"] and len(a["dev_curve"]) == 4
    assert a["best_step_by_dev"] == b["best_step_by_dev"]
    # The earliest step with the best dev score, and its parameters kept.
    scores = [r["acc"] for r in a["dev_curve"]]
    assert a["best_step_by_dev"] == 1 + scores.index(max(scores))
    best_a, best_b = (jax.tree.leaves(r["best_params_by_dev"]) for r in (a, b))
    for x, y in zip(best_a, best_b, strict=True):
        np.testing.assert_array_equal(x, y)
    # Flipped test labels flip the binary test accuracy and nothing else.
    for col in ("zero_shot", "pouf", "pouf_best_by_dev"):
        assert a["metrics"][col]["acc"] + b["metrics"][col]["acc"] == pytest.approx(100.0)
    assert a["n_dev"] == 8 and "dev split" in a["selection"]


def _pouf_mlm_config(model_dir, dataset, *extra):
    """``adapt:pouf_mlm`` through the CLI's own flag parsing, small enough for the tiny LM."""
    from jaxprompt.app import flags

    argv = [
        "jaxprompt", "--config", f"adapt:pouf_mlm,dataset={dataset},task=sst2",
        "--workdir", "unused", f"--config.mlm.name={model_dir}", "--config.data.k_shot=4",
        "--config.optim.steps=2", "--config.eval_every=1", "--config.log_every=1", *extra,
    ]  # fmt: skip
    return flags.parse_run_flags(argv, need_config=True)[0]


TWO_SEEDS = "--config.seeds=(13,21)"


def test_runner_writes_per_seed_and_mean_std(model_dir, tmp_path):
    import json

    from jaxprompt.app import experiment, pouf, rundir

    dataset = _csv(tmp_path / "pool.csv")
    default = _pouf_mlm_config(model_dir, dataset)
    assert list(default.seeds) == [13, 21, 42, 87, 100] and default.select_on_dev
    assert not default.select_with_target_labels
    bad = _pouf_mlm_config(model_dir, dataset, TWO_SEEDS, "--config.data.k_shot=0")
    with pytest.raises(experiment.ConfigError, match="select_on_dev=False"):
        pouf.run_pouf_mlm(bad, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    work = tmp_path / "run"
    rec = pouf.run_pouf_mlm(_pouf_mlm_config(model_dir, dataset, TWO_SEEDS), str(work))
    saved = json.loads((work / "results.json").read_text())
    assert saved["per_seed"] == rec["per_seed"] and saved["seeds"] == [13, 21]
    assert [r["seed"] for r in saved["per_seed"]] == [13, 21] and saved["metric"] == "acc"
    for r in saved["per_seed"]:
        assert set(r["metrics"]) == {"zero_shot", "pouf", "pouf_best_by_dev"}
        assert r["n_train"] == r["n_dev"] == 8 and r["best_step_by_dev"] in (1, 2)
        assert json.loads((work / "seeds" / f"{r['seed']}.json").read_text()) == r
    for col in ("zero_shot", "pouf", "pouf_best_by_dev"):
        per = [r["metrics"][col]["acc"] for r in saved["per_seed"]]
        assert saved["accuracy"][col] == pytest.approx(np.mean(per), abs=0.006)
        assert saved["std"][col] == pytest.approx(np.std(per), abs=0.006)
        assert saved["summary"][col]["acc"]["n"] == 2
    assert saved["per_seed"][0]["metrics"]["zero_shot"] == saved["per_seed"][1]["metrics"][
        "zero_shot"
    ]  # fmt: skip
    assert "seed" not in saved  # a mean over seeds, not one seed's run
    # results.md: the run directory's table of the means, one column per selection.
    assert rundir.results_table(saved) in (work / "results.md").read_text()
    assert "pouf_best_by_dev" in (work / "results.md").read_text()
    logged = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert {x["seed"] for x in logged} == {13, 21}
    assert any("eval/dev_acc" in x for x in logged)

    # Stopped after seed 13: the rerun keeps it and runs 21 alone.
    kept = (work / "seeds" / "13.json").read_text()
    (work / "results.json").unlink()
    (work / "seeds" / "21.json").unlink()
    again = pouf.run_pouf_mlm(_pouf_mlm_config(model_dir, dataset, TWO_SEEDS), str(work))
    assert (work / "seeds" / "13.json").read_text() == kept
    assert again["per_seed"][1]["metrics"] == saved["per_seed"][1]["metrics"]


def test_tfds_glue_pool_is_in_file_order(monkeypatch):
    """TFDS stores GLUE shuffled; the pool comes back in GLUE's file order (``idx``), the order
    LM-BFF's sampler permutes."""
    import types

    import tensorflow_datasets as tfds

    file_order = [{"idx": i, "sentence": f"s{i}", "label": i % 2} for i in range(40)]
    stored = [file_order[i] for i in np.random.RandomState(1).permutation(40)]
    builder = types.SimpleNamespace(
        info=types.SimpleNamespace(
            features={"label": types.SimpleNamespace(names=["negative", "positive"])}
        ),
        as_data_source=lambda split: stored if split == "train" else stored[:4],
    )
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: builder)
    data = mlm.load_text_dataset("glue/sst2")
    assert [r["sentence"] for r in data.split["train"]] == [r["sentence"] for r in file_order]
    want = _lmbff_reference(
        [{"sentence": r["sentence"], "label": r["label"]} for r in file_order], 4, 13
    )
    assert mlm.kshot_splits(data.split["train"], k=4, seed=13) == want
