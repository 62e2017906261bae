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


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")   # "": the variant's default encoder
    c = config_lib.base(arg.variant, image=arg.image)
    c.model.proj.update(kind="mlp_bn", hidden=2048 if arg.variant == "paper" else 256)
    c.model.text.word_attn_shift = 0          # 1: the authors' off-by-one word weights (quirk 2)
    c.model.text.full_length_tail = "drop"    # authors: a full-length report loses its last word and [SEP]
    m = c.method
    m.name = "mgca"
    m.temperature = 0.07            # tau_g (ITA)
    m.local_temperature = 0.1       # tau_l (CTA)
    m.proto_temperature = 0.2       # tau_p (CPA)
    m.num_prototypes = {"paper": 500, "demo": 64, "test": 8}[arg.variant]
    m.epsilon = 0.05
    m.sinkhorn_iterations = 3
    m.freeze_prototypes_epochs = 1.0
    m.lambda_ita, m.lambda_cta, m.lambda_cpa = 1.0, 1.0, 1.0
    m.weight_quantiles = (0.1, 0.9)
    m.word_slots = "all"            # authors: padding and [SEP] act as word-side negatives
    m.patch_context_norm = "auto"   # authors: attended word vector normalised for CNNs only
    m.ita_reduce = "sum"            # authors: sum of both CE directions
    m.local_negatives = "pair"      # authors: token losses within each pair
    m.local_chunk = 16              # samples per chunk of the "batch" local negatives (memory; None = one block)
    return c
