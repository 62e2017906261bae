"""Fault handling for the host loop: preemption (SIGTERM, Ctrl-C) and non-finite steps.

    preemption = faults.PreemptionWatch()                 # before the loop
    nonfinite = faults.NonfiniteMonitor(config.train.nonfinite, split=config.data.train_split)
    for step in ...:
        state, metrics = train_step(state, batch)
        nonfinite.record(step, metrics, batch)            # keeps device references, no sync
        if log_step:
            nonfinite.check(step)                         # one transfer; raises in "stop" mode
        if preemption.reached(step):                      # every process agrees on the same step
            save, exit
    preemption.close()

Preemption: with one process a Python SIGTERM handler sets a flag. With several processes a host may be
signalled alone, or the hosts at different steps, and a checkpoint save is collective, so they must agree
on the step: ``jax.distributed.initialize`` installs a SIGTERM notifier and a preemption sync manager, and
``multihost_utils.reached_preemption_sync_point(step)`` returns True on every process at the same step once
any of them was signalled (no collective per step). The Python handler is then not installed, since it
would replace JAX's notifier.

Non-finite steps: the train step already leaves the state untouched on a non-finite loss or gradient and
counts it (``state.nonfinite_steps``). In ``config.train.nonfinite="stop"`` mode the monitor reads every
step's ``train/finite`` flag at the next log step (one device transfer per log interval) and raises
``FloatingPointError`` naming each failing step and the record indices of its batch; ``"skip"`` only counts.
"""
from __future__ import annotations

import signal
from typing import Any, Optional

import jax
import numpy as np


class PreemptionWatch:
    """``reached(step)`` is True (on every process at the same step) once SIGTERM (or a first Ctrl-C) arrived.

    Single process: SIGTERM and the first SIGINT (Ctrl-C) set the flag (``signal_name`` says which); the
    first SIGINT also puts Python's default handler back, so a second Ctrl-C raises KeyboardInterrupt at once
    (abort without saving). Several processes: SIGTERM through JAX's preemption sync manager (module
    docstring); Ctrl-C keeps its default behaviour there.
    """

    def __init__(self):
        self.flag = False
        self.signal_name: Optional[str] = None
        self._old: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        if self._multi:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
            except ValueError:   # not the main thread (e.g. a notebook worker): not handled there
                self._old.pop(signum, None)

    def _on_signal(self, signum, frame):
        if self.flag and signum == signal.SIGINT:        # the default handler was not put back (not main thread)
            raise KeyboardInterrupt
        self.flag = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            import sys
            print("\ninterrupt: saving a checkpoint after the current step, then exiting (Ctrl-C again aborts "
                  "without saving)", file=sys.stderr, flush=True)
            try:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            except ValueError:
                pass

    def reached(self, step: int) -> bool:
        """Must be called by every process at every step (multi-process: a cheap sync-point query)."""
        if not self._multi:
            return self.flag
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))

    def close(self) -> None:
        for signum, old in self._old.items():
            try:
                signal.signal(signum, old)
            except (ValueError, TypeError):
                pass
        self._old = {}


def _gather(x) -> np.ndarray:
    """A (possibly multi-process) global array as numpy on every process (collective when multi-process)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class NonfiniteMonitor:
    """Finds the steps whose update was dropped as non-finite and, in "stop" mode, raises naming them.

    Args:
      mode: "skip" (count only; ``check`` does nothing) or "stop".
      split: the training split's name, for the message.
    """

    def __init__(self, mode: str, *, split: str = "train"):
        if mode not in ("skip", "stop"):
            raise ValueError(f"config.train.nonfinite={mode!r}; use 'skip' or 'stop'")
        self.mode = mode
        self.split = split
        self._pending: list[tuple[int, Any, Any]] = []

    def record(self, step: int, metrics: dict, batch: dict) -> None:
        """Keeps this step's finite flag and batch indices (device references; no transfer)."""
        if self.mode == "stop":
            self._pending.append((int(step), metrics["train/finite"], batch.get("index")))

    def check(self, step: Optional[int] = None) -> None:
        """Raises FloatingPointError if a recorded step was not finite ("stop" mode); clears the record."""
        pending, self._pending = self._pending, []
        if self.mode != "stop" or not pending:
            return
        flags = jax.device_get([f for _, f, _ in pending])     # one transfer for the whole interval
        bad = [(s, idx) for (s, _, idx), f in zip(pending, flags) if float(f) < 1]
        if not bad:
            return
        parts = []
        for s, idx in bad:
            rows = _gather(idx).tolist() if idx is not None else "unknown"
            parts.append(f"step {s}: record indices {rows}")
        raise FloatingPointError(
            f"non-finite loss or gradient at {len(bad)} step(s) ({'; '.join(parts)}) of split {self.split!r}; "
            f"the state was left unchanged by those steps (config.train.nonfinite='stop'; 'skip' counts them "
            f"in train/nonfinite_steps and goes on)")
