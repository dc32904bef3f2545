"""The accelerators a train step can be compiled for without having one ("deviceless" AOT).

A GPU target is a ``GpuTargetConfig`` text proto in the format of XLA's own specs
(https://github.com/openxla/xla/tree/main/xla/tools/hlo_opt/gpu_specs, e.g. ``h100_sxm.txtpb``),
built here from the vendor's figures, with cuDNN 9.8 so cuDNN flash attention compiles.
``jax.experimental.topologies`` turns it into compile-only devices once the CUDA plugin is
installed (``requirements-plan.txt``) and JAX runs on the CPU.

A TPU target is a slice, ``v5e:2x2`` (generation:topology, as Cloud TPU names them), compiled
against libtpu's own description of that slice (``requirements-plan-tpu.txt``), MaxText's
``train_compile.py`` recipe; ``num_slices`` more of them make a multi-slice (DCN) target.

"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies

from jaxgpt.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Target:
    """One device of a target: what the roofline needs, and what the compiler is told."""

    name: str
    platform: str  # as jax.Device.platform: "gpu", "tpu" or "cpu"
    device_kind: str
    memory_bytes: int  # usable device memory
    hbm_bytes_per_s: float | None
    peak_flops: float | None  # dense bf16
    sm_count: int = 0
    fp32_units_per_sm: int = 0
    clock_ghz: float = 0.0
    l2_bytes: int = 0
    shared_memory_per_sm: int = 0
    compute_capability: tuple[int, int] = (0, 0)
    topology: str = ""  # a TPU slice, "2x2" or "2x2x1"
    num_slices: int = 1

    @property
    def num_devices(self) -> int:
        """Devices a TPU target has (one per chip: v4 and v5p chips run as one megacore); 0 for others."""
        return math.prod(int(d) for d in self.topology.split("x")) * self.num_slices if self.topology else 0


# Vendor figures: SXM parts, dense bf16 tensor-core peak, HBM bandwidth; memory as the driver reports it.
GPU_TARGETS: dict[str, Target] = {
    "h100": Target(
        "h100", "gpu", "NVIDIA H100 80GB HBM3", 84_929_347_584, 3.35e12, 989e12,
        132, 128, 1.98, 52_428_800, 233_472, (9, 0),
    ),
    "h200": Target(
        "h200", "gpu", "NVIDIA H200", 150_754_820_096, 4.8e12, 989e12,
        132, 128, 1.98, 62_914_560, 233_472, (9, 0),
    ),
    "a100": Target(
        "a100", "gpu", "NVIDIA A100-SXM4-80GB", 85_031_714_816, 2.039e12, 312e12,
        108, 64, 1.41, 41_943_040, 167_936, (8, 0),
    ),
}  # fmt: skip


# Google's published per-chip figures (cloud.google.com/tpu/docs/v5e, /v6e, /v4, /v5p): dense bf16 peak,
# HBM bandwidth, and HBM capacity (16, 32, 32, 95 GB there; taken as GiB, as the runtime reports it).
# name -> (device_kind, libtpu topology prefix, chip config, HBM GiB, HBM bytes/s, bf16 FLOP/s)
TPU_GENERATIONS: dict[str, tuple[str, str, str, int, float, float]] = {
    "v5e": ("TPU v5 lite", "v5e", "default", 16, 819e9, 197e12),
    "v6e": ("TPU v6 lite", "v6e", "default", 32, 1638e9, 918e12),
    "v4": ("TPU v4", "v4", "megacore", 32, 1200e9, 275e12),
    "v5p": ("TPU v5", "v5", "megacore", 95, 2765e9, 459e12),
}
TPU_INSTALL = "pip install -r requirements-plan-tpu.txt (in a venv of its own, see README 'Compile plans')"


def tpu_target(name: str, num_slices: int = 1) -> Target:
    """``v5e:2x2`` (2D slices: v5e, v6e) or ``v4:2x2x1`` (3D: v4, v5p), ``num_slices`` times."""
    generation, _, topology = name.partition(":")
    kind, _, _, gib, bandwidth, peak = TPU_GENERATIONS[generation]
    dims = 3 if generation in ("v4", "v5p") else 2
    if not re.fullmatch("x".join([r"[1-9]\d*"] * dims), topology):
        example = "2x2x1" if dims == 3 else "2x2"
        raise UserError(f"--target {name}: a {generation} slice is written {generation}:{example}")
    if num_slices < 1:
        raise UserError(f"--num_slices must be at least 1, got {num_slices}")
    return Target(name, "tpu", kind, gib * 2**30, bandwidth, peak, topology=topology, num_slices=num_slices)


def _tpu_topology(target: Target):
    """libtpu's compile-only devices for the slice(s); hosts of 2x2 chips, wrap-around links as MaxText's table."""
    generation = target.name.partition(":")[0]
    _, prefix, chip_config, *_ = TPU_GENERATIONS[generation]
    dims = [int(d) for d in target.topology.split("x")]
    per_host = (min(dims[0], 2), min(dims[1], 2), 1)
    # v4/v5p: a full 3D torus once every side is a multiple of 4; v5e/v6e: a side of 16 chips wraps around
    wrap = (all(d % 4 == 0 for d in dims),) * 3 if len(dims) == 3 else (dims[0] == 16, dims[1] == 16, False)
    try:
        return topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{prefix}:{target.topology}",
            chip_config_name=chip_config,
            chips_per_host_bounds=per_host,
            num_slices=target.num_slices,
            wrap=wrap,
        )
    except (RuntimeError, ValueError) as err:
        if importlib.util.find_spec("libtpu") is None:
            raise UserError(f"--target {target.name} needs libtpu: {TPU_INSTALL}") from err
        raise UserError(f"libtpu cannot describe --target {target.name} ({err})") from err


def gpu_target_config(target: Target) -> str:
    """The ``GpuTargetConfig`` text proto XLA compiles against (fields as in XLA's gpu_specs)."""
    major, minor = target.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {target.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {target.sm_count}
  fpus_per_core: {target.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(target.hbm_bytes_per_s)}
  l2_cache_size: {target.l2_bytes}
  clock_rate_ghz: {target.clock_ghz}
  device_memory_size: {target.memory_bytes}
  shared_memory_per_block_optin: {target.shared_memory_per_sm - 1024}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{target.device_kind}"
"""


def cpu_target() -> Target:
    """This machine's CPU: host memory as the budget, no known peak."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target("cpu", "cpu", jax.devices("cpu")[0].device_kind, memory, None, None)


def get_target(name: str, num_slices: int = 1) -> Target:
    """The hardware a --target name means: a TPU slice (v5e:2x2, with --num_slices), a GPU, or cpu; an
    unknown name is a UserError."""
    if name.partition(":")[0] in TPU_GENERATIONS:
        return tpu_target(name, num_slices)
    if num_slices != 1:
        raise UserError(f"--num_slices is for TPU targets (v5e:2x2, ...), not --target {name}")
    if name == "cpu":
        return cpu_target()
    if name not in GPU_TARGETS:
        tpus = ", ".join(f"{g}:{'2x2x1' if g in ('v4', 'v5p') else '2x2'}" for g in TPU_GENERATIONS)
        raise UserError(
            f"unknown --target {name!r}; choose one of cpu, {', '.join(GPU_TARGETS)}, or a TPU slice ({tpus})"
        )
    return GPU_TARGETS[name]


def target_devices(target: Target, num_devices: int | None = None) -> list:
    """``num_devices`` devices of the target (default: a TPU slice's chips, else 1): real ones where this
    machine has them, else compile-only ones."""
    if target.platform == "tpu" and num_devices not in (None, target.num_devices):
        raise UserError(
            f"--target {target.name} x {target.num_slices} slice(s) has {target.num_devices} chips, not "
            f"--num_devices {num_devices}; leave --num_devices out or pick another slice"
        )
    num_devices = num_devices or target.num_devices or 1
    local = [d for d in jax.devices() if d.platform == target.platform]
    if target.platform == "cpu":
        local = jax.devices("cpu")
    if len(local) >= num_devices and (target.platform == "cpu" or target.device_kind in local[0].device_kind):
        return local[:num_devices]
    if target.platform == "tpu":
        return list(_tpu_topology(target).devices)
    if target.platform != "gpu":
        raise UserError(f"--target {target.name} needs {num_devices} local devices; this machine has {len(local)}")
    hosts, per_host = (num_devices // 8, 8) if num_devices > 8 and num_devices % 8 == 0 else (1, num_devices)
    try:  # topology: slices x hosts x devices per host
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(target), topology=f"1x{hosts}x{per_host}"
        )
    except (RuntimeError, ValueError) as err:
        raise UserError(
            f"cannot compile for {target.name} here ({err}); install the CUDA plugin "
            "(pip install -r requirements-plan.txt) and run with JAX on the CPU (JAX_PLATFORMS=cpu)"
        ) from err
    return list(topology.devices)
