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
    """``write_scalars(step, {name: value})`` to TensorBoard (``<workdir>/tb``) and ``metrics.jsonl``."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            import tensorflow as tf
            os.makedirs(workdir, exist_ok=True)
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
