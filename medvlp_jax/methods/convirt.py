"""ConVIRT / CLIP: bidirectional InfoNCE on global embeddings (methods.md section 2).

    L = lambda * CE(<v_i, u_:>/tau, i) + (1 - lambda) * CE(<u_i, v_:>/tau, i)      (ConVIRT, lambda = 0.75)
    L = CE(rows) + CE(columns)                                                  (MGCA's re-implementation)

Config (``config.method``, read into ``ConvirtConfig``; a misspelt key is an error):
  temperature: tau (0.1 ConVIRT, 0.07 MGCA re-implementation).
  learn_temperature: if True, tau is a learned parameter (CLIP: log(1/tau) clipped to log(100)).
  i2t_weight: lambda, used when reduce_directions == "mean".
  reduce_directions: "mean" (ConVIRT paper) or "sum" (MGCA's ConVIRT row).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from medvlp_jax.methods import OBJECTIVES, Objective, common, local_ops
from medvlp_jax.types import LossContext


@dataclasses.dataclass(frozen=True)
class ConvirtConfig:
    """Resolved ``config.method`` of ConVIRT / CLIP (module docstring)."""
    temperature: float = 0.07           # MGCA's re-implementation (ConVIRT's paper: 0.1)
    learn_temperature: bool = False
    i2t_weight: float = 0.75            # ConVIRT's lambda
    reduce_directions: str = "mean"     # ConVIRT's weighted mean; "sum": MGCA's ConVIRT row


def temperature_param_init(tau: float):
    return {"log_inv_temperature": jnp.asarray(jnp.log(1.0 / tau), jnp.float32)}


def temperature_of(method_params, cfg: ConvirtConfig):
    """The temperature: learned (CLIP, max logit scale 100) or fixed from the config."""
    if cfg.learn_temperature:
        log_inv = jnp.minimum(method_params["log_inv_temperature"], jnp.log(100.0))
        return 1.0 / jnp.exp(log_inv)
    return cfg.temperature


@OBJECTIVES.register("convirt")
def make(cfg, *, steps_per_epoch: int) -> Objective:
    del steps_per_epoch
    cfg = local_ops.read_config(ConvirtConfig, cfg)

    def init(rng, out):
        del rng, out
        return temperature_param_init(cfg.temperature) if cfg.learn_temperature else {}

    def loss(method_params, out, batch, ctx: LossContext):
        del ctx
        tau = temperature_of(method_params, cfg)
        total, i2t, t2i, logits = common.infonce(
            out.img_emb, out.txt_emb, tau, batch.get("valid"),
            i2t_weight=cfg.i2t_weight, reduce_directions=cfg.reduce_directions)
        valid = batch.get("valid", jnp.ones(logits.shape[:1], bool))
        return total, {
            "loss/itc": total, "loss/i2t": i2t, "loss/t2i": t2i, "temperature": jnp.asarray(tau, jnp.float32),
            "acc/i2t": common.retrieval_accuracy(logits, valid),
            "acc/t2i": common.retrieval_accuracy(logits.T, valid),
        }

    return Objective(name="convirt", init=init, loss=loss)
