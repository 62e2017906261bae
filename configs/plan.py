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


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    m = c.method
    m.name = "plan"
    m.itc_temperature = 0.07
    m.tau_w_stage2 = 0.1            # [I] word->patch softmax temperature in stage 2
    m.tau_w_stage3 = 0.05           # [I] sharper maps in stage 3
    m.tau_agg = 5.0                 # [I] word aggregation (GLoRIA-style log-sum-exp)
    m.tau_r = 0.1                   # [I] local logit temperature
    m.word_weights = "mgca"         # [I] noise suppression of function words via attention weights
    # Stage boundaries in epochs: paper schedule 0-9 / 10-29 / 30-49 of 50 epochs.
    epochs = {"paper": (10.0, 30.0), "demo": (1.0, 3.0), "test": (0.0, 0.0)}[arg.variant]
    m.stage2_start_epoch, m.stage3_start_epoch = epochs
    m.loc_ramp_epochs = 2.0 if arg.variant == "paper" else 0.5
    m.lambda_loc = 1.0
    m.lambda_cons = 0.1             # [I] KL(teacher maps || student maps) weight in stage 3
    m.ns_rel_threshold = 0.3        # [I] zero map entries below 0.3 x the word's max
    m.ns_entropy = 0.9              # [I] drop words whose map entropy exceeds 0.9 log P
    m.prior_gamma = 0.5             # [I] A <- normalise(A * teacher^gamma)
    m.ema_decay = 0.999 if arg.variant == "paper" else 0.99
    m.pixel_importance = 0.0        # [I] beta of the pixel-importance prior on the soft maps (0: off)
    m.running_prior_gamma = 0.0     # [I] gamma_r of the running map prior refined every step (0: off)
    m.running_prior_momentum = 0.99  # [I] mu of that running prior
    m.text_chunk = 8                # reports per chunk of the cross-sample local term (memory)
    if arg.variant == "demo":
        # Stages 2-3 (the cross-sample word-to-pixel term) double the CPU step: 350 steps (~7 epochs) keep the
        # demo under 10 minutes on 2 cores.
        c.train.total_steps = 350
    return c
