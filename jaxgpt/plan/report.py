"""Compile the exact train step train.py would run, for any target, and say what it will cost.

python -m jaxgpt.plan --preset gpt2-124m-fineweb --target h100 --attention cudnn --grad_accum 1

Takes every train.py flag plus ``--target``/``--num_devices``. Without the target's devices
here, the step is compiled "deviceless" against a description of them (``jaxgpt.plan.hardware``;
GPU targets need ``pip install -r requirements-plan.txt``, TPU slices
``requirements-plan-tpu.txt``). Prints, per device: parameter and optimizer bytes, temporaries,
the total against the device's memory, whether XLA had to rematerialise, FLOPs and HBM bytes per
token (custom calls included), and a roofline: the step can be no faster than its FLOPs at peak
or its bytes at full bandwidth, whichever is slower.
"""

from __future__ import annotations

import os
from pathlib import Path

# No accelerator on this machine (no GPU the NVIDIA driver has probed, no TPU chip: Google's PCI vendor
# id 0x1ae0, or /dev/accel0 on older TPU VMs; CUDA libraries or a /dev/vfio alone are not one): keep JAX on
# the CPU, so the CUDA plugin skips its driver check, and let several processes load libtpu (it locks
# /tmp/libtpu_lockfile to guard a TPU that is not here).
if not (
    (os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"))
    or os.path.exists("/dev/accel0")
    or any(v.read_text().strip() == "0x1ae0" for v in Path("/sys/bus/pci/devices").glob("*/vendor"))
):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxgpt.core.cli import ArgumentParser, add_dataclass_arguments, build
from jaxgpt.core.errors import UserError
from jaxgpt.core.options import option
from jaxgpt.core.sharding import DATA, accumulated_batch_sharding, check_batch_divisible, make_mesh
from jaxgpt.model.gpt import resolve_attention
from jaxgpt.plan.hardware import Target, get_target, target_devices
from jaxgpt.plan.hlo_cost import program_cost
from jaxgpt.tokenizer import tokenizer_of
from jaxgpt.train.config import RunConfig, parse_run_config
from jaxgpt.train.run_tokenizer import with_vocab
from jaxgpt.train.step import TrainStep, build_step

GiB = 2**30


class DoesNotFit(UserError):
    """The compiler refused the step (XLA:TPU does when its temporaries exceed the chip's memory)."""


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What to compile for (every train.py flag is accepted too)."""

    target: str = option(
        "h100",
        "h100, h200, a100, a TPU slice (v5e:2x2, v6e:4x4, v4:2x2x1, v5p:2x2x2, ...; compiled deviceless "
        "when absent) or cpu",
    )
    num_devices: int | None = option(
        None,
        "devices of the target (default: 1 GPU, every chip of a TPU slice); --mesh (default all on data) covers them",
    )
    num_slices: int = option(
        1, "TPU slices joined over the data-centre network (multi-slice); --mesh's data axis spans them"
    )
    json: bool = option(False, "print one JSON object instead of the table")
    find_max_batch: bool = option(False, "also search, by compiling, the largest micro-batch that fits without remat")
    dump_hlo: str | None = option(None, "write the optimised HLO of the step to this file (to see where bytes go)")


@dataclasses.dataclass
class Plan:
    """What one compile says about the step, per device unless named otherwise (printed or ``--json``)."""

    target: str
    device_kind: str
    num_devices: int
    num_slices: int
    batch_size: int
    grad_accum: int
    tokens_per_step: int
    attention: str
    argument_bytes: int  # per device: parameters, optimizer state, batch
    temp_bytes: int
    total_bytes: int
    device_memory_bytes: int
    fits: bool
    xla_remat: bool
    jax_remat: bool
    flops_per_token: float  # XLA's count, every device's work over the step's tokens
    model_flops_per_token: float  # 6N + attention, the MFU numerator
    bytes_per_token: float
    custom_call_bytes_per_token: float
    custom_calls: dict[str, int]
    roofline_step_s: float | None
    roofline_tokens_per_s: float | None
    roofline_mfu: float | None
    max_batch_size: int | None = None


def compile_step(run_config: RunConfig, target: Target, devices: list) -> tuple[TrainStep, jax.stages.Compiled]:
    """The trainer's own step (``train.step.build_step``: same optimizer, shardings, donation, kernels)
    for ``target``, lowered on shapes only."""
    cfg, model = run_config.train_config, run_config.model_config
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_divisible(cfg.batch_size, mesh, "--batch_size")
    step = build_step(model, cfg, mesh, platform=target.platform)
    abstract = step.abstract_state(cfg.seed)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, step.shardings)
    tokens = jax.ShapeDtypeStruct(
        (cfg.grad_accum, cfg.batch_size, model.block_size), jnp.int32, sharding=accumulated_batch_sharding(mesh)
    )
    return step, step.fn.lower(state, {"inputs": tokens, "targets": tokens}).compile()


def make_plan(run_config: RunConfig, target: Target, devices: list, dump_hlo: str | None = None) -> Plan:
    """Compiles ``run_config``'s step for ``target`` and reads its memory, FLOPs, bytes and roofline."""
    cfg, model = run_config.train_config, run_config.model_config
    try:
        step, compiled = compile_step(run_config, target, devices)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        reason = str(err).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0].rstrip(".")
        raise DoesNotFit(
            f"micro-batch {cfg.batch_size} does not fit on {target.name}: {reason}; lower --batch_size "
            "(--find_max_batch searches for the largest that fits)"
        ) from err
    attention = resolve_attention(model, target.platform)
    memory = compiled.memory_analysis()
    module = compiled.runtime_executable().hlo_modules()[0]
    if dump_hlo:
        with open(dump_hlo, "w") as f:
            f.write(module.to_string())
    cost = program_cost(module)
    n = len(devices)
    tokens = cfg.tokens_per_step(model.block_size)
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    total += memory.temp_size_in_bytes
    model_flops = step.flops_per_token
    step_s = tokens_per_s = mfu = None
    if target.peak_flops and target.hbm_bytes_per_s:
        # XLA gives a kernel (cuDNN's or splash attention) 0 FLOPs: the model's count is the floor.
        flops = max(cost.flops, model_flops * tokens / n)
        step_s = max(flops / target.peak_flops, cost.bytes_accessed / target.hbm_bytes_per_s)
        tokens_per_s = tokens / step_s
        mfu = tokens_per_s * model_flops / (target.peak_flops * n)
    return Plan(
        target=target.name,
        device_kind=devices[0].device_kind,
        num_devices=n,
        num_slices=target.num_slices,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        tokens_per_step=tokens,
        attention=attention,
        argument_bytes=memory.argument_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        total_bytes=total,
        device_memory_bytes=target.memory_bytes,
        fits=total <= target.memory_bytes and not cost.xla_remat,
        xla_remat=cost.xla_remat,
        jax_remat=model.remat,
        flops_per_token=cost.flops * n / tokens,
        model_flops_per_token=model_flops,
        bytes_per_token=cost.bytes_accessed * n / tokens,
        custom_call_bytes_per_token=cost.custom_call_bytes * n / tokens,
        custom_calls=cost.custom_calls,
        roofline_step_s=step_s,
        roofline_tokens_per_s=tokens_per_s,
        roofline_mfu=mfu,
    )


def largest_batch(fits: Callable[[int], bool], start: int, fits_at_start: bool, step: int) -> int | None:
    """The largest multiple of ``step`` for which ``fits`` holds (doubling from ``start``, then bisecting).

    Assumes that fitting is monotone in the batch size; None if not even ``step`` fits.
    """
    low, high = (start, None) if fits_at_start else (0, start)
    while high is None:
        if fits(2 * low):
            low *= 2
        else:
            high = 2 * low
    while high - low > step:
        mid = (low + high) // 2 // step * step
        assert low < mid < high, (low, mid, high)  # both ends are multiples of step
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low or None


def with_batch_size(run_config: RunConfig, batch: int) -> RunConfig:
    """``run_config`` with another micro-batch (the batch search compiles several)."""
    return dataclasses.replace(run_config, train_config=dataclasses.replace(run_config.train_config, batch_size=batch))


def _fits_without_remat(run_config: RunConfig, target: Target, devices: list) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            plan = make_plan(with_batch_size(run_config, batch), target, devices)
        except DoesNotFit as err:
            print(f"  {err}", file=sys.stderr)
            return False
        print(f"  micro-batch {batch}: {plan.total_bytes / GiB:.1f} GiB, fits={plan.fits}", file=sys.stderr)
        return plan.fits

    return fits


def format_plan(plan: Plan) -> str:
    """The plan as the table ``python -m jaxgpt.plan`` prints."""

    def rate(x: float, unit: str, scale: float = 1.0) -> str:
        return f"{x / scale:,.3g} {unit}"

    remat = "XLA rematerialised to fit" if plan.xla_remat else "none by XLA"
    remat += ", jax.checkpoint per block (--remat)" if plan.jax_remat else ""
    calls = ", ".join(f"{k} x{v}" for k, v in sorted(plan.custom_calls.items())) or "none"
    lines = [
        f"target              {plan.target} ({plan.device_kind}) x {plan.num_devices}"
        + (f" in {plan.num_slices} slices" if plan.num_slices > 1 else ""),
        f"step                micro-batch {plan.batch_size} x grad_accum {plan.grad_accum}: "
        f"{plan.tokens_per_step:,} tokens, attention {plan.attention}",
        "per device:",
        f"  params+opt+batch  {plan.argument_bytes / GiB:8.2f} GiB",
        f"  temporaries       {plan.temp_bytes / GiB:8.2f} GiB",
        f"  total             {plan.total_bytes / GiB:8.2f} GiB of {plan.device_memory_bytes / GiB:.1f} GiB: "
        + ("fits" if plan.fits else "does NOT fit"),
        f"  rematerialisation {remat}",
        f"FLOPs per token     {plan.flops_per_token / 1e6:,.0f}M (model: {plan.model_flops_per_token / 1e6:,.0f}M)",
        f"HBM bytes per token {plan.bytes_per_token / 1e6:.2f} MB "
        f"(custom calls {plan.custom_call_bytes_per_token / 1e6:.2f} MB)",
        f"custom calls        {calls}",
        "roofline            "
        + (
            "n/a (no peak known for this device)"
            if plan.roofline_step_s is None or plan.roofline_tokens_per_s is None
            else f"step {rate(plan.roofline_step_s, 'ms', 1e-3)}, {rate(plan.roofline_tokens_per_s, 'tokens/s')}, "
            + ("MFU n/a" if plan.roofline_mfu is None else f"MFU {plan.roofline_mfu:.0%}")
        ),
    ]
    if plan.max_batch_size is not None:
        lines.append(f"largest micro-batch without remat: {plan.max_batch_size}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxgpt.plan``: every train.py flag plus the target; prints the plan of the step."""
    parser = ArgumentParser(prog="python -m jaxgpt.plan", description=__doc__.splitlines()[0], add_help=False)
    add_dataclass_arguments(parser, PlanConfig)
    plan_args, train_argv = parser.parse_known_args(argv)
    if "-h" in train_argv or "--help" in train_argv:
        parser.print_help()
        print("\nEvery train.py flag is accepted too (python train.py --help).")
        return
    config = build(PlanConfig, plan_args)
    run_config = parse_run_config(train_argv)
    vocab = with_vocab(
        run_config.model_config, tokenizer_of(run_config.train_config.data_dir), "vocab_size" in run_config.model_flags
    )
    run_config = dataclasses.replace(run_config, model_config=vocab)  # the data's tokenizer, as train.py takes it
    target = get_target(config.target, config.num_slices)
    devices = target_devices(target, config.num_devices)
    try:
        plan = make_plan(run_config, target, devices, config.dump_hlo)
    except DoesNotFit:
        if not config.find_max_batch:
            raise
        plan = None
    if config.find_max_batch:
        data_axis = make_mesh(run_config.train_config.mesh, devices).shape[DATA]
        fits = _fits_without_remat(run_config, target, devices)
        batch = run_config.train_config.batch_size
        best = largest_batch(fits, batch, plan is not None and plan.fits, data_axis)
        if best is None and plan is None:
            raise DoesNotFit(f"not even micro-batch {data_axis} (one sequence per data shard) fits on {target.name}")
        if plan is None:  # show the plan of the largest micro-batch that fits instead
            plan = make_plan(with_batch_size(run_config, best), target, devices, config.dump_hlo)
        plan.max_batch_size = best
    print(json.dumps(dataclasses.asdict(plan)) if config.json else format_plan(plan))
