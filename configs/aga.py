"""AGA (arXiv 2507.23402): adaptive group alignment with learned threshold gates, on MIMIC-CXR.

  python launch/pretrain.py --config=configs/aga.py --workdir=runs/aga            # paper setup (MGCA's)
  python launch/pretrain.py --config=configs/aga.py:demo --workdir=runs/aga_demo  # demo data, CPU

Reconstructed from the abstract (methods.md section 6.2, [I]; SPARC-style grouping made bidirectional with
learned thresholds): every reconstructed choice is a field of config.method (medvlp_jax/methods/aga.py).
"""
from medvlp_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    m = c.method
    m.name = "aga"
    m.itc_temperature = 0.07        # global ITC (needed for zero-shot and retrieval)
    m.itc_reduce_directions = "mean"
    m.iga_temperature = 0.1         # [I] tau of the within-pair instance-aware group alignment
    m.bcga_temperature = 0.07       # [I] tau_b of bidirectional cross-modal grouped alignment
    m.bcga_mode = "pooled"          # [I] pooled group vectors vs global embeddings (O(b^2 d)) | "cross" | "pair"
    m.lambda_itc = 1.0              # [I] global ITC weight (0: off)
    m.theta_max = 0.95              # [I] gate range [1/P (or 1/T), 0.95]
    m.theta_init = 0.5              # [I] gate bias initialised so theta ~ 0.5 at step 0
    m.kappa = 0.05                  # [I] soft membership temperature
    m.hard_membership = False       # [I] True: hard mask with straight-through gradient
    m.lambda_iga = 1.0
    m.lambda_bcga = 1.0
    m.text_chunk = 8                # reports per chunk of the cross-sample group term (memory; None = one block)
    return c
