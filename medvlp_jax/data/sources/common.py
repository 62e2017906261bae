"""What every converter shares: seeded group splits, the write loop (progress, skips, limits, workers),
CheXpert class names, and the summary a ``prepare_<name>`` function returns.

A converter builds a list of ``Task``s (one per output example, already assigned to a split, in write
order) and a picklable ``load`` function that turns a task's ``payload`` into an example dict (it reads and
resizes the image). ``write_examples`` runs ``load`` (in worker processes when ``num_workers > 0``, results
kept in order, so the output is the same either way), writes each split with ``ShardedWriter``, and
either raises on the first unreadable image (naming the file) or, with ``skip_bad=True``, counts it, logs
it and lists it in ``<out_dir>/skipped_files.txt``.

Inside ``collect_plans()`` a converter's ``prepare_<name>`` writes nothing: ``write_examples`` hands its
``Plan`` (the tasks, ``load`` and the data set's metadata) to the caller instead. The TFDS builders
(``medvlp_jax/data/tfds_builders``) run the converters' own readers this way.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import json
import logging
import multiprocessing
import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.writer import ShardedWriter

log = logging.getLogger(__name__)

SUMMARY_FILE = "prepare_summary.json"
SKIPPED_FILE = "skipped_files.txt"

# The 14 CheXpert observations, in the column order of CheXpert's own train.csv. MIMIC-CXR's
# -chexpert.csv.gz lists the same names alphabetically; readers index by name, never by position.
CHEXPERT_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
# The 5 CheXpert competition tasks (MGCA/GLoRIA order).
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@dataclasses.dataclass
class Task:
    """One example to write: its split, the file it reads (for error messages) and what ``load`` needs."""
    split: str
    path: str
    payload: Any


@dataclasses.dataclass
class Plan:
    """Everything ``write_examples`` was asked to write, for a caller that writes it another way."""
    name: str
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    tasks: list[Task]                      # in write order, ``limit`` not yet applied
    load: Callable[[Any], dict]
    limit: Optional[int]
    skip_bad: bool
    num_workers: int
    dropped: dict[str, int]
    counts: dict[str, Any]
    extra_info: dict[str, Any]


_PLANS: contextvars.ContextVar[Optional[list[Plan]]] = contextvars.ContextVar("medvlp_plans", default=None)


@contextlib.contextmanager
def collect_plans() -> Iterator[list[Plan]]:
    """Within the block, ``write_examples`` appends its ``Plan`` to the yielded list and writes nothing."""
    plans: list[Plan] = []
    token = _PLANS.set(plans)
    try:
        yield plans
    finally:
        _PLANS.reset(token)


def limit_tasks(tasks: Sequence[Task], limit: Optional[int]) -> list[Task]:
    """The first ``limit`` tasks of each split, in order (all of them when ``limit`` is None)."""
    if limit is None:
        return list(tasks)
    seen: collections.Counter = collections.Counter()
    kept = []
    for t in tasks:
        if seen[t.split] < limit:
            kept.append(t)
            seen[t.split] += 1
    return kept


def split_groups(groups: Iterable[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assigns each group (patient, image) to a split, seeded and independent of input order.

    The sorted unique groups are permuted with ``np.random.default_rng(seed)``; the last splits in
    ``fractions`` get ``round(n * fraction)`` groups each and the first split the rest (so with
    {"train": .7, "validation": .15, "test": .15} train absorbs the rounding).

    Returns:
      group -> split name.
    """
    names = list(fractions)
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    uniq = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(uniq))
    counts = {k: int(round(len(uniq) * fractions[k])) for k in names[1:]}
    counts[names[0]] = len(uniq) - sum(counts.values())
    if counts[names[0]] < 0:
        raise ValueError(f"split fractions {fractions} leave no room for {names[0]!r}")
    out, start = {}, 0
    for k in names:
        for i in order[start:start + counts[k]]:
            out[uniq[i]] = k
        start += counts[k]
    return out


def _run_one(args: tuple[Callable[[Any], dict], Task]) -> tuple[str, Any]:
    load, task = args
    try:
        return "ok", load(task.payload)
    except images.ImageReadError as e:
        return "bad", (e.path, e.reason)


def load_tasks(load: Callable[[Any], dict], tasks: Sequence[Task],
               num_workers: int) -> Iterator[tuple[str, Any]]:
    """("ok", example) or ("bad", (path, reason)) per task, in task order (worker processes when > 0)."""
    if num_workers <= 0:
        for t in tasks:
            yield _run_one((load, t))
        return
    # spawn, not fork: the parent has TensorFlow loaded, and forking a process with TF's threads can
    # deadlock. Workers import only numpy/PIL/pydicom. imap keeps the task order.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers) as pool:
        yield from pool.imap(_run_one, ((load, t) for t in tasks), chunksize=8)


def write_examples(out_dir: str, *, name: str, class_names: Sequence[str], splits: Sequence[str],
                   tasks: Sequence[Task], load: Callable[[Any], dict], num_shards: int,
                   skip_bad: bool, limit: Optional[int], num_workers: int = 0, progress: bool = True,
                   dropped: Optional[dict[str, int]] = None, counts: Optional[dict[str, Any]] = None,
                   extra_info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Loads and writes every task; returns (and saves as ``prepare_summary.json``) the summary.

    Args:
      out_dir: the prepared data set's directory.
      name: data set name for dataset_info.json.
      class_names: label names, in label order.
      splits: split names to create (each gets a writer, possibly with 0 examples).
      tasks: examples in write order.
      load: payload -> example dict (``id``, ``image``, ``report``, ``labels``, ...); picklable (a
        module-level function or a functools.partial of one) when num_workers > 0. It raises
        ``images.ImageReadError`` for an unreadable image.
      num_shards: shards per split (a split with fewer examples still gets them, some empty).
      skip_bad: count and log unreadable images instead of raising.
      limit: write at most this many examples per split (a quick subset; splits are unchanged).
      num_workers: image-loading processes (0: in this process).
      progress: show a tqdm bar.
      dropped: reason -> count of candidates the converter already dropped before loading.
      counts: other converter counts for the summary.
      extra_info: merged into dataset_info.json.

    Returns:
      {"name", "out_dir", "splits": {split: written}, "dropped": {reason: n}, "skipped_files": [...],
       "counts": {...}, "seconds"}.

    Raises:
      images.ImageReadError: an unreadable image when ``skip_bad`` is False (the message names the file
        and says how to skip it).
    """
    plans = _PLANS.get()
    if plans is not None:                  # inside collect_plans(): hand the plan over, write nothing
        plans.append(Plan(name=name, class_names=tuple(class_names), splits=tuple(splits), tasks=list(tasks),
                          load=load, limit=limit, skip_bad=skip_bad, num_workers=num_workers,
                          dropped=dict(dropped or {}), counts=dict(counts or {}), extra_info=dict(extra_info or {})))
        return {"name": name, "planned": True}
    from tqdm.auto import tqdm
    t0 = time.time()
    dropped = collections.Counter(dropped or {})
    tasks = limit_tasks(tasks, limit)
    unknown = {t.split for t in tasks} - set(splits)
    if unknown:
        raise ValueError(f"tasks name splits {sorted(unknown)} not in {list(splits)}")
    os.makedirs(out_dir, exist_ok=True)
    writers = {s: ShardedWriter(out_dir, s, num_shards=num_shards, class_names=list(class_names),
                                name=name, extra_info=extra_info) for s in splits}
    skipped: list[str] = []
    bar = tqdm(total=len(tasks), desc=f"prepare {name}", unit="img", disable=not progress)
    try:
        for task, (status, value) in zip(tasks, load_tasks(load, tasks, num_workers)):
            bar.update(1)
            if status == "bad":
                path, reason = value
                if not skip_bad:
                    raise images.ImageReadError(
                        path, f"{reason} (pass skip_bad=True to skip unreadable images and list them "
                              f"in {SKIPPED_FILE})")
                log.warning("skipping unreadable image %s: %s", path, reason)
                skipped.append(f"{path}\t{reason}")
                dropped["bad_image"] += 1
                continue
            writers[task.split].write(value)
    except BaseException:
        for w in writers.values():
            w.__exit__(RuntimeError, None, None)   # close the files, leave the manifest alone
        raise
    finally:
        bar.close()
    written = {s: writers[s].close()["splits"][s]["num_examples"] for s in splits}
    with open(os.path.join(out_dir, SKIPPED_FILE), "w") as f:
        f.write("".join(line + "\n" for line in skipped))
    summary = {
        "name": name, "out_dir": out_dir, "splits": written,
        "dropped": dict(sorted(dropped.items())), "skipped_files": [s.split("\t")[0] for s in skipped],
        "counts": dict(counts or {}), "seconds": round(time.time() - t0, 3),
    }
    with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    log.info("prepared %s in %s: %s; dropped %s", name, out_dir, written, summary["dropped"])
    return summary


def finding_arrays(names: list[str], phrases: list[str], boxes: np.ndarray,
                   masks: Optional[list[np.ndarray]] = None) -> dict[str, Any]:
    """The finding_* fields of an example (masks PNG-encoded)."""
    out = {"finding_names": names, "finding_phrases": phrases,
           "finding_boxes": np.asarray(boxes, np.float32).reshape(-1, 4)}
    if masks is not None:
        out["finding_masks"] = [images.encode_png(m) for m in masks]
    return out
