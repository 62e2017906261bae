"""ConVIRT (Zhang et al., MLHC 2022) as re-implemented in MGCA's repository, on MIMIC-CXR.

  python launch/pretrain.py --config=configs/convirt.py --workdir=runs/convirt           # paper setup
  python launch/pretrain.py --config=configs/convirt.py:demo --workdir=runs/convirt_demo # demo, CPU, minutes

methods.md section 2: MGCA's ConVIRT row uses MGCA's encoders and heads, D = 128, tau = 0.07, the SUM of
both CE directions, AdamW 2e-5 / wd 0.05, 40% warm-up then cosine, batch 144, 50 epochs. The original
ConVIRT paper (tau 0.1, lambda 0.75 weighted mean) is ``:original``-free: set
--config.method.temperature=0.1 --config.method.reduce_directions=mean --config.method.i2t_weight=0.75.
"""
from medvlp_jax import config_lib
from medvlp_jax.methods.convirt import ConvirtConfig


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    # Shown at ConvirtConfig's defaults: tau 0.07 (MGCA's row), fixed. The paper setup sums both directions
    # (MGCA's row); the demo and test variants take the equal-weight mean.
    c.method = config_lib.method_config(
        "convirt", ConvirtConfig, "temperature", "learn_temperature",
        reduce_directions="sum" if arg.variant == "paper" else "mean", i2t_weight=0.5)
    return c
