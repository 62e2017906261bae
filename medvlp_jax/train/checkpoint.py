"""Orbax checkpoints of the whole TrainState plus the input pipeline's position; automatic resume.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. ``data`` is JSON: {"step", "seed",
"examples_seen"}; the pipeline rebuilt at ``step`` continues on exactly the same data order
(medvlp_jax/data/pipeline.py). Orbax commits a step atomically (temporary directory, then rename), so a
checkpoint left half-written by a kill is never picked as the latest.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from medvlp_jax.train.state import TrainState


def _to_tree(state: TrainState) -> dict[str, Any]:
    tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if tree["ema_params"] is None:
        del tree["ema_params"]
    return tree


def _from_tree(tree: dict[str, Any]) -> TrainState:
    return TrainState(**{**tree, "ema_params": tree.get("ema_params")})


class Checkpointer:
    """Save every ``every_steps`` and at the end, keep the last ``keep``, restore the latest onto a mesh."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=True))

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
