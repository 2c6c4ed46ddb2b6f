"""Device meshes and placement: batches over ``data``, prompts replicated, CLIP optionally sharded.

The trainer uses one 2-D mesh with axes ``("data", "model")``. Batches are split along their
leading axis over ``data``; the prompt, the optimizer state and the class tokens are replicated;
the frozen CLIP parameters are replicated too unless ``model > 1``, where each weight is split
along its largest axis divisible by the ``model`` size (FSDP-style, for large backbones).

Everything here works unchanged on several hosts: a host passes its own slice of the batch to
:func:`put_batch`, which assembles the global array with
``jax.make_array_from_process_local_data``.

Example::

    mesh = make_mesh()                       # all devices on "data"
    clip = shard_clip(clip, mesh)            # replicated when model == 1
    batch = put_batch(numpy_batch, mesh)     # global arrays sharded P("data")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "barrier",
    "batch_sharding",
    "clip_shardings",
    "constrain_classes",
    "decide_once",
    "make_mesh",
    "param_sharding",
    "put_batch",
    "replicate",
    "replicated",
    "shard_clip",
]

PyTree = Any


def make_mesh(data: int = -1, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``("data", "model")`` mesh.

    Args:
      data: devices along the batch axis; ``-1`` takes all devices left after ``model``.
      model: devices along the axis that shards the frozen CLIP weights (1 = replicate).
      devices: the devices to use (default ``jax.devices()``, all hosts'); e.g.
        ``jax.devices()[:1]`` for a one-device run.

    Returns:
      A :class:`jax.sharding.Mesh` with ``Auto`` axis types (shardings propagate as in plain
      ``jit``).

    Raises:
      ValueError: if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"model={model} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // model
    if data * model != n:
        raise ValueError(
            f"mesh data={data} x model={model} = {data * model} does not match {n} devices; "
            "pass data=-1 to use all of them"
        )
    # Auto axes: the trainer states its shardings explicitly at the jit boundary and lets XLA
    # propagate inside, which is what big models and tiny prompts both need here.
    return jax.make_mesh(
        (data, model), ("data", "model"), (AxisType.Auto, AxisType.Auto), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch sharding: leading axis split over ``data``, replicated over ``model``."""
    return NamedSharding(mesh, P("data"))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf of ``tree`` on all devices of ``mesh`` (same value everywhere).

    Args:
      tree: a pytree of arrays (numpy or jax) with the same value on every host.
      mesh: the target mesh.

    Returns:
      The tree with replicated global ``jax.Array`` leaves.
    """
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put_global(x, sharding), tree)


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """``jax.device_put(x, sharding)`` that also works when the mesh spans several processes.

    ``device_put`` refuses a committed host-local ``jax.Array`` (a jit output, a loaded weight,
    a split key) for a sharding with devices of other processes. There each process builds its
    own shards from its local copy of the value (no communication: the value must be the same
    on every process, as for any replicated input).
    """
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Assembles a global batch from this host's slice, sharded ``P("data")``.

    On one host the local batch is the global batch. On ``k`` hosts each passes its own
    ``B/k`` examples and the result has a global leading size ``B``.

    Args:
      local_batch: pytree of host-local arrays sharing a leading batch axis (e.g.
        ``{"image": [b, H, W, 3], "label": [b]}``).
      mesh: the mesh; the local batch must split evenly over this host's ``data`` devices.

    Returns:
      The batch with global ``jax.Array`` leaves sharded over ``data``.

    Raises:
      ValueError: if the batch does not divide over the local data-parallel devices.
    """
    sharding = batch_sharding(mesh)
    local_data = _local_data_devices(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already placed (e.g. the same batch used twice)
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        if x.shape[0] % local_data:
            raise ValueError(
                f"a host-local batch of {x.shape[0]} does not split over this host's "
                f"{local_data} data-parallel devices; use a multiple of {local_data} "
                "(pad with batch['mask'] = False for evaluation)"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)


def _local_data_devices(mesh: Mesh) -> int:
    """How many distinct ``data`` positions this process's devices cover."""
    pid = jax.process_index()
    data_axis = mesh.axis_names.index("data")
    rows = {idx[data_axis] for idx, d in np.ndenumerate(mesh.devices) if d.process_index == pid}
    return max(len(rows), 1)


def param_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Sharding for one frozen weight: its largest axis divisible by the ``model`` size.

    With ``model == 1``, or when no axis divides (biases of odd size, scalars), the weight is
    replicated.

    Args:
      shape: the weight's shape.
      mesh: a ``("data", "model")`` mesh.

    Returns:
      A :class:`NamedSharding` splitting at most one axis over ``model``.
    """
    m = mesh.shape["model"]
    if m == 1:
        return replicated(mesh)
    best = None
    for axis, size in enumerate(shape):
        if size % m == 0 and size >= m and (best is None or size > shape[best]):
            best = axis
    if best is None:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[best] = "model"
    return NamedSharding(mesh, P(*spec))


def clip_shardings(clip: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for a :class:`~jaxprompt.clip.Clip` (or any tree of frozen weights).

    Returns a tree of the same structure with a :class:`NamedSharding` per leaf, usable as a
    ``jit`` ``in_shardings`` entry and with ``jax.device_put``.
    """
    return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh), clip)


def shard_clip(clip: PyTree, mesh: Mesh) -> PyTree:
    """Places the frozen CLIP on ``mesh``: sharded over ``model`` when it is > 1, else replicated.

    Args:
      clip: a :class:`~jaxprompt.clip.Clip` (its params are the only array leaves).
      mesh: a ``("data", "model")`` mesh.

    Returns:
      The same Clip with global ``jax.Array`` parameters.
    """
    return jax.tree.map(_put_global, clip, clip_shardings(clip, mesh))


def constrain_classes(x: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """Splits the leading (class) axis of ``x`` over the ``model`` mesh axis, inside ``jit``.

    For large label spaces: the text tower's activations are ``[C, L, D]`` per layer (or
    ``[S * C, L, D]`` for ``S`` Monte Carlo samples of Bayesian prompts), which for ImageNet's
    1000 classes may not fit one device. Constraining the token embeddings going in (and the
    features coming out) makes every device encode only ``C / model`` of the class prompts;
    rows are independent, so XLA keeps the whole tower split that way, and the logits
    ``image @ text.T`` gather the features only where needed. Opt-in: call it on the
    ``[C, ...]`` arrays around ``clip.encode_text``; it changes placement, never values.

    Args:
      x: an array whose leading axis is the class (or sample x class) axis.
      mesh: a ``("data", "model")`` mesh; default: the mesh set with ``jax.set_mesh``, if
        any.

    Returns:
      ``x`` with a ``P("model")`` sharding constraint, or ``x`` unchanged when there is no
      mesh or its ``model`` size is 1.

    Example::

        mesh = make_mesh(data=2, model=4)
        with jax.set_mesh(mesh):
            feats = jax.jit(lambda c, e, t: constrain_classes(
                clip_lib.encode_text(c, constrain_classes(e), t)))(clip, embeds, eot)
    """
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        if abstract.empty or "model" not in abstract.axis_names:
            return x
        if abstract.shape["model"] == 1:
            return x
        return jax.lax.with_sharding_constraint(x, P("model"))
    if mesh.shape["model"] == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("model")))


# ------------------------------------------------------------------------------------------------
# Several hosts: one decision, one barrier sequence
# ------------------------------------------------------------------------------------------------


def decide_once(fn: Callable[[], Any]) -> Any:
    """Runs ``fn()`` on process 0 only and returns its (JSON-able) value on every process.

    Decisions that depend on a shared run directory (is there a checkpoint, has the run
    finished, which few-shot record exists) must be the same on every host, or the hosts take
    different paths through the collectives and barriers that follow (orbax's barriers are
    collectives: two hosts at different barriers fail with a name mismatch or hang). A host
    that looks at the directory a moment later than another can see a file the other has just
    written; a decision made once and broadcast cannot differ. On one process this is just
    ``fn()``.

    If ``fn`` raises on process 0, process 0 re-raises it and every other process raises a
    ``RuntimeError`` with its message, so no host is left waiting.

    Args:
      fn: a function of no arguments returning a JSON-able value (``None``, numbers, strings,
        lists, dicts).

    Returns:
      Process 0's value of ``fn()``, decoded from JSON on the other processes.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    error: BaseException | None = None
    payload = b""
    if jax.process_index() == 0:
        try:
            payload = json.dumps({"value": fn()}).encode()
        except Exception as e:  # noqa: BLE001 - sent to the other hosts, then re-raised
            error = e
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
    # Two broadcasts: the length (every host must pass the same shape), then the bytes.
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buf = np.zeros(n, np.uint8)
    if jax.process_index() == 0:
        buf[:] = np.frombuffer(payload, np.uint8)
    got = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())
    if error is not None:
        raise error
    if "error" in got:
        raise RuntimeError(f"process 0 failed: {got['error']}")
    return got["value"]


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (a no-op on one process).

    Every process must pass the same barriers in the same order; see :func:`decide_once`.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
