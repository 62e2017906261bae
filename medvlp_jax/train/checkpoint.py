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
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

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
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              _to_tree(abstract_state), _to_tree(shardings))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      data=ocp.args.JsonRestore()))
        return _from_tree(restored["state"]), dict(restored["data"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, abstract_state: TrainState, shardings: TrainState, step: Optional[int] = None):
    """Params (and model state) of a run's latest (or given) checkpoint, for evaluation."""
    ckpt = Checkpointer(workdir, every_steps=0, keep=1000)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
    state, data = ckpt.restore(step, abstract_state, shardings)
    ckpt.close()
    return state, step
