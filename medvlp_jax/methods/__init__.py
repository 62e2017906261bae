"""Alignment objectives, selected by ``config.method.name`` through ``OBJECTIVES``.

Every method module registers a factory ``make(method_cfg, *, steps_per_epoch) -> Objective``.
The train step calls, inside one jit:

    method_params = objective.prepare_params(method_params)          # e.g. MGCA prototype renormalisation
    loss, metrics = objective.loss(method_params, out, batch, LossContext(step, rng, teacher_out))

``Objective`` fields:
  init(rng, out) -> method params pytree ({} when the method has no learnable parts); ``out`` is an
      EncoderOutputs (shapes only matter).
  loss(method_params, out, batch, ctx) -> (loss [], {name: []}); pure, jittable; ``ctx`` is a
      ``types.LossContext``: the traced int32 optimizer step (schedules are functions of it), the step's rng
      and the EMA teacher's outputs (None unless ``ema_decay`` is set).
  prepare_params(method_params) -> method_params, applied before the forward, outside the gradient.
  trainable(step) -> pytree of bool scalars matching method params (False: no update, no decay,
      optimizer moments kept), or None when always trainable. Declared here, applied by the optimiser
      (``train.optim.freeze_untrainable``, an optax transform), so the train step never sees it.
  similarity_maps(method_params, out) -> [b, t, p] word-to-patch maps for grounding/pictures, or None.
  ema_decay: if set, the train state keeps an EMA copy of the encoders and ``ctx.teacher_out`` is their
      (stop-gradient) outputs on the same batch; otherwise ``ctx.teacher_out`` is None.
  update_state(method_params, metrics) -> (method_params, metrics), or None: after a finite optimiser
      step, carries running statistics that the loss reported as (non-scalar) metrics into the method
      params, without gradient (e.g. PLAN's running map prior); it removes the metrics it consumes. Such
      leaves should be frozen by ``trainable``.
  zero_shot_scores(img_emb, patch_emb, prompts, prompt_class, num_classes) -> [n, c] class scores: the
      method's own zero-shot score (GLoRIA's local + global score, ``methods.gloria.zero_shot_scorer``), used
      by the zero-shot evaluator's ``scoring="gloria"``; None: that evaluator uses GLoRIA's score with
      defaults on the [CLS] report vector.
  check_metrics(metrics) -> {check name: warning}: host-side, at every log step, on the logged interval means
      (floats); a degenerate state the loss cannot show by itself (e.g. SISTA's SIA left with no negatives).
      The train loop logs each check's first warning of a run. None: no checks.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from medvlp_jax.registry import Registry


class Objective(NamedTuple):
    name: str
    init: Callable[..., Any]
    loss: Callable[..., Any]
    prepare_params: Callable[[Any], Any] = lambda p: p
    trainable: Optional[Callable[[Any], Any]] = None
    similarity_maps: Optional[Callable[..., Any]] = None
    ema_decay: Optional[float] = None
    update_state: Optional[Callable[[Any, dict], tuple[Any, dict]]] = None
    zero_shot_scores: Optional[Callable[..., Any]] = None
    check_metrics: Optional[Callable[[dict[str, float]], dict[str, str]]] = None
    # (method_params, EncoderOutputs) -> {name: [b]}: per-pair statistics of how ``similarity_maps`` attends,
    # averaged over the phrase queries by the grounding evaluator ("attention/<name>").
    map_diagnostics: Optional[Callable[..., Any]] = None


OBJECTIVES = Registry("objective")


def make_objective(method_cfg, *, steps_per_epoch: int) -> Objective:
    """Builds the objective named by ``method_cfg.name``."""
    return OBJECTIVES.get(method_cfg.name)(method_cfg, steps_per_epoch=steps_per_epoch)


# Every module of this package except the shared helpers is a method and registers itself on import; importing
# them all here means registration never depends on what a config happened to import, and a new method is one
# new file (plus its config and test).
HELPER_MODULES = ("common", "local_ops")


def _import_methods() -> None:
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        if info.name not in HELPER_MODULES:
            importlib.import_module(f"{__name__}.{info.name}")


_import_methods()
