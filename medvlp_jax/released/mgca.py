"""MGCA's released Lightning checkpoints (HKU-MedAI/MGCA @ 680fe4a, ViT-B/16 or ResNet-50) -> our DualEncoder.

Key layout (``mgca_module.py: MGCA.__init__``; ../shared/checkpoints/mgca_*.keys.tsv):

  img_encoder_q.model.*                 ViT (timm layout) or torchvision ResNet-50 without fc   -> image
  img_encoder_q.global_embed.head.*     Linear-BN-ReLU-Linear-BN(affine=False)                   -> img_head
  img_encoder_q.local_embed.head.*      the same with kernel-1 Conv1d                            -> patch_head
  text_encoder_q.model.*                BLIP BertModel: no token-type table, cross-attention     -> text
  text_encoder_q.global_embed.head.*    as above                                                 -> txt_head
  text_encoder_q.local_embed.head.*     as above                                                 -> word_head
  prototype_layer.weight [K, d]         Linear(d, K, bias=False)               -> MGCA objective's prototypes
  patch_/word_local_atten_layer.*       nn.MultiheadAttention, unused (use_local_atten=False)    ignored
  text_encoder_q.model.encoder.layer.*.crossattention.*   run only in mode="multimodal"          ignored

Quirks reproduced in the config (the released weights were trained with them):
  * ``text.use_position_ids=False``: ``BertEncoder.forward`` passes the token-type ids (all 0) in the
    position-id slot, so every token gets position 0 (MGCA issue #13). The whole position table is converted.
  * ``text.word_attn_shift=1``: the word weights of the token loss are off by one (methods.md 1.4); this
    affects training only.
  * ViT: LayerNorm eps 1e-6, exact GELU, [CLS] -> img_head, the 196 patch tokens -> patch_head.
  * ResNet: 224 input upsampled to 299 (bilinear, align_corners=True); layer3 [19x19x1024] -> patch_head,
    average-pooled layer4 -> img_head.
  * Text: [CLS] of the last layer -> txt_head; word pieces summed into words, [SEP] kept, zero padding ->
    word_head (slot 0 of our ``word_emb`` is [CLS]; MGCA's ``word_emb`` is our ``word_emb[:, 1:]``).
    ``text.full_length_tail="drop"``: the authors' loop stops after l - 1 tokens, so a report that fills all
    l tokens loses its last word and [SEP].
  * Every embedding is L2-normalised after its head (``proj.normalize=True``).
"""
from __future__ import annotations

from typing import Any

from medvlp_jax.released import configs, towers
from medvlp_jax.released.namemap import (BN_COUNTER_PATTERN, CheckpointImportError, ReleasedImportReport,
                                                convert_entries, merge_trees, mlp_bn_head, require)
from medvlp_jax.released.reader import LoadedCheckpoint

IMAGE = "img_encoder_q.model."
TEXT = "text_encoder_q.model."
HEADS = {"img_head": "img_encoder_q.global_embed.head", "patch_head": "img_encoder_q.local_embed.head",
         "txt_head": "text_encoder_q.global_embed.head", "word_head": "text_encoder_q.local_embed.head"}
PROTOTYPES = "prototype_layer.weight"
MARKERS = ("img_encoder_q.global_embed.head.0.weight", "img_encoder_q.global_embed.head.3.weight",
           "text_encoder_q.model.embeddings.word_embeddings.weight",
           "text_encoder_q.global_embed.head.0.weight", PROTOTYPES)
UNUSED_ATTENTION = ("patch_local_atten_layer.", "word_local_atten_layer.")
CROSS_ATTENTION = {r"encoder\.layer\.\d+\.crossattention\..*": "BLIP cross-attention: BertLayer runs it only in "
                                                                "mode='multimodal'; MGCA encodes with mode='text'"}
MAX_TEXT_LEN = 112


def infer_image_encoder(sd, requested: str, source: str) -> str:
    """"vit" or "resnet50" from the keys; ``requested`` ("auto" or a name) must agree."""
    if IMAGE + "cls_token" in sd:
        found = "vit"
    elif IMAGE + "conv1.weight" in sd:
        found = "resnet50"
    else:
        raise CheckpointImportError(f"{source}: neither a ViT ({IMAGE}cls_token) nor a ResNet ({IMAGE}conv1.weight) "
                                    f"image encoder in the checkpoint")
    if requested not in ("auto", found):
        raise CheckpointImportError(f"{source}: --image_encoder={requested} but the checkpoint holds a {found} "
                                    f"image encoder")
    return found


def convert(ckpt: LoadedCheckpoint, options: configs.ImportOptions) -> tuple[Any, dict, dict, ReleasedImportReport]:
    """Converts an MGCA checkpoint.

    Returns:
      (config, variables {"params", "batch_stats"} of numpy arrays, method params {"prototypes": [K, d]}, report).
      The report lists every key; shape checks against the model are the caller's (``import_checkpoint``).
    """
    sd, source = ckpt.state_dict, ckpt.path
    require(sd, MARKERS, source, "an MGCA checkpoint (HKU-MedAI/MGCA, MGCA.state_dict())")
    report = ReleasedImportReport(format="mgca", source=source)
    encoder = infer_image_encoder(sd, options.image_encoder, source)

    if encoder == "vit":
        image_cfg = towers.infer_vit(sd, IMAGE, options.image_heads, report)
        image = towers.convert_vit(sd, IMAGE, report)
    else:
        image_cfg = towers.infer_resnet(sd, IMAGE, resize_to=299, image_size=224, report=report)
        image = towers.convert_resnet(sd, IMAGE, image_cfg["stage_sizes"], report)

    text_cfg = towers.infer_bert(sd, TEXT, options.text_heads, report)
    text = towers.convert_bert(sd, TEXT, report, extra_reasons=CROSS_ATTENTION,
                               token_types=text_cfg["type_vocab_size"] > 0)

    hidden = int(sd[HEADS["img_head"] + ".0.weight"].shape[0])
    dim = int(sd[HEADS["img_head"] + ".3.weight"].shape[0])
    entries = [e for head, prefix in HEADS.items() for e in mlp_bn_head(prefix, head)]
    heads, used, missing = convert_entries(sd, entries)
    report.loaded += used
    report.missing += missing
    for prefix in HEADS.values():
        if prefix + ".0.weight" in sd and prefix + ".3.weight" in sd:
            h, d = sd[prefix + ".0.weight"].shape[0], sd[prefix + ".3.weight"].shape[0]
            if (h, d) != (hidden, dim):
                raise CheckpointImportError(f"{source}: head {prefix} is {h}->{d} wide but img_encoder_q's global "
                                            f"head is {hidden}->{dim}: our config has one proj.hidden / proj.dim for "
                                            f"all four heads")

    protos = sd[PROTOTYPES]
    if protos.shape[1] != dim:
        raise CheckpointImportError(f"{source}: {PROTOTYPES} is {list(protos.shape)}, its width is not the "
                                    f"embedding width {dim}")
    method_params = {"prototypes": protos.astype("float32")}
    report.loaded.append(PROTOTYPES)

    report.ignore([k for k in sd if BN_COUNTER_PATTERN.fullmatch(k) and k not in report.ignored],
                  towers.BN_COUNTER)
    report.ignore([k for k in sd if k.startswith(UNUSED_ATTENTION)],
                  "nn.MultiheadAttention built by MGCA.__init__ but unused (use_local_atten=False)")
    report.sweep(sd)

    c = configs.method_config("mgca", "paper" if encoder == "vit" else "paper,image=resnet")
    text_fields = dict(text_cfg, use_position_ids=False, word_attn_shift=1, merge_word_pieces=True,
                       full_length_tail="drop", sum_last_layers=1, pool="cls")
    configs.finish_config(c, image=image_cfg, text=text_fields,
                          proj=dict(kind="mlp_bn", hidden=hidden, dim=dim, normalize=True),
                          max_text_len=options.max_text_len or MAX_TEXT_LEN, options=options, report=report)
    c.method.num_prototypes = int(protos.shape[0])
    report.architecture = dict(image=image_cfg, text=text_cfg, proj=dict(hidden=hidden, dim=dim),
                               num_prototypes=int(protos.shape[0]))
    variables = merge_trees({"params": {"image": image["params"], "text": text["params"]}},
                            {"batch_stats": {"image": image["batch_stats"]}} if "batch_stats" in image else {},
                            heads)
    return c, variables, method_params, report
