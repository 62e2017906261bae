"""Where a compiled XLA:CPU program spends its time: per-instruction thunk times from a ``jax.profiler`` trace,
grouped into categories (matmuls by role, attention, layer norm, GELU, softmax, dropout's random bits, layout
copies, the word-piece merge, the optimizer update, ...) read from the optimized HLO's metadata.

    module = parse_hlo(compiled.as_text())
    events = load_trace_events(trace_dir)                  # perfetto JSON written by jax.profiler.trace
    rows = profile_table(module, events, steps=3, source_root=".")

How an instruction is attributed: XLA:CPU runs the optimized program's entry computation as a sequence of thunks
and the profiler records one event per thunk, named after its HLO instruction (``ynn_fusion.12``,
``select_select_fusion``, ``while.3``). Loop and conditional bodies run inside their parent's event and are not
counted again. The optimized HLO keeps, for every instruction, the JAX op name (``jvp(...)`` forward,
``transpose(jvp(...))`` backward, Flax module path) and a stack-frame id into the module's ``StackFrames`` table:
the Python call stack that created it (file, function, line). ``categorize`` reads a fusion's inner
instructions and those stacks (the source line text too, when the checkout is at ``source_root``).
FLOPs are counted for dot and convolution instructions from their shapes (2 x multiply-adds), so each matmul
category also gets its achieved GFLOP/s.

Times are thread-seconds: XLA:CPU may run independent thunks concurrently and an op may use several threads
internally (then its event covers its wall time once), so the column sums can differ from the step's wall time.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
import re
from typing import Any, Iterable, Optional

# Categories, in the order tables list them.
CATEGORIES = (
    "matmul: dense (QKV/out projections, MLP, heads)",
    "matmul: attention (QK^T, PV)",
    "matmul: patch embedding",
    "matmul: objective",
    "word-piece merge",
    "layer norm",
    "BatchNorm (projection heads)",
    "GELU",
    "softmax",
    "dropout: random bits",
    "dropout: mask apply",
    "embedding gather / scatter",
    "layout: transposes / copies",
    "objective (elementwise)",
    "optimizer update (AdamW)",
    "finiteness guard, norms, state select",
    "other elementwise",
)
# Opcodes that only move or reinterpret data.
LAYOUT_OPS = {"parameter", "bitcast", "constant", "tuple", "get-tuple-element", "broadcast", "reshape", "copy",
              "transpose", "slice", "concatenate", "pad", "iota", "dynamic-slice", "dynamic-update-slice",
              "bitcast-convert", "reverse"}
RNG_PATTERN = re.compile(r"threefry|random_bits|_uniform|_bernoulli|rng_bit_generator|random_wrap|random_fold_in|"
                         r"random_split|random_seed|shift_right_logical")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w\-.])([a-z][a-z0-9\-]*)\(")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_SHAPE = re.compile(r"^(\w+)\[([0-9,]*)\]")


@dataclasses.dataclass
class Instruction:
    """One HLO instruction: name, opcode, result shape text, operand names, attributes text."""
    name: str
    opcode: str
    shape: str
    operands: list[str]
    attrs: str
    computation: str

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def stack_frame_id(self) -> Optional[int]:
        m = re.search(r"stack_frame_id=(\d+)", self.attrs)
        return int(m.group(1)) if m else None

    def called(self) -> list[str]:
        """Computations this instruction calls (fusion bodies, loop bodies and conditions, branches)."""
        names = re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", self.attrs)
        for group in re.findall(r"branch_computations=\{([^}]*)\}", self.attrs):
            names += re.findall(r"%([\w.\-]+)", group)
        return names


@dataclasses.dataclass
class HloModule:
    """The parts of an optimized HLO module text the profile needs."""
    entry: str
    computations: dict[str, list[Instruction]]
    frames: dict[int, tuple[int, int]]            # frame id -> (location id, parent frame id or 0)
    locations: dict[int, tuple[str, str, int]]    # location id -> (file, function, line)

    def instruction(self, name: str) -> Optional[Instruction]:
        for instrs in self.computations.values():
            for ins in instrs:
                if ins.name == name:
                    return ins
        return None

    def stack(self, frame_id: Optional[int]) -> list[tuple[str, str, int]]:
        """(file, function, line) from the innermost frame outwards."""
        out, seen = [], set()
        while frame_id and frame_id in self.frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = self.frames[frame_id]
            if loc in self.locations:
                out.append(self.locations[loc])
            frame_id = parent
        return out

    def inner(self, ins: Instruction) -> list[Instruction]:
        """Every instruction of the computations ``ins`` calls, transitively (itself when it calls none)."""
        out, todo, seen = [], list(ins.called()), set()
        while todo:
            c = todo.pop()
            if c in seen or c not in self.computations:
                continue
            seen.add(c)
            for sub in self.computations[c]:
                out.append(sub)
                todo.extend(sub.called())
        return out or [ins]


def _table(text: str, name: str) -> list[str]:
    m = re.search(rf"^{name}\n(.*?)(?:\n\n|\n[A-Z]\w*\n|\Z)", text, re.S | re.M)
    return m.group(1).splitlines() if m else []


def parse_hlo(text: str) -> HloModule:
    """Parses ``compiled.as_text()``: computations, instructions, and the stack-frame tables.

    StackFrames rows are ``id {file_location_id=L parent_frame_id=P}`` with P one above the parent's id (0 and a
    row's own id + 1 mean none), as XLA prints them.
    """
    files = {int(l.split()[0]): l.split(None, 1)[1].strip('"') for l in _table(text, "FileNames") if l.strip()}
    funcs = {int(l.split()[0]): l.split(None, 1)[1].strip('"') for l in _table(text, "FunctionNames") if l.strip()}
    locations = {}
    for l in _table(text, "FileLocations"):
        d = dict(re.findall(r"(\w+)=(\d+)", l))
        if l.strip() and "file_name_id" in d:
            locations[int(l.split()[0])] = (files.get(int(d["file_name_id"]), "?"),
                                            funcs.get(int(d["function_name_id"]), "?"), int(d["line"]))
    frames = {}
    for l in _table(text, "StackFrames"):
        m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", l.strip())
        if m:
            fid, parent = int(m.group(1)), int(m.group(3)) - 1
            frames[fid] = (int(m.group(2)), parent if parent != fid else 0)
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = _COMP_HEAD.match(line)
        if head and not line.startswith(" "):
            current = head.group(2)
            computations[current] = []
            if head.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        rest = m.group(2)
        op = _OPCODE.search(rest)
        if not op:
            continue
        args_start = op.end()
        depth, i = 1, args_start
        while i < len(rest) and depth:
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        operands = re.findall(r"%([\w.\-]+)", rest[args_start:i - 1])
        computations[current].append(Instruction(m.group(1), op.group(1), rest[:op.start()].strip(), operands,
                                                 rest[i:], current))
    return HloModule(entry=entry, computations=computations, frames=frames, locations=locations)


def _dims(shape: str) -> Optional[list[int]]:
    m = _SHAPE.match(shape.strip())
    if not m:
        return None
    return [int(x) for x in m.group(2).split(",") if x] if m.group(2) else []


def instruction_flops(module: HloModule, ins: Instruction) -> float:
    """2 x multiply-adds of a dot or convolution (0 for anything else); fusions: the sum over their dots/convs."""
    total = 0.0
    for sub in module.inner(ins) if ins.opcode == "fusion" else [ins]:
        if sub.opcode not in ("dot", "convolution"):
            continue
        shapes = {i.name: i.shape for i in module.computations.get(sub.computation, [])}
        out = _dims(sub.shape)
        lhs = _dims(shapes.get(sub.operands[0], "")) if sub.operands else None
        rhs = _dims(shapes.get(sub.operands[1], "")) if len(sub.operands) > 1 else None
        if out is None or lhs is None:
            continue
        if sub.opcode == "dot":
            m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", sub.attrs)
            k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
            total += 2.0 * math.prod(out) * k
        elif rhs is not None:
            labels = re.search(r"dim_labels=\w+_(\w+)->", sub.attrs)
            o = rhs[labels.group(1).index("o")] if labels and "o" in labels.group(1) else 1
            groups = re.search(r"feature_group_count=(\d+)", sub.attrs)
            total += 2.0 * math.prod(out) * math.prod(rhs) / max(o, 1) / (int(groups.group(1)) if groups else 1)
    return total


class _Source:
    """Reads source lines of the files named in the stack frames (empty when the file is elsewhere)."""

    def __init__(self, root: Optional[str]):
        self.root, self.cache = root, {}

    def line(self, path: str, line: int) -> str:
        if path not in self.cache:
            candidates = [path]
            if self.root and "medvlp_jax/" in path:     # the last one: the package, not a checkout directory
                candidates.append(os.path.join(self.root, path[path.rindex("medvlp_jax/"):]))
            self.cache[path] = []
            for p in candidates:
                if os.path.isfile(p):
                    with open(p, encoding="utf-8", errors="replace") as f:
                        self.cache[path] = f.read().splitlines()
                    break
        lines = self.cache[path]
        return lines[line - 1] if 0 < line <= len(lines) else ""


def categorize(module: HloModule, ins: Instruction, source: Optional[_Source] = None) -> str:
    """The category (one of CATEGORIES) of an entry-computation instruction; see the module docstring."""
    source = source or _Source(None)
    inner = module.inner(ins) if ins.opcode in ("fusion", "while", "conditional", "call") else [ins]
    ops = {i.opcode for i in inner}
    names = " ".join({i.op_name for i in inner} | {ins.op_name})

    def stacks(instrs: Iterable[Instruction]):
        for i in instrs:
            yield module.stack(i.stack_frame_id)

    matmuls = [i for i in inner if i.opcode in ("dot", "convolution")]
    if matmuls:
        i = max(matmuls, key=lambda d: instruction_flops(module, d))
        stack = module.stack(i.stack_frame_id)
        funcs = {fn for _, fn, _ in stack}
        files = " ".join(f for f, _, _ in stack)
        if "merge_slots" in funcs:
            return "word-piece merge"
        if "/methods/" in files:
            return "matmul: objective"
        if "patch_embed" in i.op_name:
            return "matmul: patch embedding"
        innermost = stack[0] if stack else ("", "", 0)
        if innermost[1].startswith("SelfAttention.__call__") and "einsum" in source.line(innermost[0],
                                                                                         innermost[2]) \
                or re.search(r"bqhd,bkhd|bhqk,bkhd", i.op_name):
            return "matmul: attention (QK^T, PV)"
        return "matmul: dense (QKV/out projections, MLP, heads)"
    if ops & {"rng-bit-generator", "rng", "rng-get-and-update-state"} or RNG_PATTERN.search(names):
        return "dropout: random bits"
    if ops <= LAYOUT_OPS:
        return "layout: transposes / copies"
    all_stacks = list(stacks([ins] + inner))
    funcs = {fn for st in all_stacks for _, fn, _ in st}
    files = " ".join(f for st in all_stacks for f, _, _ in st)
    lines = " ".join(source.line(st[0][0], st[0][2]) for st in all_stacks if st)
    if funcs & {"merge_slots", "slot_masks", "full_length_tail"}:
        return "word-piece merge"
    if "/methods/" in files and "forward_loss" in " ".join(funcs) or "prepare_params" in " ".join(funcs):
        return "objective (elementwise)"
    if "Dropout.__call__" in funcs or "/Dropout_" in names:
        return "dropout: mask apply"
    if "BatchNorm.__call__" in funcs:
        return "BatchNorm (projection heads)"
    if any(f.startswith("LayerNorm") or f.startswith("_compute_stats") or f == "_normalize" for f in funcs):
        return "layer norm"
    if "gelu" in lines or re.search(r"/erfc?\b|/erf_inv|gelu", names):
        return "GELU"
    if "softmax" in lines or "softmax" in names:
        return "softmax"
    if "Embed.__call__" in funcs or ops & {"gather", "scatter"}:
        return "embedding gather / scatter"
    if "/optax/" in files:
        return "optimizer update (AdamW)"
    if "forward_loss" not in " ".join(funcs) and "/train/step.py" in files:
        return "finiteness guard, norms, state select"
    return "other elementwise"


def load_trace_events(trace_dir: str) -> list[dict[str, Any]]:
    """The complete ('X') events of the newest perfetto trace (``*.trace.json.gz``) under ``trace_dir``."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: run jax.profiler.trace(..., "
                                "create_perfetto_trace=True) first")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def profile_table(module: HloModule, events: list[dict[str, Any]], *, steps: int,
                  source_root: Optional[str] = None) -> dict[str, Any]:
    """Per-category and per-instruction times (ms per step) of the entry computation's thunks.

    Args:
      module: ``parse_hlo`` of the profiled executable.
      events: trace events (``load_trace_events``) covering ``steps`` executions of it.
      steps: executions in the trace (times are divided by it).
      source_root: checkout whose ``medvlp_jax/`` files the stack frames name (for source-line rules).

    Returns:
      {"categories": [{"category", "ms", "forward_ms", "backward_ms", "gflop", "gflop_per_s", "share",
      "instructions"}], "top": the 25 slowest instructions [{"name", "category", "ms", "gflop", "op_name"}],
      "total_ms": sum of entry thunk times per step, "unmatched_events": events of other names}.
    """
    source = _Source(source_root)
    entry = {i.name: i for i in module.computations[module.entry]}
    per_instr: dict[str, float] = {}
    unmatched = 0
    for e in events:
        if e["name"] in entry:
            per_instr[e["name"]] = per_instr.get(e["name"], 0.0) + float(e["dur"]) / 1e3 / steps
        else:
            unmatched += 1
    cats: dict[str, dict[str, Any]] = {c: {"category": c, "ms": 0.0, "forward_ms": 0.0, "backward_ms": 0.0,
                                           "gflop": 0.0, "instructions": 0} for c in CATEGORIES}
    top = []
    for name, ms in per_instr.items():
        ins = entry[name]
        cat = categorize(module, ins, source)
        flops = instruction_flops(module, ins) / 1e9
        row = cats[cat]
        row["ms"] += ms
        row["gflop"] += flops
        row["instructions"] += 1
        names = " ".join({i.op_name for i in module.inner(ins)} | {ins.op_name})
        row["backward_ms" if "transpose(jvp" in names else "forward_ms"] += ms
        top.append({"name": name, "category": cat, "ms": ms, "gflop": flops, "op_name": ins.op_name})
    total = sum(per_instr.values())
    rows = []
    for c in CATEGORIES:
        r = cats[c]
        if r["instructions"] == 0:
            continue
        r["share"] = r["ms"] / total if total else 0.0
        r["gflop_per_s"] = r["gflop"] / (r["ms"] / 1e3) if r["gflop"] and r["ms"] else None
        rows.append(r)
    top.sort(key=lambda r: -r["ms"])
    return {"categories": rows, "top": top[:25], "total_ms": total, "unmatched_events": unmatched}


def markdown_table(table: dict[str, Any]) -> str:
    """The category rows as a Markdown table (ms per step, share, forward/backward split, GFLOP, GFLOP/s)."""
    lines = ["| category | ms/step | share | forward ms | backward ms | GFLOP | GFLOP/s | thunks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table["categories"]:
        rate = "" if r["gflop_per_s"] is None else f"{r['gflop_per_s']:.0f}"
        gflop = f"{r['gflop']:.1f}" if r["gflop"] else ""
        lines.append(f"| {r['category']} | {r['ms']:.0f} | {100 * r['share']:.1f}% | {r['forward_ms']:.0f} | "
                     f"{r['backward_ms']:.0f} | {gflop} | {rate} | {r['instructions']} |")
    lines.append(f"| **sum of thunk times** | **{table['total_ms']:.0f}** | 100% | | | "
                 f"{sum(r['gflop'] for r in table['categories']):.1f} | | |")
    return "\n".join(lines) + "\n"
