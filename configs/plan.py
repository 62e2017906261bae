"""PLAN (arXiv 2502.18047): progressive local alignment (soft word-to-pixel regions), on MIMIC-CXR.

  python launch/pretrain.py --config=configs/plan.py --workdir=runs/plan            # paper setup (MGCA's)
  python launch/pretrain.py --config=configs/plan.py:demo --workdir=runs/plan_demo  # demo data, CPU
  python launch/pretrain.py --config=configs/plan.py:image=resnet --workdir=runs/plan_r50  # paper's encoder family

Reconstructed from the abstract (methods.md section 7.2, [I]): three stages (ITC; + cross-sample local
contrast with noise suppression; + EMA-teacher prior and consistency), every choice a field of
config.method (medvlp_jax/methods/plan.py). The demo scales the stage boundaries to its shorter schedule.
The default encoder is MGCA's ViT-B/16 (methods.md 7.2); secondary summaries of the paper describe a
ResNet image encoder: ``image=resnet`` gives ResNet-50 with the 224 crop upsampled to 299 (layer3 19x19 =
361 regions, pooled layer4), as GLoRIA and MGCA-R50 (config_lib.base).
"""
from medvlp_jax import config_lib
from medvlp_jax.methods.plan import PlanConfig


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    # Stage boundaries in epochs: PlanConfig's defaults are the paper schedule 0-9 / 10-29 / 30-49 of 50 epochs
    # (local ramp 2 epochs, EMA teacher 0.999); the demo and test variants scale them to their short runs.
    short = {"demo": dict(stage2_start_epoch=1.0, stage3_start_epoch=3.0, loc_ramp_epochs=0.5, ema_decay=0.99),
             "test": dict(stage2_start_epoch=0.0, stage3_start_epoch=0.0, loc_ramp_epochs=0.5, ema_decay=0.99)}
    # Shown at PlanConfig's defaults ([I]: reconstructed choices).
    c.method = config_lib.method_config(
        "plan", PlanConfig,
        "itc_temperature",
        "tau_w_stage2",             # [I] word->patch softmax temperature in stage 2
        "tau_w_stage3",             # [I] sharper maps in stage 3
        "tau_agg",                  # [I] word aggregation (GLoRIA-style log-sum-exp)
        "tau_r",                    # [I] local logit temperature
        "word_weights",             # [I] noise suppression of function words via attention weights
        "stage2_start_epoch", "stage3_start_epoch", "loc_ramp_epochs",
        "lambda_loc",
        "lambda_cons",              # [I] KL(teacher maps || student maps) weight in stage 3
        "ns_rel_threshold",         # [I] zero map entries below 0.3 x the word's max
        "ns_entropy",               # [I] drop words whose map entropy exceeds 0.9 log P
        "prior_gamma",              # [I] A <- normalise(A * teacher^gamma)
        "ema_decay",
        "pixel_importance",         # [I] beta of the pixel-importance prior on the soft maps (0: off)
        "running_prior_gamma",      # [I] gamma_r of the running map prior refined every step (0: off)
        "running_prior_momentum",   # [I] mu of that running prior
        "text_chunk",               # reports per chunk of the cross-sample local term (memory)
        **short.get(arg.variant, {}))
    if arg.variant == "demo":
        # Stages 2-3 (the cross-sample word-to-pixel term) double the CPU step: 350 steps (~7 epochs) keep the
        # demo under 10 minutes on 2 cores.
        c.train.total_steps = 350
    return c
