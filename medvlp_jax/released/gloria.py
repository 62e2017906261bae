"""GLoRIA's released Lightning checkpoint (marshuang80/gloria @ 416466a, ResNet-50) -> our DualEncoder.

Key layout (``gloria_model.py: GLoRIA.__init__`` under ``PretrainModel.gloria``;
../shared/checkpoints/gloria_resnet50.keys.tsv):

  gloria.img_encoder.model.*               torchvision ResNet-50, fc = Identity             -> image
  gloria.img_encoder.global_embedder.*     Linear(2048 -> 768)                              -> img_head (linear)
  gloria.img_encoder.local_embedder.weight Conv2d 1x1 (1024 -> 768), no bias                -> patch_head (linear,
                                                                                               no bias)
  gloria.text_encoder.model.*              Hugging Face BertModel (Bio_ClinicalBERT, 12 layers) -> text
  gloria.text_encoder.model.pooler.*       never read (the encoder uses hidden states)      ignored

The text side has no projection (``text_kind = word_kind = "identity"``) and nothing is L2-normalised
(``proj.normalize=False``). Reproduced in the config:
  * image: 224 upsampled to 299 (bilinear, align_corners=True); layer3 [19x19x1024] -> the 1x1 conv ->
    ``patch_emb`` [361, 768] (GLoRIA's img_emb_l [768, 19, 19], row-major); pooled layer4 -> Linear ->
    ``img_emb`` (img_emb_g).
  * text: the sum of the last 4 layers' hidden states (``text.sum_last_layers=4``), word pieces summed into
    words up to and including [SEP], zero padding: ``word_emb`` [l, 768] (text_emb_l, column 0 = [CLS]);
    ``txt_emb`` = the mean over all l slots, padding included (``text.pool="mean_all_slots"``: text_emb_g).
  * 97 tokens, default positions 0..l-1, token type 0 (GLoRIA calls BertModel with the right arguments).
"""
from __future__ import annotations

from typing import Any

from medvlp_jax.released import configs, towers
from medvlp_jax.released.namemap import (CheckpointImportError, ReleasedImportReport, convert_entries, dense,
                                                merge_trees, require)
from medvlp_jax.released.reader import LoadedCheckpoint

IMAGE = "gloria.img_encoder.model."
TEXT = "gloria.text_encoder.model."
GLOBAL = "gloria.img_encoder.global_embedder"
LOCAL = "gloria.img_encoder.local_embedder"
MARKERS = (GLOBAL + ".weight", LOCAL + ".weight", IMAGE + "conv1.weight", TEXT + "embeddings.word_embeddings.weight")
MAX_TEXT_LEN = 97


def convert(ckpt: LoadedCheckpoint, options: configs.ImportOptions) -> tuple[Any, dict, dict, ReleasedImportReport]:
    """Converts a GLoRIA checkpoint.

    Returns:
      (config, variables {"params", "batch_stats"} of numpy arrays, method params {} (GLoRIA learns none), report).
    """
    sd, source = ckpt.state_dict, ckpt.path
    require(sd, MARKERS, source, "a GLoRIA checkpoint (marshuang80/gloria, PretrainModel.state_dict())")
    if options.image_encoder not in ("auto", "resnet50"):
        raise CheckpointImportError(f"{source}: --image_encoder={options.image_encoder}, but GLoRIA's released "
                                    f"encoder is a ResNet-50")
    report = ReleasedImportReport(format="gloria", source=source)

    image_cfg = towers.infer_resnet(sd, IMAGE, resize_to=299, image_size=224, report=report)
    image = towers.convert_resnet(sd, IMAGE, image_cfg["stage_sizes"], report)
    text_cfg = towers.infer_bert(sd, TEXT, options.text_heads, report)
    if text_cfg["depth"] < 4:
        raise CheckpointImportError(f"{source}: GLoRIA sums the last 4 BERT layers, the checkpoint has "
                                    f"{text_cfg['depth']}")
    text = towers.convert_bert(sd, TEXT, report, token_types=text_cfg["type_vocab_size"] > 0)

    dim = int(sd[GLOBAL + ".weight"].shape[0])
    if sd[LOCAL + ".weight"].shape[0] != dim or dim != text_cfg["width"]:
        raise CheckpointImportError(f"{source}: global embedder width {dim}, local embedder width "
                                    f"{sd[LOCAL + '.weight'].shape[0]} and text width {text_cfg['width']} differ: "
                                    f"GLoRIA compares its image embeddings with unprojected text features")
    heads, used, missing = convert_entries(sd, dense(GLOBAL, ("img_head", "dense"))
                                           + dense(LOCAL, ("patch_head", "dense"), bias=False))
    report.loaded += used
    report.missing += missing
    report.sweep(sd)

    c = configs.method_config("gloria", "paper")
    text_fields = dict(text_cfg, use_position_ids=True, word_attn_shift=0, merge_word_pieces=True,
                       full_length_tail="keep", sum_last_layers=4, pool="mean_all_slots")
    configs.finish_config(c, image=image_cfg, text=text_fields,
                          proj=dict(kind="linear", dim=dim, normalize=False, image_kind="linear", image_bias=True,
                                    patch_kind="linear", patch_bias=False, text_kind="identity",
                                    word_kind="identity"),
                          max_text_len=options.max_text_len or MAX_TEXT_LEN, options=options, report=report)
    c.method.report_vector = "mean_all_slots"
    report.architecture = dict(image=image_cfg, text=text_cfg, proj=dict(dim=dim))
    variables = merge_trees({"params": {"image": image["params"], "text": text["params"]},
                             "batch_stats": {"image": image["batch_stats"]}}, heads)
    return c, variables, {}, report
