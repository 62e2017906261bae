"""SISTA (arXiv 2601.08165): semantics-aware instance alignment + sparse token alignment, on MIMIC-CXR.

  python launch/pretrain.py --config=configs/sista.py --workdir=runs/sista            # paper setup (MGCA's)
  python launch/pretrain.py --config=configs/sista.py:demo --workdir=runs/sista_demo  # demo data, CPU

Reconstructed from the abstract (methods.md section 5.2, [I]): encoders, data and optimiser as MGCA; every
reconstructed choice below is a field of config.method (see medvlp_jax/methods/sista.py).
"""
from medvlp_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    m = c.method
    m.name = "sista"
    m.temperature = 0.07            # tau_g of SIA (MGCA's ITA temperature)
    m.sia_variant = "eliminate"     # [I] "eliminate" false negatives | "soft_positive"
    m.sia_similarity = "report_emb"  # [I] stop-grad own report embedding | "batch_emb" | "label_jaccard"
    m.fn_threshold = 0.9            # [I] theta: report-report cosine above which a pair is a false negative
    m.sia_warmup_epochs = 1.0       # [I] no false-negative handling during the first epoch
    m.sia_reduce_directions = "sum"
    m.sta_temperature = 0.1         # [I] tau_s
    m.sta_direction = "word_to_patch"  # [I] words select patches | "patch_to_word" | "both" (mean of the two)
    m.sta_sparsify = "threshold"    # [I] keep min-max scores >= 1/P | "topk"
    m.sta_topk = 16                 # [I] kappa for "topk"
    m.sta_word_weights = "uniform"  # [I] 1/|T_b| | "mgca" attention weights
    m.lambda_sia = 1.0
    m.lambda_sta = 1.0
    return c
