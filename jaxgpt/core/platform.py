"""Where a program runs, decided once and passed down: the kernels never ask a global.

A :class:`Runtime` is made where a step is built (the trainer, a compile plan, evaluation, the
server) and handed to the model and the loss, which choose their kernels from it: cuDNN attention
and the Pallas head kernel on a GPU, splash attention on a TPU, XLA's own elsewhere. A compile plan
for a GPU made on this CPU passes ``Runtime("gpu", mesh)``, so the same forward pass compiles the
same way here as on the GPU, inside the train step or outside it.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from jaxgpt.core.sharding import DATA


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The platform compiled for and the mesh a kernel may ``shard_map`` over (a custom call is opaque
    to XLA's partitioner, so a kernel splits itself over the step's mesh). ``mesh=None``: one device,
    or a program that XLA alone partitions, in which a kernel that cannot be split is not used."""

    platform: str  # as jax.Device.platform: "cpu", "gpu" or "tpu"
    mesh: Mesh | None = None

    def __post_init__(self) -> None:
        assert self.platform in ("cpu", "gpu", "tpu"), self.platform

    @property
    def data_shards(self) -> int:
        """How many ways the mesh splits a batch (1 without one)."""
        return 1 if self.mesh is None else self.mesh.shape[DATA]

    @property
    def single_device(self) -> bool:
        """Whether the program runs on one device, where a kernel needs no splitting."""
        return self.mesh.size == 1 if self.mesh is not None else jax.device_count() == 1


def local_runtime(mesh: Mesh | None = None) -> Runtime:
    """This machine's backend, with ``mesh`` if the program runs on one."""
    return Runtime(jax.default_backend(), mesh)
