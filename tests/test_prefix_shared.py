"""The prefix-shared text encoder equals the plain one (values and gradients).

``encode_text_shared`` runs the shared start token and context once and lets every class's
suffix attend to their cached keys and values; it re-implements the CLIP block from the
parameter tree, so these tests compare it with ``encode_text`` (Hugging Face's block applied to
the concatenated sequence), which is itself tested against Hugging Face and a NumPy reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprompt as jp
from jaxprompt import clip as clip_lib
from jaxprompt import testing

ATOL = 1e-5

# Names from one token to many (unknown words split into characters), so the suffixes carry
# different amounts of padding and EOT sits at many positions.
MANY_LENGTHS = ["cat", "golden retriever", "zebra", "xylophone player", "q", "dotted red fish"]


@pytest.fixture(scope="module")
def deep_clip(tmp_path_factory):
    """A 4-layer tiny CLIP, so deep prompts can replace positions before layers 1..3."""
    from conftest import TINY_WORDS

    d = tmp_path_factory.mktemp("tiny_clip_4l")
    testing.save_random_clip(d, words=TINY_WORDS, seed=5, text_layers=4, vision_layers=4)
    return jp.load_clip(d)


def _ctx(clip, n, seed=0):
    return 0.5 * jax.random.normal(jax.random.key(seed), (n, clip.spec.text_width))


def _both(clip, task, ctx, deep, **kw):
    """(plain, shared) features as jitted functions of (ctx, deep)."""

    def plain(ctx, deep):
        embeds, eot = clip_lib.prompted_text_inputs(clip, task, ctx)
        return clip_lib.encode_text(clip, embeds, eot, deep=deep, **kw)

    def shared(ctx, deep):
        prefix, suffix, eot = clip_lib.shared_text_inputs(clip, task, ctx)
        return clip_lib.encode_text_shared(clip, prefix, suffix, eot, deep=deep, **kw)

    return jax.jit(plain), jax.jit(shared)


@pytest.mark.parametrize("n_ctx", [1, 4])
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("remat", [False, True])
def test_shared_equals_plain_values_and_gradients(deep_clip, n_ctx, depth, remat):
    clip = deep_clip
    task = jp.make_task(clip, MANY_LENGTHS)
    assert len(set(np.asarray(task.eot).tolist())) > 3  # EOT at many positions
    ctx = _ctx(clip, n_ctx)
    deep = None
    if depth > 1:
        deep = 0.5 * jax.random.normal(jax.random.key(1), (depth - 1, n_ctx, clip.spec.text_width))
    plain, shared = _both(clip, task, ctx, deep, remat=remat)
    want, got = plain(ctx, deep), shared(ctx, deep)
    assert got.shape == (len(MANY_LENGTHS), clip.spec.embed_dim)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    # Gradients w.r.t. the context (and deep prompts) of a loss touching every class.
    w = jax.random.normal(jax.random.key(2), want.shape)

    def loss(fn):
        return lambda c, d: jnp.sum(clip_lib.normalize(fn(c, d)) * w)

    argnums = (0,) if deep is None else (0, 1)
    g_want = jax.jit(jax.grad(loss(plain), argnums=argnums))(ctx, deep)
    g_got = jax.jit(jax.grad(loss(shared), argnums=argnums))(ctx, deep)
    for a, b in zip(g_got, g_want, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_shared_on_the_session_clip_and_new_classes(tiny_clip, tiny_task, new_task):
    ctx = _ctx(tiny_clip, 3)
    for task in (tiny_task, new_task):
        plain, shared = _both(tiny_clip, task, ctx, None)
        np.testing.assert_allclose(shared(ctx, None), plain(ctx, None), atol=ATOL, rtol=0)


def test_grouped_prefix_equals_one_call_per_group(tiny_clip):
    task = jp.make_task(tiny_clip, MANY_LENGTHS)
    ctxs = [_ctx(tiny_clip, 2, seed=s) for s in range(3)]
    parts = [clip_lib.shared_text_inputs(tiny_clip, task, c) for c in ctxs]
    prefix, suffix, eot = (jnp.stack(x) for x in zip(*parts, strict=True))
    got = jax.jit(clip_lib.encode_text_shared)(tiny_clip, prefix, suffix, eot)
    assert got.shape == (3, len(MANY_LENGTHS), tiny_clip.spec.embed_dim)
    for g, c in enumerate(ctxs):
        embeds, e = clip_lib.prompted_text_inputs(tiny_clip, task, c)
        want = clip_lib.encode_text(tiny_clip, embeds, e)
        np.testing.assert_allclose(got[g], want, atol=ATOL, rtol=0)


def test_any_split_point_and_eot_inside_the_prefix(tiny_clip):
    """The split may fall anywhere, also after some rows' EOT (then read from the prefix)."""
    ids, eot = clip_lib.tokenize(tiny_clip, ["a photo of a cat.", "a photo of a zebra dog.", "a"])
    embeds = clip_lib.embed_tokens(tiny_clip, jnp.asarray(ids))
    eot = jnp.asarray(eot)
    assert int(eot[2]) == 2
    for split in (1, 3, 5):
        # The sequence the shared encoder stands for: every row starts with row 2's prefix.
        prefix = embeds[2, :split]
        full = jnp.concatenate(
            [jnp.broadcast_to(prefix, (3,) + prefix.shape), embeds[:, split:]], axis=1
        )
        want = clip_lib.encode_text(tiny_clip, full, eot)
        got = jax.jit(clip_lib.encode_text_shared)(tiny_clip, prefix, embeds[:, split:], eot)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_prompted_text_features_switch(tiny_clip, tiny_task, monkeypatch):
    """Shared context takes the shared path; class-specific or non-end contexts do not."""
    calls = _count_shared(monkeypatch)
    ctx = _ctx(tiny_clip, 2)
    embeds, eot = clip_lib.prompted_text_inputs(tiny_clip, tiny_task, ctx)
    want = clip_lib.encode_text(tiny_clip, embeds, eot)
    got = clip_lib.prompted_text_features(tiny_clip, tiny_task, ctx)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert calls == [1]
    calls.clear()
    clip_lib.prompted_text_features(tiny_clip, tiny_task, ctx, shared_prefix=False)
    csc = jnp.broadcast_to(ctx, (len(tiny_task),) + ctx.shape)
    clip_lib.prompted_text_features(tiny_clip, tiny_task, csc)
    clip_lib.prompted_text_features(tiny_clip, tiny_task, ctx, position="middle")
    assert calls == []


def test_deep_prompts_outside_the_prefix_are_rejected(tiny_clip, tiny_task):
    prefix, suffix, eot = clip_lib.shared_text_inputs(tiny_clip, tiny_task, _ctx(tiny_clip, 2))
    deep = jnp.zeros((1, 3, tiny_clip.spec.text_width))
    with pytest.raises(ValueError, match="inside the 3-token shared prefix"):
        clip_lib.encode_text_shared(tiny_clip, prefix, suffix, eot, deep=deep)
    with pytest.raises(ValueError, match="per-class deep prompts"):
        clip_lib.encode_text_shared(tiny_clip, prefix, suffix, eot, deep=deep[:, None])


def test_bfloat16_shared_stays_close(tiny_clip_dir, tiny_clip, tiny_task):
    bf = jp.load_clip(tiny_clip_dir, dtype="bfloat16")
    ctx = _ctx(tiny_clip, 2)
    want = clip_lib.prompted_text_features(tiny_clip, tiny_task, ctx, shared_prefix=False)
    got = clip_lib.prompted_text_features(bf, tiny_task, ctx)
    assert got.dtype == jnp.float32
    cos = jnp.sum(clip_lib.normalize(got) * clip_lib.normalize(want), axis=-1)
    assert float(jnp.min(cos)) > 0.99


# --------------------------------------------------------------------------- methods


def _method_outputs(method, prompt, clip, task, batch):
    """Logits, loss and the prompt gradient of the loss, jitted."""
    logits = jax.jit(method.logits)(prompt, clip, task, batch["image"])
    key = jax.random.key(0)

    def loss(p):
        return method.loss(p, clip, task, batch, key)[0]

    value, grad = jax.jit(jax.value_and_grad(loss))(prompt)
    return logits, value, grad


def _assert_same(got, want):
    # Logits are 100 x cosine (float32 spacing ~4e-6 near 50): 1e-5 absolute plus 1e-6
    # relative, i.e. the cosines agree to 1e-7 and the gradients to 1e-5.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-6)


def _replace_shared(monkeypatch, fn):
    """Puts ``fn`` in place of the prefix-shared encoder under both of its names: the package's
    (methods call ``clip_lib.encode_text_shared``) and the text module's (what
    ``prompted_text_features`` calls)."""
    for module in (clip_lib, clip_lib.text):
        monkeypatch.setattr(module, "encode_text_shared", fn)


def _count_shared(monkeypatch):
    calls = []
    real = clip_lib.encode_text_shared
    _replace_shared(monkeypatch, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _no_shared(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the prefix-shared encoder was used")

    _replace_shared(monkeypatch, fail)


def test_coop_shared_equals_plain(tiny_clip, batch):
    task = jp.make_task(tiny_clip, MANY_LENGTHS[:4])
    labels = {**batch, "label": jnp.asarray([0, 1, 2, 3])}
    shared = jp.methods.coop(4)
    plain = jp.methods.coop(4, shared_prefix=False)
    assert shared.config["shared_prefix"] and not plain.config["shared_prefix"]
    prompt = shared.init(jax.random.key(3), tiny_clip, task)
    prompt = {"ctx": prompt["ctx"] * 20}  # far from zero, so the context matters
    got = _method_outputs(shared, prompt, tiny_clip, task, labels)
    want = _method_outputs(plain, prompt, tiny_clip, task, labels)
    assert float(jnp.max(jnp.abs(want[2]["ctx"]))) > 0
    _assert_same(got, want)


@pytest.mark.parametrize("variant", ["csc", "middle", "front"])
def test_coop_fallbacks_use_the_plain_path(tiny_clip, tiny_task, batch, variant, monkeypatch):
    ctx = 0.5 * jax.random.normal(jax.random.key(4), (3, tiny_clip.spec.text_width))
    if variant == "csc":
        method = jp.methods.coop(3, class_specific=True)
        prompt = {"ctx": jnp.broadcast_to(ctx, (len(tiny_task),) + ctx.shape)}
        # The same context in every class is the shared prompt: compare with the shared path.
        want = _method_outputs(jp.methods.coop(3), {"ctx": ctx}, tiny_clip, tiny_task, batch)
        _no_shared(monkeypatch)
        got = _method_outputs(method, prompt, tiny_clip, tiny_task, batch)
        _assert_same(got[:2], want[:2])
        np.testing.assert_allclose(jnp.sum(got[2]["ctx"], 0), want[2]["ctx"], atol=ATOL)
    else:
        method = jp.methods.coop(3, class_position=variant)
        prompt = {"ctx": ctx}
        embeds, eot = clip_lib.prompted_text_inputs(tiny_clip, tiny_task, ctx, position=variant)
        want = clip_lib.encode_text(tiny_clip, embeds, eot)
        _no_shared(monkeypatch)
        got = method.encode_classes(prompt, tiny_clip, tiny_task)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        _method_outputs(method, prompt, tiny_clip, tiny_task, batch)  # loss and grad run too


def _perturbed(prompt, seed=7):
    """The prompt moved well away from its initialisation (every leaf, its own noise)."""
    leaves, tree = jax.tree.flatten(prompt)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, moved)


@pytest.mark.parametrize("name", ["ivlp", "promptsrc", "maple"])
@pytest.mark.parametrize("depth", [1, 3])
def test_deep_methods_shared_equals_plain(deep_clip, images, name, depth, monkeypatch):
    """Fixed init words after the context and deep text prompts all lie in the prefix."""
    task = jp.make_task(deep_clip, MANY_LENGTHS[:4])
    batch = {"image": images, "label": jnp.asarray([0, 1, 2, 3])}
    # Two learnable tokens of "a photo of a": "of a" stay as fixed words in the prefix.
    kw = {"ivlp": dict(n_ctx_text=2, n_ctx_vision=2), "maple": dict(n_ctx=2)}.get(
        name, dict(n_ctx_text=2, n_ctx_vision=2, templates=("a photo of a {}.", "a {}."))
    )
    shared = jp.methods.get(name, depth=depth, **kw)
    plain = jp.methods.get(name, depth=depth, shared_prefix=False, **kw)
    assert shared.config["shared_prefix"] and not plain.config["shared_prefix"]
    prompt = _perturbed(shared.init(jax.random.key(3), deep_clip, task))
    got = _method_outputs(shared, prompt, deep_clip, task, batch)
    want = _method_outputs(plain, prompt, deep_clip, task, batch)
    assert float(jnp.max(jnp.abs(want[2]["ctx"]))) > 0
    _assert_same(got, want)
    # The shared method's text side really takes the prefix-shared encoder.
    calls = _count_shared(monkeypatch)
    shared.encode_classes(prompt, deep_clip, task)
    assert calls == [1]


# --------------------------------------------------------------------------- zero-shot


def test_zeroshot_template_ensemble_shared_equals_plain(tiny_clip, images, monkeypatch):
    """One prefix per template: words before '{}', none at all, or the whole known phrase."""
    from jaxprompt.methods.zeroshot import template_features, zeroshot

    templates = (
        "a photo of a {}.",
        "{} texture.",
        "itap of a {}.",
        "a blurry photo of the {}.",
        "the {}.",
        "a striped {} of the house.",
    )
    task = jp.make_task(tiny_clip, MANY_LENGTHS)
    shared = zeroshot(templates=templates)
    plain = zeroshot(templates=templates, shared_prefix=False, chunk=7)
    assert shared.config["shared_prefix"] and not plain.config["shared_prefix"]
    want = jax.jit(plain.encode_classes)({}, tiny_clip, task)
    calls = _count_shared(monkeypatch)
    got = jax.jit(shared.encode_classes)({}, tiny_clip, task)
    assert calls  # the shared encoder did the work
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # Per template too (the ensemble mean could hide a template's error).
    names = [n.replace("_", " ") for n in task.names]
    ids, eot = clip_lib.tokenize(tiny_clip, [t.format(n) for t in templates for n in names])
    per = template_features(tiny_clip, ids.reshape(6, 6, -1), eot.reshape(6, 6))
    ref = clip_lib.encode_token_ids(tiny_clip, jnp.asarray(ids), jnp.asarray(eot))
    np.testing.assert_allclose(per.reshape(ref.shape), ref, atol=ATOL, rtol=0)
    # A bare "{}": the prefix is the start token alone.
    bare = [
        zeroshot(templates=("{}",), shared_prefix=s).encode_classes({}, tiny_clip, task)
        for s in (True, False)
    ]
    np.testing.assert_allclose(bare[0], bare[1], atol=ATOL, rtol=0)


def test_promptsrc_teacher_shared_equals_plain(tiny_clip):
    from jaxprompt.methods.promptsrc import teacher_text_features

    task = jp.make_task(tiny_clip, MANY_LENGTHS)
    got = jax.jit(teacher_text_features)(tiny_clip, task)  # the 60 templates, shared
    want = jax.jit(lambda c, t: teacher_text_features(c, t, shared_prefix=False, chunk=64))(
        tiny_clip, task
    )
    assert got.shape == (len(MANY_LENGTHS), tiny_clip.spec.embed_dim)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_cocoop_shared_equals_plain(tiny_clip, batch):
    """One prefix group per image (ctx + meta_net shift), the class suffixes shared."""
    task = jp.make_task(tiny_clip, MANY_LENGTHS)
    labels = {**batch, "label": jnp.asarray([0, 1, 2, 5])}
    shared = jp.methods.cocoop(init_words=None, n_ctx=3, meta_ratio=2)
    plain = jp.methods.cocoop(init_words=None, n_ctx=3, meta_ratio=2, shared_prefix=False)
    assert shared.config["shared_prefix"] and not plain.config["shared_prefix"]
    prompt = shared.init(jax.random.key(3), tiny_clip, task)
    prompt = {**prompt, "ctx": prompt["ctx"] * 20}  # far from zero, so the context matters
    got = _method_outputs(shared, prompt, tiny_clip, task, labels)
    want = _method_outputs(plain, prompt, tiny_clip, task, labels)
    assert float(jnp.max(jnp.abs(want[2]["meta_net"]["linear2"]["kernel"]))) > 0
    _assert_same(got, want)
    # TPT + CoCoOp encodes one image's tuned context through class_features.
    tuned = shared.frozen_image.tuned(prompt, jnp.ones((tiny_clip.spec.embed_dim,)))
    np.testing.assert_allclose(
        shared.frozen_image.class_features(tuned, tiny_clip, task),
        plain.frozen_image.class_features(tuned, tiny_clip, task),
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("chunk", [None, 8])
def test_bayes_shared_equals_plain(tiny_clip, batch, conditional, chunk):
    """One prefix group per Monte Carlo sample (x image when conditional); chunked too."""
    task = jp.make_task(tiny_clip, MANY_LENGTHS)
    labels = {**batch, "label": jnp.asarray([0, 1, 2, 5])}
    kw = dict(init_words=None, n_ctx=2, conditional=conditional, mc_samples=3, chunk=chunk)
    shared = jp.methods.bayes(**kw)
    plain = jp.methods.bayes(**kw, shared_prefix=False)
    assert shared.config["shared_prefix"] and not plain.config["shared_prefix"]
    prompt = shared.init(jax.random.key(4), tiny_clip, task)
    prompt = {**prompt, "ctx": prompt["ctx"] * 20}
    got = _method_outputs(shared, prompt, tiny_clip, task, labels)
    want = _method_outputs(plain, prompt, tiny_clip, task, labels)
    assert float(jnp.max(jnp.abs(want[2]["ctx"]))) > 0
    _assert_same(got, want)


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_shared_path_with_classes_split_over_model(tiny_clip, batch, name, monkeypatch):
    """The shared path on a (data=2, model=4) mesh, classes split with ``constrain_classes``.

    The trainer's placement (batch over ``data``, CLIP FSDP-split over ``model``, prompt and
    task replicated) plus the opt-in class split around every prefix-shared encoding (the
    class suffixes going in, the features coming out; under CoCoOp's vmap over images the
    constraint applies to the class axis of each image's group). Logits, loss and prompt
    gradients equal the single-device run.
    """
    from jaxprompt import sharding

    names = [*MANY_LENGTHS, "blue car", "tree"]  # 8 classes: two per model shard
    task = jp.make_task(tiny_clip, names)
    labels = {**batch, "label": np.asarray([0, 1, 2, 7], np.int32)}
    kw = dict(init_words=None, n_ctx=3)
    method = jp.methods.get(name, **kw, **({"meta_ratio": 2} if name == "cocoop" else {}))
    prompt = method.init(jax.random.key(5), tiny_clip, task)
    prompt = {**prompt, "ctx": prompt["ctx"] * 20}
    want = _method_outputs(method, prompt, tiny_clip, task, labels)

    mesh = sharding.make_mesh(data=2, model=4)
    real = clip_lib.encode_text_shared
    seen = []

    def split(clip, prefix, suffix, eot, **kwargs):
        seen.append(suffix.shape)
        suffix = sharding.constrain_classes(suffix, mesh)
        return sharding.constrain_classes(real(clip, prefix, suffix, eot, **kwargs), mesh)

    _replace_shared(monkeypatch, split)
    clip = sharding.shard_clip(tiny_clip, mesh)
    got = _method_outputs(
        method,
        sharding.replicate(prompt, mesh),
        clip,
        sharding.replicate(task, mesh),
        sharding.put_batch(labels, mesh),
    )
    assert seen and all(s[0] == len(names) for s in seen)  # the split saw the class axis
    _assert_same(got, want)


def test_remat_bounds_the_shared_step_memory(deep_clip):
    """With remat, a step's temporaries hold one layer's working set, not every layer's.

    Compile only: 4 prefix groups x 300 classes through the 4-layer tiny tower. An unrolled
    loop of checkpointed blocks let XLA schedule every recomputation at once (0.8x the
    no-remat temporaries here); the scanned layers keep them at about a quarter.
    """
    task = jp.make_task(deep_clip, MANY_LENGTHS * 50)
    prefix, suffix, eot = clip_lib.shared_text_inputs(deep_clip, task, _ctx(deep_clip, 4))
    groups = 4
    suffixes = jnp.broadcast_to(suffix, (groups,) + suffix.shape)
    eots = jnp.broadcast_to(eot, (groups,) + eot.shape)
    temp = {}
    for remat in (True, False):

        def loss(pre, remat=remat):
            feats = clip_lib.encode_text_shared(deep_clip, pre, suffixes, eots, remat=remat)
            return jnp.sum(feats**2)

        prefixes = jnp.stack([prefix] * groups)
        compiled = jax.jit(jax.grad(loss)).lower(prefixes).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.4 * temp[False], temp


@pytest.mark.parametrize(
    "names, template",
    [
        (["cat"], "a photo of a {}."),  # one class: every token but the last is shared
        (["dog", "dog house"], "a photo of a {}"),  # "dog" is a prefix of "dog house"
    ],
)
def test_eot_as_the_first_suffix_position(tiny_clip, names, template):
    """A template's shared prefix is the longest prefix all rows agree on, so a row can end
    right where the prefix ends: its EOT is the first suffix position (it must see the whole
    prefix and itself, and be pooled from the suffix). The shared path equals the plain one."""
    from jaxprompt.methods.zeroshot import _common_prefix, template_features

    ids, eot = clip_lib.tokenize(tiny_clip, [template.format(n) for n in names])
    n_p = _common_prefix(ids)
    assert (eot == n_p).any(), (n_p, eot)  # the case under test occurs
    got = template_features(tiny_clip, ids[None], eot[None])[0]
    want = clip_lib.encode_token_ids(tiny_clip, jnp.asarray(ids), jnp.asarray(eot))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)
    # Also straight through encode_text_shared on the embeddings.
    table = clip_lib.embed_tokens(tiny_clip, jnp.asarray(ids))
    direct = clip_lib.encode_text_shared(tiny_clip, table[0, :n_p], table[:, n_p:], eot)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(want), atol=ATOL, rtol=0)
