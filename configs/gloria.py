"""GLoRIA (Huang et al., ICCV 2021): global + attention-weighted local contrastive alignment.

  python launch/pretrain.py --config=configs/gloria.py --workdir=runs/gloria            # paper setup
  python launch/pretrain.py --config=configs/gloria.py:demo --workdir=runs/gloria_demo  # demo data, CPU

Paper setup (methods.md section 3, read from the authors' code): ResNet-50 at 299 (224 crop upsampled),
local = layer3 19x19 regions through a 1x1 conv (no bias) to 768, global = pooled layer4 -> Linear 768;
Bio_ClinicalBERT with 12 layers, hidden states of the last 4 layers summed, word pieces merged, 97 tokens;
no text projection and no normalisation before the losses (cosines are taken inside); temperatures 4/5/10;
Adam lr 5e-5, L2 1e-6, clip 0.25, batch 48. The paper trained on CheXpert's private reports; "GLoRIA-MIMIC"
(this default) is MGCA's retraining on MIMIC-CXR. The demo keeps GLoRIA's heads on the demo encoders.
"""
from medvlp_jax import config_lib
from medvlp_jax.methods.gloria import GloriaConfig


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, image="")
    # The paper's ResNet-50; demo and test take the variant's default encoder (config_lib.DEFAULT_IMAGE).
    image = arg.image or ("resnet" if arg.variant == "paper" else "")
    c = config_lib.base(arg.variant, image=image)
    if arg.variant == "paper":
        c.model.text.depth = 12
        c.data.max_text_len = 97
        c.train.batch_size = 48
        c.optim.update(lr=5e-5, weight_decay=1e-6, clip_norm=0.25, warmup_fraction=0.0)
    c.model.text.sum_last_layers = 4 if c.model.text.depth >= 4 else 1
    # Word pieces merged into words: as the base (model.text.merge_word_pieces).
    # GLoRIA's projections: image global Linear, patch 1x1 conv without bias, text/word identity, no L2 norm.
    c.model.proj.update(kind="linear", dim=c.model.text.width, normalize=False, patch_bias=False,
                        text_kind="identity", word_kind="identity")
    # Every field shown at GloriaConfig's defaults (the authors' code).
    c.method = config_lib.method_config(
        "gloria", GloriaConfig,
        "temp1", "temp2", "temp3",  # attention sharpening, word aggregation, logit scale
        "attention",                # authors: softmax over words, then regions; "regions": the paper's one
        "local_weight", "global_weight",
        "local_agg",                # log-sum-exp over words (authors' code; no 1/temp2 as in the paper)
        "count_unk_words",          # authors' quirk: an [UNK] word keeps its slot but is not counted,
                                    # so the text's last real word leaves the local term
        "include_cls_word",         # authors' quirk: [CLS] counted as a word, [SEP] dropped
        "include_sep_word",
        "report_vector",            # authors' quirk: report vector = mean over all slots incl. padding
        "paper_local_scale",
        "text_chunk")               # texts per chunk of the b x b local term (memory O(chunk*b*t*p))
    if arg.variant == "demo":
        # The b x b word-region term costs more than the demo's small encoders (about half of the CPU step):
        # 400 steps keep the demo under 10 minutes on 2 cores.
        c.train.total_steps = 400
    return c
