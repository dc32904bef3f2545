"""Just enough of protobuf's wire format to point an ``HloModuleProto`` at another entry computation.

jaxlib ships no Python classes for XLA's protos, and its ``HloModule`` binding can only be built from a
serialized proto. Re-rooting the optimised module at a loop body lets XLA's own cost analysis price one
iteration of that loop (see ``jaxgpt.plan.hlo_cost``).
"""

from __future__ import annotations

from collections.abc import Iterator

# HloModuleProto fields (xla/service/hlo.proto) that describe the entry computation's signature.
_ENTRY_NAME, _COMPUTATIONS, _PROGRAM_SHAPE, _ENTRY_ID = 2, 3, 4, 6
_ENTRY_BOUND = {7, 8, 9, 12, 14, 18}  # schedule, aliasing, dynamic parameters, shardings, buffer donors
# HloComputationProto fields.
_COMPUTATION_NAME, _COMPUTATION_SHAPE, _COMPUTATION_ID = 1, 4, 5


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, bytes, int | bytes]]:
    """(field number, the field's raw bytes, its value: an int or the length-delimited payload)."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(buf, i)
        elif wire_type == 2:
            length, i = _read_varint(buf, i)
            value, i = buf[i : i + length], i + length
        else:
            assert wire_type in (1, 5), f"unexpected wire type {wire_type}"
            width = 8 if wire_type == 1 else 4
            value, i = buf[i : i + width], i + width
        yield number, buf[start:i], value


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def module_with_entry(module_proto: bytes, computation: str) -> bytes:
    """The same module with ``computation`` as its entry (its parameters become the module's)."""
    chosen = None
    for number, _, value in _fields(module_proto):
        if number == _COMPUTATIONS:
            parts = {
                n: v for n, _, v in _fields(value) if n in (_COMPUTATION_NAME, _COMPUTATION_SHAPE, _COMPUTATION_ID)
            }
            if parts[_COMPUTATION_NAME] == computation.encode():
                chosen = parts
    assert chosen is not None, f"no computation {computation!r} in the module"
    drop = {_ENTRY_NAME, _PROGRAM_SHAPE, _ENTRY_ID, *_ENTRY_BOUND}
    kept = b"".join(raw for number, raw, _ in _fields(module_proto) if number not in drop)
    return (
        kept
        + _field(_ENTRY_NAME, computation.encode())
        + _field(_ENTRY_ID, chosen[_COMPUTATION_ID])
        + _field(_PROGRAM_SHAPE, chosen[_COMPUTATION_SHAPE])
    )
