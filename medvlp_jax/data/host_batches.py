"""Host-side batching: raw tf.data batches -> tokenised numpy batches (``HostBatches``), a background prefetcher
that makes them global arrays ahead of the step (``Prefetcher``), and sums of per-host counts.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from medvlp_jax.data import bad_records, tokenizer as tokenizer_lib
from medvlp_jax.errors import BadRecordError

if TYPE_CHECKING:
    from medvlp_jax.data.pipeline import RawBatches

MAX_LOGGED_SKIPS = 10

log = logging.getLogger("medvlp_jax")


class HostBatches:
    """Raw tf.data batches -> tokenised numpy batches (see module docstring for the keys).

    Attributes:
      num_skipped: bad records this iterator turned into ``valid=False`` rows so far (``skip_bad_records``);
        per host, counted from the iterator's start step. ``global_count`` sums it over processes.
      skipped: descriptions of the first ``MAX_LOGGED_SKIPS`` skipped records (file, record, reason).
    """

    def __init__(self, raw: RawBatches, tokenizer, max_text_len: int, describe: str):
        self._it = raw.dataset.as_numpy_iterator()
        self._raw = raw
        self._tok = tokenizer
        self._max_len = max_text_len
        self._describe = describe
        self._batches = 0
        self.num_skipped = 0
        self.skipped: list[str] = []

    def __iter__(self):
        return self

    def _error(self, e) -> Exception:
        hint = "set config.data.skip_bad_records=True to skip such records (they are counted and logged)"
        where = ""
        if self._raw.locate is not None:
            try:
                where = self._raw.locate(self._batches)
            except Exception as inner:  # the diagnosis must never hide the original error
                where = f"(could not locate the bad record: {type(inner).__name__}: {inner})"
        if where:
            return BadRecordError(f"bad record in {self._describe}: {where}; {hint}")
        return BadRecordError(f"input pipeline failed while reading {self._describe}: "
                              f"{bad_records.tf_message(e)}; {hint}")

    def _note_skips(self, raw) -> None:
        bad = np.asarray(raw.get("bad", np.zeros(0, bool)), bool)
        if not bad.any():
            return
        self.num_skipped += int(bad.sum())
        files = self._raw.files
        for fi, recno in zip(raw["file"][bad], raw["record"][bad]):
            if len(self.skipped) >= MAX_LOGGED_SKIPS:
                break
            desc = self._explain(files, int(fi), int(recno))
            self.skipped.append(desc)
            log.warning("skipped bad record %s%s", desc, " (further skips are only counted)"
                        if len(self.skipped) == MAX_LOGGED_SKIPS else "")

    def _explain(self, files, fi: int, recno: int) -> str:
        import tensorflow as tf
        path = files[fi]
        if recno < 0:
            return f"{path}: a record missing from the end of the file (truncated?)"
        try:
            for n, record in enumerate(tf.data.TFRecordDataset(path).take(recno + 1).as_numpy_iterator()):
                if n == recno:
                    reason = bad_records.check_record(record, self._raw.num_classes, self._raw.data_cfg,
                                                      train=self._raw.train)
                    return bad_records.describe(path, recno, record, reason or "rejected by the pipeline")
        except tf.errors.OpError as e:
            return f"{path}: record {recno}: {bad_records.tf_message(e)}"
        return f"{path}: record {recno}"

    def __next__(self) -> dict[str, np.ndarray]:
        import tensorflow as tf
        try:
            raw = next(self._it)
        except (tf.errors.OpError, UnicodeDecodeError) as e:   # TF cannot always decode its own message
            raise self._error(e) from None
        self._batches += 1
        self._note_skips(raw)
        texts = [r.decode("utf-8", errors="replace") for r in raw["report"]]
        tokens = tokenizer_lib.encode(self._tok, texts, self._max_len)
        valid = raw.get("valid")
        if valid is None:
            valid = np.logical_not(np.asarray(raw.get("bad", np.zeros(len(texts), bool)), bool))
        return {"image": raw["image"].astype(np.float32), **tokens, "labels": raw["labels"].astype(np.float32),
                "index": raw["index"].astype(np.int32), "valid": np.asarray(valid, bool)}


def global_count(count: int) -> int:
    """Sum of a per-host count over all processes (every process must call it at the same step)."""
    import jax
    if jax.process_count() == 1:
        return int(count)
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


class Prefetcher:
    """Runs ``fn(next(iterator))`` on a background thread, ``depth`` items ahead (keeps the host off the step)."""

    def __init__(self, iterator: Iterator, fn: Callable[[Any], Any] = lambda x: x, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(iterator, fn), daemon=True)
        self._thread.start()

    def _work(self, iterator, fn):
        try:
            for item in iterator:
                out = fn(item)
                while not self._stop.is_set():
                    try:
                        self._q.put(("ok", out), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, never lost
            self._q.put(("error", e))
            return
        self._q.put(("end", None))

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._q.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value

    def close(self, timeout: float = 30.0):
        """Stops the worker and waits for it, so that no thread is inside tf.data when the process exits
        (a daemon thread still running TF code during interpreter shutdown can abort the process)."""
        self._stop.set()
        while self._thread.is_alive():
            try:                                   # unblock a worker waiting to put, or one that just put
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
            timeout -= 0.1
            if timeout <= 0:
                break
