"""Metric writer: TensorBoard event files + metrics.jsonl + one console line, from process 0 only."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import numpy as np

log = logging.getLogger("medvlp_jax")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "tensorflow", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricWriter:
    """``write_scalars(step, {name: value})`` to TensorBoard (``<workdir>/tb``) and ``metrics.jsonl``.

    ``resume_step``: the step a run resumes from (0 for a fresh start). Rows of ``metrics.jsonl`` after it were
    written past the last checkpoint by the interrupted run and are written again by this one, so they are
    dropped first: the file never holds a step twice.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            import tensorflow as tf
            os.makedirs(workdir, exist_ok=True)
            if resume_step is not None:
                drop_rows_after(os.path.join(workdir, "metrics.jsonl"), resume_step)
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any], *, console: bool = True) -> None:
        if not self.enabled:
            return
        import tensorflow as tf
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        with self._tb.as_default():
            for k, v in clean.items():
                tf.summary.scalar(k, v, step=step)
        self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if console:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in clean.items())
            log.info("[%d] %s", step, shown)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites the JSON-lines file ``path`` without its rows whose "step" is > ``step``; returns how many went.

    Atomic (a temporary file renamed over the old one); a torn last line (a kill mid-write) is dropped too.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d row(s) after step %d (written again by this run)", dropped, step)
    return dropped


def read_metrics(workdir: str, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The rows of ``<workdir>/metrics.jsonl`` in order (one dict per logged step).

    missing_ok: an absent file gives [] instead of FileNotFoundError.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path} does not exist (is {workdir!r} a pretraining workdir?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
