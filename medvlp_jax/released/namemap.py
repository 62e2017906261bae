"""Shared machinery of the released-checkpoint importers: the report, prefixed sections, head maps, shape checks.

A released checkpoint is one flat state dict whose keys are module attribute paths of the authors' model
(``img_encoder_q.model.blocks.0.attn.qkv.weight``). A format module splits it into *sections* by key prefix
(image tower, text tower, each projection head, method parameters), converts each section with a name map
(``hf_import``'s BERT / timm-ViT / torchvision-ResNet maps for the towers, the head maps below), and records
what happened to every key in one ``ReleasedImportReport``:

  loaded      converted into the Flax variables (or the method parameters);
  missing     needed by a name map but absent from the file;
  unexpected  present in the file, used by no name map and not known to be irrelevant;
  ignored     known to be irrelevant, each with the reason (BatchNorm step counters, unused layers, ...);
  shapes      every converted array checked against the shape the Flax model expects.

Nothing is dropped silently: an import with any missing or unexpected key, or any shape mismatch, is refused.

Torch -> Flax layouts: Linear [out, in] -> Dense kernel [in, out]; a kernel-1 Conv1d [out, in, 1] or 1x1
Conv2d [out, in, 1, 1] applied position by position is the same Dense (kernel ``w[:, :, 0(, 0)].T``);
BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from medvlp_jax.models import hf_import

StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]
BN_COUNTER_PATTERN = re.compile(r".*num_batches_tracked")


class CheckpointImportError(ValueError):
    """A released checkpoint cannot be imported; the message is one actionable line."""


@dataclasses.dataclass
class ReleasedImportReport:
    """What an import did with every key of a released checkpoint.

    Attributes:
      format: importer name ("mgca", "gloria").
      source: the checkpoint file.
      loaded: keys converted (sorted).
      missing: keys a name map needs that the file lacks.
      unexpected: keys neither converted nor known to be irrelevant.
      ignored: key -> why it is not converted.
      shape_mismatches: "where: checkpoint shape vs model shape" lines (empty when all fit).
      shapes_checked: number of converted arrays compared with the model's shapes.
      notes: remarks (inferred sizes, assumptions, stand-ins used while unpickling).
      architecture: the inferred sizes (written to import_report.json).
      lightning: the checkpoint's training metadata (epoch, global_step, versions), JSON-safe.
    """
    format: str
    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)
    shape_mismatches: list[str] = dataclasses.field(default_factory=list)
    shapes_checked: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
    lightning: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected and not self.shape_mismatches

    def add(self, prefix: str, section_keys: Iterable[str], sub: hf_import.ImportReport,
            reasons: Mapping[str, str]) -> None:
        """Merges a ``hf_import`` sub-report of a section whose keys had ``prefix`` stripped.

        Args:
          prefix: the stripped prefix (added back to every key).
          section_keys: the (stripped) keys the section's converter was given.
          sub: its report; the keys it neither ignored nor found unexpected were converted.
          reasons: regex (full match on the stripped key) -> reason, for the sub-report's ignored keys; an
            ignored key without a matching reason is a bug in the format module and raises.
        """
        used = sorted(set(section_keys) - set(sub.unexpected) - set(sub.ignored))
        self.loaded += [prefix + k for k in used]
        self.missing += [prefix + k for k in sub.missing]
        self.unexpected += [prefix + k for k in sub.unexpected]
        for k in sub.ignored:
            self.ignored[prefix + k] = reason_for(k, reasons)
        self.notes += [f"{prefix}*: {n}" for n in sub.notes]

    def ignore(self, keys: Iterable[str], reason: str) -> None:
        """Records ``keys`` (full checkpoint keys) as deliberately not converted, with the reason."""
        for k in keys:
            self.ignored[k] = reason

    def sweep(self, all_keys: Iterable[str]) -> None:
        """Every checkpoint key no section accounted for becomes unexpected (nothing slips through)."""
        seen = set(self.loaded) | set(self.ignored) | set(self.unexpected)
        self.unexpected += sorted(set(all_keys) - seen)

    def summary(self, limit: int = 6) -> str:
        """One line: counts, and the first keys of every non-empty problem list."""
        parts = [f"{self.format} import of {self.source}: loaded {len(self.loaded)}, ignored {len(self.ignored)}, "
                 f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                 f"shape checks {self.shapes_checked} ({len(self.shape_mismatches)} mismatched)"]
        for name in ("missing", "unexpected", "shape_mismatches"):
            items = getattr(self, name)
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{name}: {', '.join(items[:limit])}{more}")
        return "; ".join(parts)

    def text(self) -> str:
        """Multi-line human-readable report (printed by launch/import_checkpoint.py)."""
        lines = [self.summary()]
        reasons: dict[str, list[str]] = {}
        for key, why in self.ignored.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in sorted(reasons.items()):
            lines.append(f"  ignored {len(keys):4d} ({why}): e.g. {keys[0]}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dict(format=self.format, source=self.source, ok=self.ok, loaded=sorted(self.loaded),
                    missing=sorted(self.missing), unexpected=sorted(self.unexpected),
                    ignored=dict(sorted(self.ignored.items())), shapes_checked=self.shapes_checked,
                    shape_mismatches=self.shape_mismatches, notes=self.notes, architecture=self.architecture,
                    lightning=self.lightning)

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1, default=str)

    def raise_if_incomplete(self) -> None:
        """Raises CheckpointImportError (one line) when any key is missing or unexpected or any shape disagrees."""
        if not self.ok:
            raise CheckpointImportError(self.summary())


def reason_for(key: str, reasons: Mapping[str, str]) -> str:
    """The reason whose regex fully matches ``key``; a key without one is a bug in the caller's tables."""
    for pattern, why in reasons.items():
        if re.fullmatch(pattern, key):
            return why
    raise AssertionError(f"ignored key {key!r} has no documented reason")


# ----------------------------------------------------------------------------------------------------------
# Sections and prefixes.

def section(sd: Mapping[str, np.ndarray], prefix: str) -> StateDict:
    """The keys of ``sd`` under ``prefix``, with the prefix stripped."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def count_indexed(sd: Mapping[str, np.ndarray], pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` (regex with one group) over the keys; 0 when none match."""
    ids = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def require(sd: Mapping[str, np.ndarray], keys: Sequence[str], source: str, what: str) -> None:
    """Raises one line naming the absent keys when any of ``keys`` is missing (format detection)."""
    absent = [k for k in keys if k not in sd]
    if absent:
        prefixes = sorted({k.split(".")[0] + "." for k in sd})
        raise CheckpointImportError(f"{source}: not {what}: missing {', '.join(absent[:6])}"
                           f"{f' (+{len(absent) - 6} more)' if len(absent) > 6 else ''}; "
                           f"its top-level key prefixes are {prefixes[:8]}")


# ----------------------------------------------------------------------------------------------------------
# Head name maps (entries in hf_import's (key, path, transform) form; paths start with the collection).

Entry = tuple[str, Path, Callable[[np.ndarray], np.ndarray]]


def _pointwise_kernel(a: np.ndarray) -> np.ndarray:
    """Linear [out, in], Conv1d [out, in, 1] or Conv2d [out, in, 1, 1] -> Dense kernel [in, out]."""
    if a.ndim > 2:
        if any(s != 1 for s in a.shape[2:]):
            raise CheckpointImportError(f"expected a kernel-1 convolution, got weight shape {list(a.shape)}")
        a = a.reshape(a.shape[:2])
    return a.T


def dense(key_prefix: str, path: Path, *, bias: bool = True) -> list[Entry]:
    """Linear / pointwise conv ``key_prefix.{weight,bias}`` -> ``("params",) + path + {kernel, bias}``."""
    out = [(f"{key_prefix}.weight", ("params",) + path + ("kernel",), _pointwise_kernel)]
    if bias:
        out.append((f"{key_prefix}.bias", ("params",) + path + ("bias",), lambda a: a))
    return out


def batchnorm(key_prefix: str, path: Path, *, affine: bool = True) -> list[Entry]:
    """BatchNorm1d/2d -> params scale/bias (when affine) and batch_stats mean/var."""
    out = [(f"{key_prefix}.running_mean", ("batch_stats",) + path + ("mean",), lambda a: a),
           (f"{key_prefix}.running_var", ("batch_stats",) + path + ("var",), lambda a: a)]
    if affine:
        out += [(f"{key_prefix}.weight", ("params",) + path + ("scale",), lambda a: a),
                (f"{key_prefix}.bias", ("params",) + path + ("bias",), lambda a: a)]
    return out


def mlp_bn_head(key_prefix: str, head: str) -> list[Entry]:
    """MGCA's Global/LocalEmbedding ``head.{0,1,3,4}`` -> ``heads.ProjectionHead(kind="mlp_bn")`` named ``head``.

    0 Linear/Conv1d -> dense_in; 1 BatchNorm1d -> bn_in; (2 ReLU); 3 Linear/Conv1d -> dense_out;
    4 BatchNorm1d(affine=False) -> bn_out (running statistics only).
    """
    return (dense(f"{key_prefix}.0", (head, "dense_in")) + batchnorm(f"{key_prefix}.1", (head, "bn_in"))
            + dense(f"{key_prefix}.3", (head, "dense_out"))
            + batchnorm(f"{key_prefix}.4", (head, "bn_out"), affine=False))


def convert_entries(sd: Mapping[str, np.ndarray], entries: Sequence[Entry]) -> tuple[dict, list[str], list[str]]:
    """Applies (key, path, transform) entries. Returns (nested tree, used keys, missing keys)."""
    tree: dict = {}
    used, missing = [], []
    for key, path, fn in entries:
        if key not in sd:
            missing.append(key)
            continue
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(fn(np.asarray(sd[key])), dtype=np.float32)
        used.append(key)
    return tree, used, missing


def merge_trees(*trees: Mapping[str, Any]) -> dict:
    """Deep union of nested dicts; a leaf defined twice is a bug and raises."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, Mapping):
                out[k] = merge_trees(out.get(k, {}), v)
            elif k in out:
                raise AssertionError(f"variable {k!r} converted twice")
            else:
                out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# Shape checks against the Flax model.

def check_against(converted: Mapping[str, Any], expected: Mapping[str, Any], where: str = "") -> tuple[int, list[str]]:
    """Compares two variable trees leaf by leaf (names and shapes).

    Args:
      converted: the converted tree (numpy leaves).
      expected: the model's tree (arrays or ShapeDtypeStructs), e.g. ``jax.eval_shape(model.init, ...)``.
      where: prefix for the messages.

    Returns:
      (number of leaves compared, problem lines: leaves the model has but the import did not fill, leaves the
      import made that the model lacks, and shape disagreements).
    """
    got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(converted)}
    want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    problems = [f"{where}{k}: the model has it, the checkpoint gave nothing" for k in sorted(set(want) - set(got))]
    problems += [f"{where}{k}: converted, but the model has no such variable" for k in sorted(set(got) - set(want))]
    both = sorted(set(got) & set(want))
    problems += [f"{where}{k}: checkpoint {list(np.shape(got[k]))} vs model {list(want[k].shape)}"
                 for k in both if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    return len(both), problems


def jsonable(obj: Any) -> Any:
    """Plain JSON values from checkpoint metadata (tensors -> lists or floats, unknown objects -> repr)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


def optional_int(value: Optional[Any]) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
