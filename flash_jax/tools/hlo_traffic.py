"""Where a compiled program's memory traffic goes: each top-level instruction of the optimized
HLO (a fusion, a custom call such as a Pallas kernel, a copy, a collective) with the bytes of its
operands and its result, largest first.

XLA's cost analysis gives only the program's total "bytes accessed", which sums much the same
per instruction; this listing attributes it. It is an approximation of that count: an operand
is counted whole even where a fusion reads a slice of it, and an asynchronous copy's start and
done are counted apart. Read it for where the bytes go, the total for how many.
"""

from __future__ import annotations

import math
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_LOOP = re.compile(r"\b(?:body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# No traffic of their own: views, tuples, parameters, constants, tokens, and control flow (a
# loop's body and condition are listed instruction by instruction).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}
_FREE |= {"while", "conditional", "call"}


def _bytes(shape_text: str) -> int:
    """Bytes of every array in a (possibly tuple) shape."""
    return sum(
        _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(shape_text)
    )


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Instruction lines by computation name; the entry computation under "ENTRY"."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line[0].isspace():
            current = computations.setdefault("ENTRY" if header.group(1) else header.group(2), [])
        elif current is not None and line.startswith(" "):
            current.append(line)
    return computations


def instructions(hlo_text: str) -> list[dict]:
    """The top-level instructions (the entry computation's and its loops' bodies and
    conditions) with their bytes (operands + result), opcode, JAX op name and result shape,
    largest first."""
    computations = _computations(hlo_text)
    top = ["ENTRY"]
    for name in top:  # grows as loops are found
        for line in computations.get(name, []):
            top += [loop for loop in _LOOP.findall(line) if loop not in top]
    rows = []
    for name in top:
        sizes: dict[str, int] = {}
        for line in computations.get(name, []):
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            result, shape, opcode, rest = match.groups()
            sizes[result] = _bytes(shape)
            if opcode in _FREE:
                continue
            operands = re.findall(r"%([\w.\-]+)", rest.split("), ", 1)[0])
            op_name = _OP_NAME.search(line)
            rows.append(
                {
                    "bytes": sizes[result] + sum(sizes.get(o, 0) for o in operands),
                    "opcode": opcode,
                    "op_name": op_name.group(1) if op_name else "",
                    "shape": shape,
                }
            )
    return sorted(rows, key=lambda row: -row["bytes"])
