"""What a compiled XLA program does per device: collective bytes by kind and dot FLOPs, loop-weighted.

`compiled.cost_analysis()` counts each loop body once, so a 32-layer scan looks like one layer. This
module reads the compiled (post-SPMD-partitioning) HLO text instead: it builds the call graph of
computations (while bodies, fusions, called computations), weights each computation by how many
times it runs (a while body runs `known_trip_count` times per call) and sums, per device:
- collective bytes by kind (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute),
  counting the unsharded buffer: an all-gather's result, a reduce-scatter's operand;
- dot FLOPs, 2 * output elements * contracted elements of every `dot`.
It does not compile anything (jlora.train.plan does) and knows nothing about models.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 1,
    "u4": 1,
}

_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of a shape string, e.g. '(f32[2,3]{1,0}, s32[])' -> [('f32', (2, 3)), ('s32', ())]."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape) if dt in _BYTES]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    n = _BYTES[dtype]
    for d in dims:
        n *= d
    return n


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class HloStats:
    """Per-device totals of one compiled program, every loop body weighted by its trip count."""

    collective_bytes: dict[str, int]
    collective_counts: dict[str, int]
    collective_max_bytes: dict[str, int]  # the biggest single op of each kind
    dot_flops: float


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _COMP_HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(_Instr(*m.groups()))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _multiplicities(comps: dict[str, list[_Instr]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry computation.

    HLO text defines callees before their callers and the call graph is a DAG, so one pass over
    the computations in reverse text order visits every caller before its callees."""
    mult: dict[str, int] = defaultdict(int)
    mult[entry] = 1
    for name in reversed(list(comps)):
        if not mult[name]:
            continue
        for ins in comps[name]:
            trip = 1
            if ins.op == "while":  # scans carry their trip count; a data-dependent loop counts once
                t = _TRIP.search(ins.rest)
                trip = int(t.group(1)) if t else 1
            for attr, callee in _CALLS.findall(ins.rest):
                mult[callee] += mult[name] * (trip if attr in ("body", "condition") else 1)
            for group in _BRANCHES.findall(ins.rest):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    mult[callee] += mult[name]
    return mult


def _operand_names(rest: str) -> list[str]:
    depth, cur, out = 0, "", []
    for ch in rest:  # operands end at the ')' that closes the op's '('
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        cur += ch
    for part in cur.split(","):
        m = re.search(r"%([\w.\-]+)\s*$", part.strip())
        if m:
            out.append(m.group(1))
    return out


def analyze(hlo_text: str) -> HloStats:
    """Loop-weighted per-device collective bytes (by kind) and dot FLOPs of compiled HLO text."""
    comps, entry = _parse(hlo_text)
    mult = _multiplicities(comps, entry)
    coll_bytes: dict[str, int] = defaultdict(int)
    coll_counts: dict[str, int] = defaultdict(int)
    coll_max: dict[str, int] = defaultdict(int)
    flops = 0.0
    for name, instrs in comps.items():
        times = mult.get(name, 0)
        if not times:
            continue
        shapes = {ins.name: ins.shape for ins in instrs}
        for ins in instrs:
            op = ins.op
            kind = op[: -len("-start")] if op.endswith("-start") else op
            if kind in COLLECTIVES:
                result = _arrays(ins.shape)
                operands = [a for n in _operand_names(ins.rest) for a in _arrays(shapes.get(n, ""))]
                if op.endswith("-start"):  # (operand(s), result) tuple: the biggest buffer
                    size = max((_nbytes(*a) for a in result), default=0)
                else:
                    size = max(sum(_nbytes(*a) for a in result), sum(_nbytes(*a) for a in operands))
                coll_bytes[kind] += size * times
                coll_counts[kind] += times
                coll_max[kind] = max(coll_max[kind], size)
            elif op == "dot":
                out = _arrays(ins.shape)
                lhs = _operand_names(ins.rest)[:1]
                lhs_dims = _arrays(shapes.get(lhs[0], "")) if lhs else []
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
                if not out or not lhs_dims or not m:
                    continue
                contracted = 1
                for d in (int(x) for x in m.group(1).split(",") if x):
                    contracted *= lhs_dims[0][1][d]
                n_out = 1
                for d in out[0][1]:
                    n_out *= d
                flops += 2.0 * n_out * contracted * times
    return HloStats(dict(coll_bytes), dict(coll_counts), dict(coll_max), flops)
