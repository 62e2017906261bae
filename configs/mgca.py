"""MGCA (Wang et al., NeurIPS 2022): instance (ITA) + token (CTA) + prototype (CPA) alignment, on MIMIC-CXR.

  python launch/pretrain.py --config=configs/mgca.py --workdir=runs/mgca            # paper setup
  python launch/pretrain.py --config=configs/mgca.py:demo --workdir=runs/mgca_demo  # demo data, CPU

Paper setup (methods.md section 4, from the authors' code): ViT-B/16 (DeiT-B init: set
--config.model.image.hf_checkpoint) + Bio_ClinicalBERT first 6 layers, MLP+BN heads to D = 128, 224 px,
112 tokens, AdamW 2e-5 / wd 0.05, 40% warm-up then cosine, batch 144, 50 epochs; tau_g 0.07, tau_l 0.1,
tau_p 0.2, K = 500 prototypes, Sinkhorn eps 0.05 x 3, prototypes frozen in epoch 0, lambda = (1, 1, 1).
The objective reproduces the authors' loss arithmetic by default (word_slots="all", ita_reduce="sum",
local_negatives="pair", un-normalised ViT patch context) and the authors' word aggregation of full-length
reports (model.text.full_length_tail="drop": a report that fills all 112 tokens loses its last word and
[SEP], as in their ``aggregate_tokens``; "keep" = corrected). The other encoder quirks (no position ids,
off-by-one word weights) are fixed by default and reproduced with --config.model.text.use_position_ids=False
--config.model.text.word_attn_shift=1. An [UNK] is an ordinary word slot (data/tokenizer.py), as in the
authors' code, in every mode.
"""
from medvlp_jax import config_lib
from medvlp_jax.methods.mgca import MgcaConfig
from medvlp_jax.models.model_config import TextConfig


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    c.model.proj.kind = "mlp_bn"              # MGCA's heads in every variant (the paper base has them already)
    c.model.text.update(config_lib.setting_defaults(
        TextConfig, "word_attn_shift"))       # shown at 0; 1: the authors' off-by-one word weights (quirk 2)
    c.model.text.full_length_tail = "drop"    # authors: a full-length report loses its last word and [SEP]
    # Shown at MgcaConfig's defaults (the authors' values); only the prototype count differs (demo, test).
    c.method = config_lib.method_config(
        "mgca", MgcaConfig,
        "temperature",          # tau_g (ITA)
        "local_temperature",    # tau_l (CTA)
        "proto_temperature",    # tau_p (CPA)
        "num_prototypes", "epsilon", "sinkhorn_iterations", "freeze_prototypes_epochs",
        "lambda_ita", "lambda_cta", "lambda_cpa", "weight_quantiles",
        "word_slots",           # authors: padding and [SEP] act as word-side negatives
        "patch_context_norm",   # authors: attended word vector normalised for CNNs only
        "ita_reduce",           # authors: sum of both CE directions
        "local_negatives",      # authors: token losses within each pair
        "local_chunk",          # samples per chunk of the "batch" local negatives (memory; None = one block)
        **{"demo": dict(num_prototypes=64), "test": dict(num_prototypes=8)}.get(arg.variant, {}))
    return c
