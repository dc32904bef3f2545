"""The accelerators a train step can be compiled for without having one ("deviceless" AOT).

A GPU target is a ``GpuTargetConfig`` text proto in the format of XLA's own specs
(https://github.com/openxla/xla/tree/main/xla/tools/hlo_opt/gpu_specs, e.g. ``h100_sxm.txtpb``),
built here from the vendor's figures, with cuDNN 9.8 so cuDNN flash attention compiles.
``jax.experimental.topologies`` turns it into compile-only devices once the CUDA plugin is
installed (``requirements-plan.txt``) and JAX runs on the CPU.

:func:`compiling_for` tells the model which platform a step is compiled for, so
``attention="auto"`` picks cuDNN for a GPU target on a machine that has no GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax
from jax.experimental import topologies

from jaxgpt.errors import UserError

_platform_override: list[str] = []


@dataclasses.dataclass(frozen=True)
class Target:
    """One device of a target: what the roofline needs, and what the compiler is told."""

    name: str
    platform: str  # as jax.Device.platform: "gpu" or "cpu"
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


def get_target(name: str) -> Target:
    if name == "cpu":
        return cpu_target()
    if name not in GPU_TARGETS:
        raise UserError(f"unknown --target {name!r}; choose one of cpu, {', '.join(GPU_TARGETS)}")
    return GPU_TARGETS[name]


def target_devices(target: Target, num_devices: int) -> list:
    """``num_devices`` devices of the target: real ones where this machine has them, else compile-only ones."""
    local = [d for d in jax.devices() if d.platform == target.platform]
    if target.platform == "cpu":
        local = jax.devices("cpu")
    if len(local) >= num_devices and (target.platform == "cpu" or target.device_kind in local[0].device_kind):
        return local[:num_devices]
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
            "(pip install -r requirements-plan.txt) and run with JAX on the CPU"
        ) from err
    return list(topology.devices)


def compile_platform() -> str:
    """The platform being compiled for: the plan's target while one is set, else JAX's default backend."""
    return _platform_override[-1] if _platform_override else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    _platform_override.append(platform)
    try:
        yield
    finally:
        _platform_override.pop()
