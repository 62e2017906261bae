"""Orbax checkpoints of the whole TrainState plus the input pipeline's position; automatic resume.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. ``data`` is JSON: {"step", "seed",
"examples_seen"}; the pipeline rebuilt at ``step`` continues on exactly the same data order
(medvlp_jax/data/pipeline.py).

Half-written checkpoints: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<n>`` and renames it when
complete (writing ``commit_success.txt`` first), so a save killed midway leaves only the temporary directory,
which orbax never lists (and deletes on the next save). A step directory without ``commit_success.txt`` (a
copy interrupted by hand, a file system without atomic rename, a checkpoint from a tool that died) would
however be listed by orbax as the latest step. ``Checkpointer`` therefore inspects the directory when it
opens it: such a step is renamed to ``<step>.incomplete-<unix time>`` (kept for inspection, invisible to
orbax) and the previous complete step is used; both cases are logged. In a multi-process run process 0 does
this while the others wait at a barrier; every process then writes its own shards of each save.

Corrupt checkpoints (a truncated or missing array file, garbled metadata: bit rot, a disk that filled up):
``restore_latest`` tries the steps newest first. A step that does not restore is named in one warning line
(step, file, reason) and, once an older step restored, renamed to ``<step>.corrupt-<unix time>`` (kept for
inspection; the run saves that step again when it gets there). When no step restores, nothing is moved and
``CheckpointError`` says so in one line. ``restore_params`` (evaluation) falls back the same way without moving
anything; an explicitly requested step that does not restore is an error.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from medvlp_jax.errors import CheckpointError  # defined in the bottom layer; re-exported from here
from medvlp_jax.logging_lib import log
from medvlp_jax.train.state import TrainState

COMMIT_FILE = "commit_success.txt"       # written by orbax (0.12) into every finished step before it is renamed
_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp-.*")


def _to_tree(state: TrainState) -> dict[str, Any]:
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if tree["ema_params"] is None:
        del tree["ema_params"]
    return tree


def _from_tree(tree: dict[str, Any]) -> TrainState:
    return TrainState(**{**tree, "ema_params": tree.get("ema_params")})


def set_aside_incomplete(directory: str) -> dict[str, list[str]]:
    """Renames step directories without a commit marker out of orbax's sight; reports interrupted saves.

    Returns:
      {"incomplete": [renamed step dirs (new paths)], "interrupted": [orbax temporary dirs left by a kill]}.
    """
    found: dict[str, list[str]] = {"incomplete": [], "interrupted": []}
    if not os.path.isdir(directory):
        return found
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if _TMP.match(name):
            found["interrupted"].append(path)
        elif name.isdigit() and not os.path.exists(os.path.join(path, COMMIT_FILE)):
            new = f"{path}.incomplete-{int(time.time())}"
            os.rename(path, new)
            found["incomplete"].append(new)
    return found


_TS_FILE = re.compile(r'local file "([^"]+)"')
_TS_CODE = re.compile(r"\b(OUT_OF_RANGE|NOT_FOUND|DATA_LOSS|INVALID_ARGUMENT|FAILED_PRECONDITION|PERMISSION_DENIED)\b")
_TS_REASON = {"OUT_OF_RANGE": "shorter than its index says (truncated)", "NOT_FOUND": "missing",
              "DATA_LOSS": "corrupt (cannot be decoded)", "PERMISSION_DENIED": "not readable"}


def diagnose(step_dir: str, error: BaseException) -> tuple[str, str]:
    """(the file of ``step_dir`` that failed, why), for a restore that raised ``error``.

    tensorstore names the file it failed on (``local file "..."``, the last one is the innermost); orbax's JSON
    files raise a bare JSONDecodeError, so each JSON file of the step is read to find the garbled one.
    """
    text = str(error)
    files = _TS_FILE.findall(text)
    code = _TS_CODE.search(text)
    if files:
        path = files[-1]
        reason = _TS_REASON.get(code.group(1), code.group(1)) if code else text.splitlines()[0][:160]
        if code and code.group(1) == "NOT_FOUND" and os.path.exists(path):
            reason = "an entry it indexes is missing"
        return path, reason
    if isinstance(error, json.JSONDecodeError):
        for path in sorted(glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)):
            if not os.path.isfile(path) or os.path.basename(path) == COMMIT_FILE or "/d/" in path \
                    or path.endswith(".ocdbt"):
                continue
            try:
                with open(path) as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                return path, f"not valid JSON ({str(e).splitlines()[0][:80]})"
            except OSError:
                continue
        return step_dir, f"not valid JSON ({error})"
    if isinstance(error, FileNotFoundError):
        path = error.filename or next(iter(re.findall(r"File (\S+) not found", text)), step_dir)
        return str(path), "missing"
    return step_dir, f"{type(error).__name__}: {text.splitlines()[0][:160] if text else ''}"


def _closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _ignore_late_read_callbacks() -> None:
    """Silences the "Event loop is closed" noise a failed restore leaves behind.

    When a restore fails midway, tensorstore completes the reads still in flight after orbax has closed the
    asyncio loop that awaited them; their callbacks raise RuntimeError("Event loop is closed"), which Python
    prints with a traceback (as an ignored or an uncaught exception, from whichever thread ran the callback)
    around our one-line message. Only that exception is dropped; every other one reaches the previous hook.
    Installed once, before the first restore.
    """
    import sys
    import threading
    if getattr(sys.unraisablehook, "_medvlp_ignores_closed_loop", False):
        return
    previous_unraisable, previous_except, previous_thread = sys.unraisablehook, sys.excepthook, threading.excepthook

    def unraisable_hook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            previous_unraisable(unraisable)

    def except_hook(exc_type, exc, tb):
        if not _closed_loop(exc):
            previous_except(exc_type, exc, tb)

    def thread_hook(args):
        if not _closed_loop(args.exc_value):
            previous_thread(args)
    unraisable_hook._medvlp_ignores_closed_loop = True
    sys.unraisablehook, sys.excepthook, threading.excepthook = unraisable_hook, except_hook, thread_hook


def _ignore_abandoned_reads() -> None:
    """Silences "coroutine '...' was never awaited" after a restore failed midway.

    The failed read leaves orbax/tensorstore coroutines that were created but never awaited (e.g.
    ``Store._get_array_metadatas``); Python warns about each when it collects them, often at interpreter exit,
    after our one-line message. Installed only once a restore has failed, so such warnings elsewhere still show.
    """
    import warnings
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def has_checkpoints(workdir: str) -> bool:
    """True when ``<workdir>/checkpoints`` holds a step directory (complete or not); cheap, no orbax."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Save every ``every_steps`` and at the end, keep the last ``keep``, restore the latest onto a mesh.

    Opening a directory sets aside half-written checkpoints (module docstring) and logs what it ignored.
    """

    def __init__(self, workdir: str, *, every_steps: int, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.every_steps = every_steps
        self.ignored: dict[str, list[str]] = {"incomplete": [], "interrupted": []}
        if jax.process_index() == 0:
            self.ignored = set_aside_incomplete(self.directory)
        _sync("medvlp_checkpoint_scan")
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=True,
                                                                 cleanup_tmp_directories=True))
        if self.ignored["incomplete"] or self.ignored["interrupted"]:
            latest = self.manager.latest_step()
            for path in self.ignored["incomplete"]:
                log.warning("ignoring half-written checkpoint (no %s): moved to %s; %s", COMMIT_FILE, path,
                            f"using step {latest}" if latest is not None else "no complete checkpoint is left")
            for path in self.ignored["interrupted"]:
                log.warning("ignoring interrupted checkpoint save %s (orbax temporary directory); %s", path,
                            f"using step {latest}" if latest is not None else "no complete checkpoint is left")

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_position: dict[str, Any], *, force: bool = False) -> bool:
        if not force and (self.every_steps <= 0 or step % self.every_steps):
            return False
        if step in (self.manager.all_steps() or []):
            return False
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_tree(state)),
                                                        data=ocp.args.JsonSave(data_position)), force=True)
        return True

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState):
        """Restores ``step`` with every array laid out by ``shardings`` (any mesh, any device count)."""
        _ignore_late_read_callbacks()
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              _to_tree(abstract_state), _to_tree(shardings))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception:
            _ignore_abandoned_reads()
            raise
        return _from_tree(restored["state"]), dict(restored["data"])

    def restore_latest(self, abstract_state: TrainState, shardings: TrainState, *, set_aside: bool = True,
                       advice: str = "move the checkpoints directory away to start afresh, or use another "
                                     "--workdir"):
        """(state, data position, step) of the newest step that restores, or None without checkpoints.

        Steps that fail are logged (one warning line each: step, file, reason) and, with ``set_aside``, renamed
        to ``<step>.corrupt-<time>`` once an older step restored. Raises CheckpointError when none restores.
        """
        failed: list[tuple[int, str, str]] = []
        for step in sorted(self.manager.all_steps() or [], reverse=True):
            try:
                state, data = self.restore(step, abstract_state, shardings)
            except Exception as e:                       # tensorstore ValueError, JSONDecodeError, OSError...
                file, reason = diagnose(os.path.join(self.directory, str(step)), e)
                failed.append((step, file, reason))
                log.warning("checkpoint step %d does not restore: %s is %s; trying the previous step", step,
                            file, reason)
                continue
            if failed and set_aside:
                self._set_aside_corrupt([f[0] for f in failed], step)
            return state, data, step
        if failed:
            step, file, reason = failed[0]
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (newest: step {step}, {file} is {reason}; "
                f"{len(failed)} tried); {advice}")
        return None

    def _set_aside_corrupt(self, steps: list[int], using: int) -> None:
        if jax.process_index() == 0:
            for step in steps:
                path = os.path.join(self.directory, str(step))
                new = f"{path}.corrupt-{int(time.time())}"
                os.rename(path, new)
                log.warning("moved the unreadable checkpoint step %d to %s; resuming from step %d", step, new,
                            using)
        _sync("medvlp_checkpoint_set_aside")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, abstract_state: TrainState, shardings: TrainState, step: Optional[int] = None):
    """(state, step) of a run's newest checkpoint that restores (nothing is moved), or of ``step`` exactly.

    Raises CheckpointError when no checkpoint restores, or when the requested ``step`` is absent or does not.
    """
    ckpt = Checkpointer(workdir, every_steps=0, keep=1000)
    try:
        if step is None:
            found = ckpt.restore_latest(abstract_state, shardings, set_aside=False,
                                        advice="evaluate another run, or --untrained for the initial weights")
            if found is None:
                raise CheckpointError(f"no checkpoint under {ckpt.directory}; pretrain first "
                                      f"(python launch/pretrain.py --workdir={workdir} ...) or pass --untrained")
            state, _, step = found
            return state, step
        available = sorted(ckpt.manager.all_steps() or [])
        if step not in available:
            raise CheckpointError(f"--step={step}: no checkpoint of that step in {ckpt.directory} "
                                  f"(available: {available or 'none'})")
        try:
            state, _ = ckpt.restore(step, abstract_state, shardings)
        except Exception as e:
            file, reason = diagnose(os.path.join(ckpt.directory, str(step)), e)
            raise CheckpointError(f"checkpoint step {step} does not restore: {file} is {reason}; evaluate another "
                                  f"step (available: {available}) or leave --step out for the newest that "
                                  f"restores") from None
        return state, step
    finally:
        ckpt.close()
