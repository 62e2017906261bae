"""AGA (arXiv 2507.23402): adaptive group alignment with learned threshold gates, on MIMIC-CXR.

  python launch/pretrain.py --config=configs/aga.py --workdir=runs/aga            # paper setup (MGCA's)
  python launch/pretrain.py --config=configs/aga.py:demo --workdir=runs/aga_demo  # demo data, CPU

Reconstructed from the abstract (methods.md section 6.2, [I]; SPARC-style grouping made bidirectional with
learned thresholds): every reconstructed choice is a field of config.method (medvlp_jax/methods/aga.py).
"""
from medvlp_jax import config_lib
from medvlp_jax.methods.aga import AgaConfig


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    # Shown at AgaConfig's defaults ([I]: reconstructed choices).
    c.method = config_lib.method_config(
        "aga", AgaConfig,
        "itc_temperature",          # global ITC (needed for zero-shot and retrieval)
        "itc_reduce_directions",
        "iga_temperature",          # [I] tau of the within-pair instance-aware group alignment
        "bcga_temperature",         # [I] tau_b of bidirectional cross-modal grouped alignment
        "bcga_mode",                # [I] pooled group vectors vs global embeddings (O(b^2 d)) | "cross" | "pair"
        "lambda_itc",               # [I] global ITC weight (0: off)
        "theta_max",                # [I] gate range [1/P (or 1/T), 0.95]
        "theta_init",               # [I] gate bias initialised so theta ~ 0.5 at step 0
        "kappa",                    # [I] soft membership temperature
        "hard_membership",          # [I] True: hard mask with straight-through gradient
        "lambda_iga", "lambda_bcga",
        "text_chunk")               # reports per chunk of the cross-sample group term (memory; None = one block)
    return c
