"""Bayesian prompt learning: a variational distribution over the text prompt's context.

Derakhshani et al., "Bayesian Prompt Learning for Image-Language Model Generalization",
ICCV 2023, arXiv 2210.02390 (earlier: "Variational prompt tuning improves generalization of
vision-language models"); reference github.com/saic-fi/Bayesian-Prompt-Learning @8a73fff
(``trainers/vpt.py``, trainer ``VPT``; built on a CoOp/CoCoOp fork and Dassl).

The prompt is CoOp's ``[SOT] v_1 .. v_n <name_c> . [EOT]`` with ``v`` initialised from the
words "a photo of a". On top of it sits a Gaussian residual r in token-embedding space:

    q(r) = N(mu, diag(exp(logvar)))               (unconditional: global mu, logvar [D])
    q(r | x) = N(f_mu(x), diag(exp(f_lv(x))))     (conditional: two ELU MLPs of the image x)
    r_l = mu + eps_l * exp(logvar / 2),  eps_l ~ N(0, I),  l = 1..L

ONE D-dimensional residual per Monte Carlo sample is added to EVERY context vector (not per
token, not per class) before the positional embedding; SOT, class tokens and EOT are untouched.
Each sample gives CLIP logits ``s[l, b, c] = 100 * cos(x_b, text(ctx + r_l, c))`` and

    loss = -mean_b [logsumexp_l log softmax(s[l, b])_{y_b} - log L]  +  1e-3 * KL
    KL   = mean_d 0.5 (exp(logvar_d) + mu_d^2 - 1 - logvar_d)       (prior N(0, I))

i.e. the log of the Monte Carlo AVERAGE likelihood (not the mean log-likelihood of the textbook
ELBO), and a KL averaged (not summed) over dimensions (and over the batch for the conditional
posterior). At test time sampling stays on with the same L and the score is the log of the
average class probability, ``logsumexp_l log softmax(s[l, b]) - log L``; logits are never
averaged and the posterior mean is never used alone.

Cost: every call runs L x C text sequences (unconditional, shared by the batch) or
B x L x C (conditional). They are built by a ``jax.vmap`` of the prompt builder over samples
(and images), flattened into one sequence axis, optionally cut into ``lax.map`` chunks, run with
rematerialised text blocks, and split over the mesh's ``data`` axis when the images carry a
sharding (see :func:`sample_logits`). By default (``shared_prefix``) each sample's (and image's)
``[SOT] (ctx + r)`` prefix runs once and the C class suffixes attend to it, so the chunks and
the split are over those prefix groups instead of single sequences.

Deviations from the reference, on purpose: parameters are float32 masters (the reference trains
fp16 parameters with plain SGD); the conditional variant accepts batches larger than 1 (the
reference broadcasts ``(L, B, D)`` against ``(1, n, D)``, which only works at B = 1, and its KL
would not be a scalar); randomness comes from explicit keys (the reference uses the global torch
RNG), and ``logits`` without a key uses a fixed key so evaluation is reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprompt import clip as clip_lib
from jaxprompt import losses
from jaxprompt.methods import base

Array = jax.Array

# The key ``logits`` samples with when the caller passes none. Fixed, so two evaluations of
# the same prompt agree; the evaluator passes its own per-batch keys anyway.
DEFAULT_EVAL_SEED = 0

_LAYERS = ("linear1", "linear2", "linear3")


# --------------------------------------------------------------------------- the posterior


def _linear_init(key: Array, fan_in: int, fan_out: int) -> dict[str, Array]:
    # PyTorch's nn.Linear default (what the reference's meta-net gets): kaiming_uniform with
    # a = sqrt(5) on the weight, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound
    # for the bias.
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound),
    }


def mlp_init(key: Array, embed_dim: int, out_dim: int) -> dict[str, dict[str, Array]]:
    """One posterior MLP ``E -> E/2 -> E/2 -> D``, PyTorch-default uniform init.

    Args:
      key: PRNG key.
      embed_dim: E, the CLIP joint embedding width (the MLP's input).
      out_dim: D, the text token width (the residual's size).

    Returns:
      ``{"linear1": {"kernel": [E, E/2], "bias": [E/2]}, "linear2": {[E/2, E/2]},
      "linear3": {[E/2, D]}}`` (kernels ``[in, out]``).
    """
    hidden = max(embed_dim // 2, 1)
    dims = (embed_dim, hidden, hidden, out_dim)
    keys = jax.random.split(key, len(_LAYERS))
    return {
        name: _linear_init(k, dims[i], dims[i + 1])
        for i, (name, k) in enumerate(zip(_LAYERS, keys, strict=True))
    }


def mlp(params: dict[str, dict[str, Array]], x: Array) -> Array:
    """``linear3(elu(linear2(elu(linear1(x)))))`` on [..., E] -> [..., D], float32.

    ELU with alpha 1 between layers and no output activation or clamp, so a log-variance head
    is unconstrained (as in the reference).
    """
    h = x.astype(jnp.float32)
    for i, name in enumerate(_LAYERS):
        h = h @ params[name]["kernel"] + params[name]["bias"]
        if i < len(_LAYERS) - 1:
            h = jax.nn.elu(h)
    return h


def is_conditional(prompt: base.Prompt) -> bool:
    """Whether a Bayesian prompt has the image-conditional (amortised) posterior."""
    return "mean_net" in prompt


def posterior(prompt: base.Prompt, image_features: Array | None = None) -> tuple[Array, Array]:
    """The Gaussian posterior over the context residual, as ``(mean, logvar)`` in float32.

    Args:
      prompt: a Bayesian prompt (see :func:`bayes`).
      image_features: [B, E] L2-normalised image features; required by the conditional
        posterior, ignored by the unconditional one.

    Returns:
      ``([D], [D])`` for the unconditional posterior, ``([B, D], [B, D])`` for the conditional.
    """
    if not is_conditional(prompt):
        return prompt["mean"].astype(jnp.float32), prompt["logvar"].astype(jnp.float32)
    if image_features is None:
        raise ValueError("the conditional posterior needs the image features")
    return mlp(prompt["mean_net"], image_features), mlp(prompt["logvar_net"], image_features)


def draw_noise(key: Array, num_samples: int, dim: int, batch: int | None = None) -> Array:
    """Standard-normal noise for the reparameterisation.

    The whole draw is ONE ``jax.random.normal(key, shape)``: ``[L, D]`` for the unconditional
    posterior (one set of samples shared by every image of the batch, as in the reference) or
    ``[L, B, D]`` for the conditional one (``batch`` given).
    """
    shape = (num_samples, dim) if batch is None else (num_samples, batch, dim)
    return jax.random.normal(key, shape, jnp.float32)


def residuals(mean: Array, logvar: Array, eps: Array) -> Array:
    """Reparameterised samples ``r = mean + eps * exp(logvar / 2)`` (float32).

    ``mean``/``logvar`` [D] with ``eps`` [L, D], or [B, D] with ``eps`` [L, B, D]. A log-variance
    of ``-inf`` gives exactly ``r = mean`` (zero variance).
    """
    return mean + eps * jnp.exp(0.5 * logvar)


# --------------------------------------------------------------------------- the text pass


def _sequence_mesh(images: Array, axis: str | None) -> Any:
    """The (abstract) mesh whose ``axis`` should split the text sequences, or None.

    The mesh is the ambient one (``jax.set_mesh``) or, under a plain ``jit`` with sharded
    inputs, the one the images' sharding names. Only ``Auto`` axes are constrained: explicit
    axes carry their shardings in the types already.
    """
    if axis is None:
        return None
    meshes = [jax.sharding.get_abstract_mesh()]
    try:
        meshes.append(jax.typeof(images).sharding.mesh)
    except (AttributeError, TypeError):
        pass
    for mesh in meshes:
        if mesh is None or mesh.empty or axis not in mesh.axis_names:
            continue
        i = mesh.axis_names.index(axis)
        if mesh.axis_types[i] == jax.sharding.AxisType.Auto and mesh.shape[axis] > 1:
            return mesh
    return None


def _encode_sequences(
    clip: clip_lib.Clip,
    embeds: Array,
    eot: Array,
    *,
    remat: bool,
    chunk: int | None,
    mesh: Any,
    axis: str | None,
) -> Array:
    """Text features of N prompted sequences [N, T, D] -> [N, E], chunked and sharded.

    The sequence axis is padded to a multiple of the chunk (and of the mesh axis), so every
    ``lax.map`` step, and every device within a step, gets the same number of sequences. The
    padding rows repeat row 0 and are dropped afterwards; they cost compute, not correctness.
    """
    n = embeds.shape[0]
    shards = 1 if mesh is None else mesh.shape[axis]
    step = n if chunk is None else min(chunk, n)
    step = -(-step // shards) * shards  # whole sequences per device within a step
    total = -(-n // step) * step
    if total > n:
        filler = jnp.broadcast_to(embeds[:1], (total - n,) + embeds.shape[1:])
        embeds = jnp.concatenate([embeds, filler])
        eot = jnp.concatenate([eot, jnp.broadcast_to(eot[:1], (total - n,))])
    embeds = embeds.reshape((total // step, step) + embeds.shape[1:])
    eot = eot.reshape(total // step, step)
    if mesh is not None:
        # Split each step's sequences over the data axis: without this, the L x C texts of the
        # unconditional posterior (which no batch array feeds) would run whole on every device.
        embeds = jax.lax.with_sharding_constraint(embeds, NamedSharding(mesh, P(None, axis)))

    def one_step(args: tuple[Array, Array]) -> Array:
        e, t = args
        return clip_lib.encode_text(clip, e, t, remat=remat)

    if embeds.shape[0] == 1:
        out = one_step((embeds[0], eot[0]))[None]
    else:
        out = jax.lax.map(one_step, (embeds, eot))
    return out.reshape(total, -1)[:n]


def _encode_groups(
    clip: clip_lib.Clip,
    prefixes: Array,
    suffix: Array,
    eot: Array,
    *,
    remat: bool,
    chunk: int | None,
    mesh: Any,
    axis: str | None,
) -> Array:
    """Prefix-shared text features of G prefix groups [G, P, D] x C suffixes -> [G, C, E].

    Every group (one Monte Carlo context, or one per sample and image) runs its prefix once and
    the task's class suffixes [C, S, D] attend to it (:func:`~jaxprompt.clip.encode_text_shared`).
    ``chunk`` counts sequences as in :func:`_encode_sequences`, so a step runs
    ``max(1, chunk // C)`` groups; groups are padded (with group 0, dropped afterwards) to a
    multiple of the step and of the mesh axis, and each step's groups are split over it.
    """
    g, n_cls = prefixes.shape[0], suffix.shape[0]
    shards = 1 if mesh is None else mesh.shape[axis]
    step = g if chunk is None else min(max(1, chunk // n_cls), g)
    step = -(-step // shards) * shards  # whole groups per device within a step
    total = -(-g // step) * step
    if total > g:
        filler = jnp.broadcast_to(prefixes[:1], (total - g,) + prefixes.shape[1:])
        prefixes = jnp.concatenate([prefixes, filler])
    prefixes = prefixes.reshape((total // step, step) + prefixes.shape[1:])
    if mesh is not None:
        # Split the groups over the data axis, as the plain path splits its sequences.
        prefixes = jax.lax.with_sharding_constraint(prefixes, NamedSharding(mesh, P(None, axis)))

    def one_group(prefix: Array) -> Array:
        return clip_lib.encode_text_shared(clip, prefix, suffix, eot, remat=remat)

    def one_step(pre: Array) -> Array:
        # vmap over the prefixes only: the suffixes are the same for every group.
        return jax.vmap(one_group)(pre)

    if prefixes.shape[0] == 1:
        out = one_step(prefixes[0])[None]
    else:
        out = jax.lax.map(one_step, prefixes)
    return out.reshape((total,) + out.shape[2:])[:g]


def _forward(prompt, clip, task, images, eps, *, remat, chunk, shard_axis, shared_prefix=True):
    """``(s [L, B, C], mean, logvar, img [B, E], txt [L, C, E] or [B, L, C, E])``: one image
    pass serves the logits and the KL; features normalised."""
    conditional = is_conditional(prompt)
    # The image tower has no prompt: its features are constants of the prompt.
    img = jax.lax.stop_gradient(clip_lib.normalize(clip_lib.encode_image(clip, images)))
    mean, logvar = posterior(prompt, img if conditional else None)
    want = 3 if conditional else 2
    if eps.ndim != want:
        raise ValueError(
            f"eps must be [L, {'B, ' if conditional else ''}D] for this "
            f"{'conditional' if conditional else 'unconditional'} prompt, got {eps.shape}"
        )
    r = residuals(mean, logvar, eps)  # [L, D] or [L, B, D], float32
    ctx = prompt["ctx"]
    mesh = _sequence_mesh(images, shard_axis)
    if conditional:
        # Image-major order [B, L, ...]: under a data-sharded batch, each device's slice of the
        # flattened groups (or sequences) belongs to its own images, so the split needs no
        # communication.
        r = jnp.swapaxes(r, 0, 1)  # [B, L, D]
    lead = r.shape[:-1]

    if shared_prefix:
        # One prefix [SOT] (ctx + r) per sample (and image); the class suffixes are shared.
        _, suffix, eot = clip_lib.shared_text_inputs(clip, task, ctx)
        n_cls = eot.shape[0]

        def prefix_of(r_one: Array) -> Array:
            return clip_lib.shared_text_inputs(clip, task, ctx + r_one[None, :])[0]

        prefixes = jax.vmap(prefix_of)(r.reshape((-1, r.shape[-1])))  # [G, 1 + n, D]
        txt = _encode_groups(
            clip, prefixes, suffix, eot, remat=remat, chunk=chunk, mesh=mesh, axis=shard_axis
        )
    else:

        def prompts_for(r_one: Array) -> Array:
            # The same residual on every context vector (broadcast over tokens and classes).
            embeds, _ = clip_lib.prompted_text_inputs(clip, task, ctx + r_one[None, :])
            return embeds  # [C, T, D]

        _, eot = clip_lib.prompted_text_inputs(clip, task, ctx)  # [C], the same for every sample
        n_cls = eot.shape[0]
        embeds = jax.vmap(prompts_for)(r.reshape((-1, r.shape[-1])))  # [G, C, T, D]
        flat = embeds.reshape((-1,) + embeds.shape[-2:])
        eot_flat = jnp.tile(eot, math.prod(lead))  # class-minor, matching the flattening
        txt = _encode_sequences(
            clip, flat, eot_flat, remat=remat, chunk=chunk, mesh=mesh, axis=shard_axis
        )
    txt = clip_lib.normalize(txt).reshape(lead + (n_cls, -1))
    scale = clip_lib.logit_scale(clip)
    if conditional:
        s = scale * jnp.einsum("be,blce->lbc", img, txt)
    else:
        s = scale * jnp.einsum("be,lce->lbc", img, txt)
    return s, mean, logvar, img, txt


def sample_logits(
    prompt: base.Prompt,
    clip: clip_lib.Clip,
    task: clip_lib.Task,
    images: Array,
    eps: Array,
    *,
    remat: bool = True,
    chunk: int | None = None,
    shard_axis: str | None = "data",
    shared_prefix: bool = True,
) -> Array:
    """Per-sample CLIP logits for given standard-normal noise: ``[L, B, C]`` float32.

    The deterministic core of both variants (everything but the draw of ``eps``). Sample l of
    image b uses the context ``ctx + r[l]`` (unconditional) or ``ctx + r[l, b]``
    (conditional), ``r = mean + eps * exp(logvar / 2)``.

    Args:
      prompt: a Bayesian prompt; the variant follows from its keys.
      clip: the frozen model.
      task: the class set (C classes).
      images: [B, H, W, 3] NHWC, CLIP-normalised.
      eps: [L, D] (unconditional) or [L, B, D] (conditional) standard-normal noise.
      remat: rematerialise text blocks in the backward pass.
      chunk: run the text tower ``chunk`` sequences at a time (``lax.map``); None = all at once.
      shard_axis: mesh axis to split the text sequences over when a mesh is in scope (ambient
        or from the images' sharding); None disables the constraint.
      shared_prefix: encode each sample's ``[SOT] (ctx + r)`` once for all classes
        (:func:`~jaxprompt.clip.encode_text_shared`); False takes the plain path. Same values.

    Returns:
      ``s[l, b, c] = exp(logit_scale) * cos(image_b, text(ctx + r, class c))``.
    """
    s, _, _, _, _ = _forward(
        prompt,
        clip,
        task,
        images,
        eps,
        remat=remat,
        chunk=chunk,
        shard_axis=shard_axis,
        shared_prefix=shared_prefix,
    )
    return s


# --------------------------------------------------------------------------- the method


def bayes(
    n_ctx: int = 4,
    *,
    init_words: str | None = "a photo of a",
    conditional: bool = False,
    mc_samples: int = 10,
    kl_weight: float = 1e-3,
    init_std: float = 0.02,
    remat: bool = True,
    chunk: int | None = None,
    shard_axis: str | None = "data",
    shared_prefix: bool = True,
) -> base.PromptMethod:
    """Bayesian prompt learning (BPL), unconditional or image-conditional posterior.

    Prompt pytree (float32)::

        unconditional: {"ctx": [n, D], "mean": [D], "logvar": [D]}
        conditional:   {"ctx": [n, D],
                        "mean_net":   {"linear1": {"kernel": [E, E/2], "bias": [E/2]},
                                       "linear2": {"kernel": [E/2, E/2], "bias": [E/2]},
                                       "linear3": {"kernel": [E/2, D], "bias": [D]}},
                        "logvar_net": (the same shapes, separate weights)}

    with D the text width and E the CLIP embedding width (512 and 512 at ViT-B/16). ``logvar``
    is a LOG-VARIANCE (the reference calls its parameter ``std_posterior`` but uses it as one).
    The reference stores mean and logvar as [1, D]; here they are [D].

    Initialisation (the reference's): ``ctx`` from the token embeddings of ``init_words``,
    ``mean`` = 0, ``logvar`` ~ U[0, 1) (so sigma in [1, 1.65): large next to token embeddings,
    kept on purpose), both MLPs PyTorch-default uniform.

    Functions:

    * ``loss(prompt, clip, task, batch, key)``: ``mc_nll + kl_weight * KL`` with the L samples
      drawn from ``key`` (the trainer folds the step in). Metrics: ``nll``, ``kl``, ``accuracy``
      (of the Monte Carlo predictive) and ``sigma`` (mean posterior standard deviation).
    * ``logits(prompt, clip, task, images, *, key=None)``: [B, C] log of the Monte Carlo
      average of the class probabilities over L samples (each row log-sums-exp to 0; argmax is
      the prediction). Sampling is always on; ``key=None`` uses
      ``jax.random.key(DEFAULT_EVAL_SEED)``, so repeated evaluations agree.
    * No ``encode_classes`` / ``classify``: the text side depends on the key (and, for the
      conditional variant, on the image).

    Optimise it as the reference does, with SGD and COUPLED weight decay on every leaf
    (``jaxprompt.train.make_optimizer``: ``add_decayed_weights(5e-4)`` before ``sgd``): near
    zero the decay's pull on ``mean`` and ``logvar`` is some 250-500 times the KL's, so
    decoupled (AdamW-style) or no decay changes the posterior's behaviour.

    Args:
      n_ctx: context length; ignored when ``init_words`` is given (then one vector per token of
        those words, 4 for "a photo of a", as in the reference).
      init_words: initial context words; None draws the context from N(0, init_std^2).
      conditional: image-conditional posterior (the reference's "cocoopvpt"); the default is
        the unconditional "coopvpt" that all released configs use.
      mc_samples: L, Monte Carlo samples at training AND test time (10; 5..40 per dataset).
      kl_weight: weight of the dimension-averaged KL (1e-3, hard-coded in the reference).
      init_std: standard deviation of the random context initialisation.
      remat: rematerialise the text blocks in the backward pass (L x C, or B x L x C,
        sequences per step make the text tower the memory bound).
      chunk: text sequences per ``lax.map`` step; None (or 0, for configs) runs them all at
        once. Bounds memory at test time, where remat does not help, e.g. for the conditional
        variant's B x L x C sequences per evaluation batch.
      shard_axis: mesh axis over which the text sequences are split (see
        :func:`sample_logits`); None leaves placement to XLA.
      shared_prefix: encode each Monte Carlo context's ``[SOT] (ctx + r)`` once for all classes
        (:func:`~jaxprompt.clip.encode_text_shared`, one prefix group per sample, or per sample
        and image when conditional; ``chunk`` then runs ``chunk // C`` groups a step). Same
        values, about ``(1 + n + L) / L`` times less text-tower work; ``False`` takes the plain
        path (for comparison).

    Returns:
      A :class:`~jaxprompt.methods.base.PromptMethod` named ``"bayes"``.
    """
    if init_words is None and n_ctx < 1:
        raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
    if chunk is not None and chunk < 0:
        raise ValueError(f"chunk must be a number of sequences (0 or None: all), got {chunk}")
    chunk = chunk or None  # 0 from a config means "no chunking"

    def init(key, clip, task):
        dt, embed = clip.spec.text_width, clip.spec.embed_dim
        k_ctx, k_a, k_b = jax.random.split(key, 3)
        if init_words:
            ctx = base.word_embeddings(clip, init_words)
        else:
            ctx = init_std * jax.random.normal(k_ctx, (n_ctx, dt), jnp.float32)
        clip_lib.check_context(clip, task, ctx.shape[0])
        prompt = {"ctx": jnp.asarray(ctx, jnp.float32)}
        if conditional:
            prompt["mean_net"] = mlp_init(k_a, embed, dt)
            prompt["logvar_net"] = mlp_init(k_b, embed, dt)
        else:
            prompt["mean"] = jnp.zeros((dt,), jnp.float32)
            # torch.rand: the log-variance starts in [0, 1), not at 0.
            prompt["logvar"] = jax.random.uniform(k_a, (dt,), jnp.float32)
        return prompt

    def check_variant(prompt):
        if is_conditional(prompt) != conditional:
            raise ValueError(
                f"this bayes method is {'conditional' if conditional else 'unconditional'} but "
                f"the prompt has keys {sorted(prompt)}"
            )

    def forward(prompt, clip, task, images, key):
        check_variant(prompt)
        batch = images.shape[0] if conditional else None
        eps = draw_noise(key, mc_samples, clip.spec.text_width, batch)
        return _forward(
            prompt,
            clip,
            task,
            images,
            eps,
            remat=remat,
            chunk=chunk,
            shard_axis=shard_axis,
            shared_prefix=shared_prefix,
        )

    def logits(prompt, clip, task, images, *, key=None):
        if key is None:
            key = jax.random.key(DEFAULT_EVAL_SEED)
        s, _, _, _, _ = forward(prompt, clip, task, images, key)
        return losses.mc_log_predictive(s)  # [B, C], log of the mean probability over samples

    def loss(prompt, clip, task, batch, key):
        labels = batch["label"]
        s, mean, logvar, _, _ = forward(prompt, clip, task, batch["image"], key)
        nll = losses.mc_nll(s, labels)  # log-mean-exp of the per-sample likelihoods
        # [D] (unconditional) or [B, D] (per image, so the mean also runs over the batch).
        kl = losses.gaussian_kl(mean, logvar)
        total = nll + kl_weight * kl
        pred = jnp.argmax(losses.mc_log_predictive(s), axis=-1)
        acc = jnp.mean((pred == labels).astype(jnp.float32))
        sigma = jnp.mean(jnp.exp(0.5 * logvar))
        return total, {"nll": nll, "kl": kl, "accuracy": acc, "sigma": sigma}

    def features_forward(prompt, clip, task, images, *, key=None):
        # For self-regulation: CE on the log predictive IS the Monte Carlo NLL (its rows
        # log-sum-exp to 0), so CE(logits) + penalty is this method's own loss. The class
        # features are every sample's (normalised): [L, C, E], or [B, L, C, E] conditional.
        if key is None:
            key = jax.random.key(DEFAULT_EVAL_SEED)
        s, mean, logvar, img, txt = forward(prompt, clip, task, images, key)
        kl = losses.gaussian_kl(mean, logvar)
        return base.Forward(
            logits=losses.mc_log_predictive(s),
            image=img,
            text=txt,
            penalty=kl_weight * kl,
            metrics={"posterior_kl": kl, "sigma": jnp.mean(jnp.exp(0.5 * logvar))},
        )

    return base.PromptMethod(
        init=init,
        logits=logits,
        loss=loss,
        features=base.PromptedFeatures(forward=features_forward, prompted_image=False),
        name="bayes",
        config=dict(
            n_ctx=n_ctx,
            init_words=init_words,
            conditional=conditional,
            mc_samples=mc_samples,
            kl_weight=kl_weight,
            init_std=init_std,
            remat=remat,
            chunk=chunk,
            shard_axis=shard_axis,
            shared_prefix=shared_prefix,
        ),
    )
