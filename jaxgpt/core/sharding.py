"""All sharding decisions in one place: the device mesh and the logical-to-mesh axis rules.

The model names each parameter dimension with a logical axis (``vocab``, ``embed``,
``heads``, ``mlp``; see ``jaxgpt.model``). Here those names meet the two mesh axes:

* ``data``: the batch is split over it (data parallelism); with ``fsdp`` the
  ``embed`` dimension of every parameter is split over it too (ZeRO-3 style). The train
  step then gathers each weight where it is used (``gather_weights``), so XLA all-gathers
  weights and reduce-scatters their gradients instead of gathering the activations, which
  it otherwise chose: GPT-2 XL on 8 H100s (16 sequences a device) needed 262 GiB of
  temporaries a device before, 51 GiB with the weights gathered.
* ``model``: tensor parallelism (Megatron): attention heads and the MLP's hidden
  units are split, so qkv and the MLP up-projection are split on their output
  dimension, the two output projections on their input dimension, and the
  embedding on the vocabulary.

A dimension that the mesh axis does not divide stays replicated (with a warning)
rather than failing: GPT-2 XL's 25 heads on a 2-way model axis, say.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgpt.core.errors import UserError

DATA, MODEL = "data", "model"


def logical_rules(fsdp: bool = False) -> dict[str, str | None]:
    """Logical parameter axis -> mesh axis."""
    return {"vocab": MODEL, "heads": MODEL, "mlp": MODEL, "embed": DATA if fsdp else None}


def parse_mesh(spec: str, device_count: int | None = None) -> tuple[int, int]:
    """``"DxM"`` -> (D, M), checked against the devices present."""
    device_count = jax.device_count() if device_count is None else device_count
    match = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", spec or "")
    if not match:
        raise UserError(f"--mesh must look like DxM (data x model), e.g. {device_count}x1; got {spec!r}")
    data, model = int(match[1]), int(match[2])
    if data < 1 or model < 1 or data * model != device_count:
        raise UserError(
            f"--mesh {data}x{model} needs {data * model} devices but {device_count} "
            f"{'is' if device_count == 1 else 'are'} present; "
            f"use a mesh whose product is {device_count}, e.g. --mesh={device_count}x1"
        )
    return data, model


def make_mesh(spec: str | None = None, devices: list | None = None) -> Mesh:
    """A (data, model) mesh; ``None`` puts every device on the data axis."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = parse_mesh(spec or f"{len(devices)}x1", len(devices))
    grid = np.asarray(devices).reshape(data, model)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:  # automatic (GSPMD) propagation: pjit semantics
        return Mesh(grid, (DATA, MODEL), axis_types=(axis_type.Auto, axis_type.Auto))
    return Mesh(grid, (DATA, MODEL))


def spec_for(
    logical_axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh, fsdp: bool
) -> PartitionSpec:
    """The PartitionSpec of one parameter from its logical axes; non-dividing axes stay replicated."""
    if not logical_axes:
        return PartitionSpec()
    assert len(logical_axes) == len(shape), (logical_axes, shape)
    rules = logical_rules(fsdp)
    axes = []
    for name, size in zip(logical_axes, shape, strict=True):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            warnings.warn(
                f"dimension '{name}' of size {size} is not divisible by mesh axis '{mesh_axis}' "
                f"({mesh.shape[mesh_axis]}); replicating it",
                stacklevel=2,
            )
            mesh_axis = None
        axes.append(mesh_axis)
    return PartitionSpec(*axes)


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """A NamedSharding for every Variable of an ``nnx.State``, same tree structure."""

    def one(variable: Any) -> Any:
        if isinstance(variable, nnx.Variable):
            value = variable.get_value()
            spec = spec_for(_logical_axes(variable), tuple(value.shape), mesh, fsdp)
            return variable.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, fsdp: bool = False) -> nnx.Module:
    """Moves a model's parameters onto the mesh in place, following the rules; returns it.

    On a mesh that spans processes every process holds the whole model and places its own shards.
    """
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, fsdp)
    if spans_processes(mesh):
        host = jax.device_get(state)
        place = lambda x, sharding: jax.make_array_from_callback(x.shape, sharding, x.__getitem__)
        nnx.update(model, jax.tree.map(place, host, shardings))
    else:
        nnx.update(model, jax.device_put(state, shardings))
    return model


def spans_processes(mesh: Mesh) -> bool:
    """Whether some of the mesh's devices belong to other processes (hosts)."""
    return any(device.process_index != jax.process_index() for device in mesh.devices.flat)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, T]: split over ``data``, replicated over ``model``."""
    return NamedSharding(mesh, PartitionSpec(DATA, None))


def accumulated_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batches stacked in front, [grad_accum, B, T]: each split over ``data``."""
    return NamedSharding(mesh, PartitionSpec(None, DATA, None))


def kv_cache_sharding(mesh: Mesh, n_head: int) -> NamedSharding:
    """A layer's KV cache [B, H, ., .]: batch over ``data``, heads over ``model`` like the attention weights."""
    heads = MODEL if n_head % mesh.shape[MODEL] == 0 else None
    return NamedSharding(mesh, PartitionSpec(DATA, heads, None, None))


def attention_spec(mesh: Mesh | jax.sharding.AbstractMesh, batch: int, n_head: int) -> PartitionSpec:
    """Attention's q, k, v and output [B, T, H, D] inside ``shard_map`` (``jaxgpt.model.kernels.tpu_attention``): batch
    over ``data``, heads over ``model`` like the attention weights, each only where the axis divides it."""
    data = DATA if batch % mesh.shape[DATA] == 0 else None
    heads = MODEL if n_head % mesh.shape[MODEL] == 0 else None
    return PartitionSpec(data, None, heads, None)


def gather_weights(params: dict[str, jax.Array], compute_shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Parameters constrained to their shardings without FSDP (``compute_shardings``): a no-op without it."""
    return {name: jax.lax.with_sharding_constraint(p, compute_shardings[name]) for name, p in params.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy of an array on every device of ``mesh`` (scalars, small state)."""
    return NamedSharding(mesh, PartitionSpec())


def data_axis_size(mesh: Mesh) -> int:
    """How many ways a batch is split."""
    return mesh.shape[DATA]


def describe(mesh: Mesh) -> str:
    """``DxM`` as --mesh takes it."""
    return f"{mesh.shape[DATA]}x{mesh.shape[MODEL]}"


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """A UserError naming ``what`` unless ``batch_size`` rows split evenly over the mesh's data axis."""
    data = data_axis_size(mesh)
    if batch_size % data:
        raise UserError(
            f"{what} {batch_size} is not divisible by the mesh's data axis ({data}); "
            f"use a multiple of {data} or a different --mesh"
        )


def rows_spec(mesh: Mesh | jax.sharding.AbstractMesh, rows: int) -> PartitionSpec:
    """A batch-first array inside ``shard_map``: rows over ``data`` where the axis divides them, else whole."""
    return PartitionSpec(DATA if rows % mesh.shape[DATA] == 0 else None)
