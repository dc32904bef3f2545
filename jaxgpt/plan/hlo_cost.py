"""FLOPs and memory traffic of a compiled XLA program, loops and custom calls included.

XLA's HloCostAnalysis (run here on the optimised module, with the CPU backend's shape sizes)
counts a while loop's body once and a custom call (cuDNN attention, a Pallas kernel) as free
(the TPU compiler's own ``cost_analysis()`` too).
:func:`program_cost` multiplies each loop body by its known trip count and adds the operand and
result bytes of every custom call, so gradient accumulation or a tiled loss cannot hide work.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from jax._src import xla_bridge
from jax._src.lib import _jax

from jaxgpt.plan.hlo_proto import module_with_entry

_SHAPE = re.compile(
    r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]"
)
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}
# The TPU compiler's own bookkeeping, not kernels: buffers placed side by side, an allocation, an index hint,
# the multi-slice id.
_NOT_KERNELS = {"ConcatBitcast", "AllocateBuffer", "AssumeGatherIndicesInBound", "SliceId"}


@dataclasses.dataclass
class ProgramCost:
    """What one compiled program does by XLA's cost analysis, with the custom calls it cannot see into."""

    flops: float
    bytes_accessed: float  # XLA's count plus custom-call operands and results
    custom_call_bytes: float
    custom_calls: dict[str, int]  # target -> executions per step
    xla_remat: bool  # XLA's rematerialisation pass cloned instructions to fit memory


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (an HLO shape, possibly a tuple)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        bits = _BITS.get(dtype) or (8 if dtype.startswith("f8") else int(dtype[1:]))
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * bits // 8
    return total


def _result_shape(instruction) -> str:
    return instruction.to_string().split(" = ", 1)[1].split(f" {_opcode_name(instruction)}(", 1)[0]


def _opcode_name(instruction) -> str:
    name = str(instruction.opcode).removeprefix("HloOpcode.k")
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _custom_call_bytes(instruction) -> int:
    operands = sum(shape_bytes(_result_shape(op)) for op in instruction.operands())
    return operands + shape_bytes(_result_shape(instruction))


def _trip_count(instruction, computations) -> int:
    """A while loop's iterations: XLA's annotation (GPU, CPU), else read off the loop condition (TPU):
    ``counter < N`` on a tuple element that starts at a constant (JAX's scans and fori_loops)."""
    text = instruction.to_string()
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', text)
    if match:
        return int(match[1])
    condition = computations[re.search(r"condition=%([\w.\-]+)", text)[1]]
    lines = {i.name: i.to_string() for i in condition.instructions()}
    compare = [t for t in lines.values() if " compare(" in t and "direction=LT" in t]
    if len(compare) != 1:
        return 1
    counter, limit = (
        lines.get(name, "") for name in re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\)", compare[0]).groups()
    )
    index, bound = re.search(r"get-tuple-element\(.*index=(\d+)", counter), re.search(r" constant\((\d+)\)", limit)
    if index is None or bound is None:
        return 1
    start = instruction.operands()[0].operands()[int(index[1])].to_string()
    first = re.search(r" constant\((-?\d+)\)", start)
    return max(int(bound[1]) - (int(first[1]) if first else 0), 1)


def program_cost(module) -> ProgramCost:
    """Cost of one execution of an optimised HloModule (one device's share under SPMD)."""
    computations = {c.name: c for c in module.computations()}
    backend = xla_bridge.get_backend("cpu")
    serialized = module.as_serialized_hlo_module_proto()
    entry = module.to_string().split("ENTRY %", 1)[1].split(" ", 1)[0]

    @functools.cache
    def inclusive(name: str) -> dict[str, float]:
        """XLA's cost of ``name`` run once, nested loop bodies counted once."""
        if name != entry:
            module_of = type(module).from_serialized_hlo_module_proto(module_with_entry(serialized, name))
            return _jax.hlo_module_cost_analysis(backend, module_of)
        return _jax.hlo_module_cost_analysis(backend, module)

    flops = bytes_accessed = custom_bytes = 0.0
    custom_calls: dict[str, int] = {}
    remat = False
    pending = [(entry, 1)]  # (computation, executions per step): the entry and every loop body
    while pending:
        name, times = pending.pop()
        cost = inclusive(name)
        flops += times * cost.get("flops", 0.0)
        bytes_accessed += times * cost.get("bytes accessed", 0.0)
        for instruction in (i for called in _called(computations, name) for i in computations[called].instructions()):
            remat |= ".remat" in instruction.name
            opcode = _opcode_name(instruction)
            if opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', instruction.to_string())[1]
                if target in _NOT_KERNELS:
                    continue
                custom_calls[target] = custom_calls.get(target, 0) + times
                custom_bytes += times * _custom_call_bytes(instruction)
            elif opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", instruction.to_string())[1]
                inner = inclusive(body)  # already in ``cost`` once: count it ``trip count`` times instead
                flops -= times * inner.get("flops", 0.0)
                bytes_accessed -= times * inner.get("bytes accessed", 0.0)
                pending.append((body, times * _trip_count(instruction, computations)))
    return ProgramCost(flops, bytes_accessed + custom_bytes, custom_bytes, custom_calls, remat)


def _called(computations, root: str) -> list[str]:
    """``root`` and the computations it calls (fusions, async calls, branches), stopping at loop bodies."""
    found, stack = [], [root]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        found.append(name)
        for instruction in computations[name].instructions():
            if _opcode_name(instruction) != "while":
                for group in re.findall(r"(?:calls|branch_computations)=\{?([%\w.\-, ]+)", instruction.to_string()):
                    stack += [c.strip().lstrip("%") for c in group.split(",") if c.strip().startswith("%")]
    return found
