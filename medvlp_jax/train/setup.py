"""build(config, mesh) -> Setup: model, objective, optimiser, state initialiser, shardings and the jitted step.

The one place that turns a config into the pieces a step needs; training (``train.loop``), evaluation
(``evaluators.common.load_run``), the benchmark (``benchmark_lib``) and the checkpoint import
(``released.workdir``) all build through it, so what they run is the same model, state layout and step.

    setup = build(config, mesh, steps_per_epoch=spe, total_steps=total)
    state = setup.init_state()                  # initialised directly on the mesh
    step_fn = setup.jit_train_step()            # jit with explicit shardings, state donated
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import linen as nn
from jax.sharding import Mesh

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.methods import Objective, make_objective
from medvlp_jax.models.dual_encoder import build_model
from medvlp_jax.train import optim, state as state_lib, step as step_lib
from medvlp_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a config builds before any data is read.

    Attributes:
      config: the config it was built from.
      mesh: the device mesh (data x fsdp).
      model: the DualEncoder.
      objective: the method's Objective.
      tx, schedule: the optimiser and its learning-rate schedule (a function of the step).
      rng: PRNGKey(config.seed), the key ``init`` starts from.
      init: rng -> TrainState (pure; ``init_state`` jits it onto the mesh).
      abstract: the TrainState as ShapeDtypeStructs (no arrays allocated).
      shardings: a NamedSharding per TrainState leaf (the config's regex rules; the rest replicated).
      steps_per_epoch, total_steps: the schedule lengths the objective and optimiser were built for.
    """
    config: Any
    mesh: Mesh
    model: nn.Module
    objective: Objective
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    rng: jax.Array
    init: Callable[[jax.Array], TrainState]
    abstract: TrainState
    shardings: TrainState
    steps_per_epoch: int
    total_steps: int

    def init_state(self) -> TrainState:
        """A fresh TrainState, each leaf created directly with its sharding."""
        return jax.jit(self.init, out_shardings=self.shardings)(self.rng)

    def abstract_sharded(self) -> TrainState:
        """The TrainState as ShapeDtypeStructs carrying their shardings (enough to lower and compile a step)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                            self.shardings)

    def jit_train_step(self):
        """The jitted train step: explicit shardings for state and batch, the state donated."""
        c = self.config
        train_step = step_lib.make_train_step(self.model, self.objective, self.tx, self.schedule,
                                              grad_accum_steps=c.optim.grad_accum_steps,
                                              prng_impl=c.train.get("prng_impl", "threefry2x32"),
                                              map_diagnostics=c.train.get("map_diagnostics", True))
        return step_lib.jit_train_step(train_step, self.shardings, sharding_lib.batch_sharding(self.mesh),
                                       sharding_lib.replicated(self.mesh))


def build(config, mesh: Mesh, *, steps_per_epoch: int, total_steps: int, init_batch_size: int | None = None
          ) -> Setup:
    """Builds model, objective, optimiser, initialiser and shardings for ``config`` on ``mesh``.

    steps_per_epoch, total_steps: the lengths of the objective's and the optimiser's schedules.
    init_batch_size: rows of the dummy batch that traces ``init`` (default: the mesh size).
    """
    model = build_model(config.model)
    objective = make_objective(config.method, steps_per_epoch=steps_per_epoch)
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    tx = optim.freeze_objective_leaves(tx, objective)   # the objective declares what is frozen when
    init = state_lib.make_init_fn(config, model, objective, tx, init_batch_size=init_batch_size or mesh.size)
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = state_lib.state_shardings(config, abstract, mesh)
    return Setup(config=config, mesh=mesh, model=model, objective=objective, tx=tx, schedule=schedule, rng=rng,
                 init=init, abstract=abstract, shardings=shardings, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps)
