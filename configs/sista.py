"""SISTA (arXiv 2601.08165): semantics-aware instance alignment + sparse token alignment, on MIMIC-CXR.

  python launch/pretrain.py --config=configs/sista.py --workdir=runs/sista            # paper setup (MGCA's)
  python launch/pretrain.py --config=configs/sista.py:demo --workdir=runs/sista_demo  # demo data, CPU

Reconstructed from the abstract (methods.md section 5.2, [I]): encoders, data and optimiser as MGCA; every
reconstructed choice below is a field of config.method (see medvlp_jax/methods/sista.py).
"""
from medvlp_jax import config_lib
from medvlp_jax.methods.sista import SistaConfig


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    # Shown at SistaConfig's defaults ([I]: reconstructed choices).
    c.method = config_lib.method_config(
        "sista", SistaConfig,
        "temperature",              # tau_g of SIA (MGCA's ITA temperature)
        "sia_variant",              # [I] "eliminate" false negatives | "soft_positive"
        "sia_similarity",           # [I] stop-grad own report embedding | "batch_emb" | "label_jaccard"
        "fn_threshold",             # [I] theta: report-report cosine above which a pair is a false negative
        "sia_warmup_epochs",        # [I] no false-negative handling during the first epoch
        "sia_reduce_directions",
        "sta_temperature",          # [I] tau_s
        "sta_direction",            # [I] words select patches | "patch_to_word" | "both" (mean of the two)
        "sta_sparsify",             # [I] keep min-max scores >= 1/P | "topk"
        "sta_topk",                 # [I] kappa for "topk"
        "sta_word_weights",         # [I] 1/|T_b| | "mgca" attention weights
        "lambda_sia", "lambda_sta")
    return c
