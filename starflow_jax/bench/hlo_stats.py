"""What one execution of a compiled program does, read from its optimized HLO text: the
FLOPs of its dots and convolutions, the bytes its top-level instructions read and write
(an estimate of HBM traffic: a fusion's operands and result) and the bytes its
collectives produce, each while loop's body counted as many times as it runs (XLA's
``known_trip_count``: the scans over layers and gradient accumulation). XLA's own
``cost_analysis`` counts a loop body once."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
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
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
# instructions that move no data of their own
_FREE = {
    "parameter",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "constant",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
    "opt-barrier",
}

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) (\(.*\)) -> .*\{\s*$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(text) if dt in DTYPE_BYTES]


def _bytes(text: str) -> float:
    return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(text))


def _split_shape(rest: str) -> tuple[str, str]:
    """``'f32[2,3]{1,0} dot(...)...'`` or ``'(f32[2], s32[]) while(...)'`` -> (shape, rest)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    op: str
    args: str  # the operand list and attributes
    operands: list


def _parse(text: str):
    """``{computation: [instructions]}``, the parameter shapes, the entry's name, in order."""
    comps, shapes, order, entry, cur = {}, {}, [], None, None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = m.group(2)
                comps[cur], shapes[cur] = [], {}
                order.append(cur)
                if m.group(1):
                    entry = cur
                for pname, pshape in re.findall(r"([\w.\-]+): ((?:\([^)]*\))|[^,)]+)", m.group(3)):
                    shapes[cur][pname] = pshape
            continue
        if line.rstrip() == "}":  # (a kernel's backend config may span lines starting with "}")
            cur = None
            continue
        s = line.strip()
        if s.startswith("ROOT "):
            s = s[5:]
        if not s.startswith("%") or " = " not in s:
            continue
        name, _, rest = s[1:].partition(" = ")
        shape, tail = _split_shape(rest)
        op, _, args = tail.partition("(")
        operands = re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])
        shapes[cur][name] = shape
        comps[cur].append(_Instr(name, shape, op.strip(), args, operands))
    return comps, shapes, order, entry


def _dot_flops(ins: _Instr, shapes: dict) -> float:
    out = _arrays(ins.shape)
    if not out or not ins.operands:
        return 0.0
    n_out = math.prod(out[0][1])
    lhs = _arrays(shapes.get(ins.operands[0], ""))
    if ins.op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.args)
        if not lhs or not m:
            return 0.0
        dims = [int(d) for d in m.group(1).split(",") if d]
        return 2.0 * n_out * math.prod(lhs[0][1][d] for d in dims)
    # convolution: every output element is a dot over the kernel's input-feature and spatial dims
    rhs = _arrays(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
    m = re.search(r"dim_labels=[^_]*_([^-]*)->", ins.args)
    if not rhs or not m or "o" not in m.group(1):
        return 0.0
    kernel = rhs[0][1]
    return 2.0 * n_out * math.prod(kernel) / kernel[m.group(1).index("o")]


def _trip_count(ins: _Instr, comps: dict) -> float | None:
    """A while loop's iterations: XLA's ``known_trip_count``, else a condition ``i < N`` with a
    constant ``N`` (a scan: ``i`` from 0 by 1); None when neither says."""
    m = _TRIP.search(ins.args)
    if m:
        return float(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", ins.args)
    body = comps.get(cond.group(1), []) if cond else []
    consts = {i.name: i.args for i in body if i.op == "constant"}
    for i in body:
        if i.op == "compare" and "direction=LT" in i.args and len(i.operands) == 2 and i.operands[1] in consts:
            value = re.match(r"\s*(\d+)\)", consts[i.operands[1]])
            if value:
                return float(value.group(1))
    return None


def _callers_first(entry: str, edges: dict) -> list:
    """The computations reachable from ``entry``, each after every computation that calls it."""
    seen, post = set(), []

    def visit(c):
        seen.add(c)
        for callee, _ in edges[c]:
            if callee not in seen:
                visit(callee)
        post.append(c)

    visit(entry)
    return post[::-1]


@dataclasses.dataclass
class HloStats:
    flops: float  # per device, per execution
    bytes_accessed: float  # top-level instructions' operands and results (an HBM traffic estimate)
    collective_bytes: dict  # kind -> bytes of the collectives' results, per device
    collective_count: dict  # kind -> executions
    unknown_trip_counts: int  # while loops whose trip count XLA did not know (counted once)
    kernels: int  # custom kernels (Pallas: splash attention) executed: their FLOPs are not in ``flops``

    @property
    def total_collective_bytes(self) -> float:
        return float(sum(self.collective_bytes.values()))


def hlo_stats(text: str) -> HloStats:
    comps, shapes, order, entry = _parse(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    edges = collections.defaultdict(list)  # caller -> [(callee, times per call)]
    fused = set()  # computations that are fusion bodies or reducers (their instructions stay on chip)
    unknown = []
    for comp in order:
        for ins in comps[comp]:
            trip = 1.0
            if ins.op == "while":
                trip = _trip_count(ins, comps)
                if trip is None:
                    unknown.append(comp)
                    trip = 1.0
            for kind, callee in _CALLEE.findall(ins.args):
                if callee in comps:
                    edges[comp].append((callee, trip if kind in ("body", "condition") else 1.0))
                    if kind == "to_apply" or (kind == "calls" and ins.op == "fusion"):
                        fused.add(callee)
            for group in _BRANCHES.findall(ins.args):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    if callee in comps:
                        edges[comp].append((callee, 1.0))
    mult = collections.defaultdict(float)
    mult[entry] = 1.0
    for comp in _callers_first(entry, edges):
        for callee, times in edges[comp]:
            mult[callee] += mult[comp] * times
    flops, accessed, kernels = 0.0, 0.0, 0.0
    cbytes, ccount = collections.Counter(), collections.Counter()
    for comp in order:
        k = mult[comp]
        if k == 0:
            continue
        for ins in comps[comp]:
            if ins.op in ("dot", "convolution"):
                flops += k * _dot_flops(ins, shapes[comp])
            if ins.op == "custom-call" and "tpu_custom_call" in ins.args:
                kernels += k
            base = ins.op.removesuffix("-start")
            if base in COLLECTIVES and not ins.op.endswith("-done"):
                # an async start's shape holds its operand and its result: count the result
                arrays = [DTYPE_BYTES[dt] * math.prod(d) for dt, d in _arrays(ins.shape)]
                size = arrays[-1] if ins.op.endswith("-start") and arrays else sum(arrays)
                if base == "all-gather" and ins.op.endswith("-start") and arrays:
                    size = max(arrays)
                cbytes[base] += k * size
                ccount[base] += k
            if comp not in fused and ins.op not in _FREE and not ins.op.endswith("-done"):
                accessed += k * (_bytes(ins.shape) + sum(_bytes(shapes[comp].get(o, "")) for o in ins.operands))
    return HloStats(
        flops=flops,
        bytes_accessed=accessed,
        collective_bytes=dict(cbytes),
        collective_count=dict(ccount),
        unknown_trip_counts=sum(mult[c] > 0 for c in unknown),
        kernels=int(kernels),
    )


# Published per-chip peaks (Cloud TPU documentation): bf16 FLOP/s, HBM bytes/s, ICI bytes/s
# per chip (all links together), HBM GiB.
CHIPS = {
    "v5e": dict(flops=197e12, hbm_bw=819e9, ici_bw=1600e9 / 8, hbm_gib=16.0),
    "v5p": dict(flops=459e12, hbm_bw=2765e9, ici_bw=4800e9 / 8, hbm_gib=95.0),
    "v6e": dict(flops=918e12, hbm_bw=1640e9, ici_bw=3584e9 / 8, hbm_gib=32.0),
    "v4": dict(flops=275e12, hbm_bw=1228e9, ici_bw=2400e9 / 8, hbm_gib=32.0),
}


def chip_of(topology: str) -> str | None:
    """``'v5p:4x4x4'`` -> ``'v5p'`` (None when the chip has no entry in ``CHIPS``)."""
    name = topology.split(":")[0].lower().replace("litepod", "").replace("-", "")
    name = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}.get(name, name)
    return name if name in CHIPS else None


def roofline(stats: HloStats, model_flops_per_device: float, chip: str) -> dict:
    """The step time's lower bound on ``chip`` if compute, HBM traffic and collectives each ran
    at the chip's published peak and overlapped perfectly, and the MFU that bound allows: a
    bound, not a measurement. Compute counts the larger of the program's dot FLOPs (with
    remat's recomputation, without what runs inside Pallas kernels) and the model's FLOPs."""
    c = CHIPS[chip]
    parts = dict(
        compute_s=max(stats.flops, model_flops_per_device) / c["flops"],
        hbm_s=stats.bytes_accessed / c["hbm_bw"],
        collective_s=stats.total_collective_bytes / c["ici_bw"],
    )
    bound = max(parts.values())
    limit = max(parts, key=parts.get).removesuffix("_s")
    return dict(
        parts,
        bound_s=bound,
        bound_by=limit,
        mfu_bound=model_flops_per_device / (bound * c["flops"]) if bound > 0 else None,
    )
