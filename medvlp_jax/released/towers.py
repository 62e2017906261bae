"""Image and text towers of released checkpoints: sizes inferred from tensor shapes, conversion with reasons.

The towers reuse ``hf_import``'s name maps (timm ViT with its fused ``qkv`` split, torchvision ResNet with its
running statistics, Hugging Face / BLIP BERT); this module finds each tower's sizes in the shapes (never in
``hyper_parameters``, which MGCA's file barely fills) and gives every key a converter skips its reason.

Head counts are not in any shape: they default to width / 64 (ViT-B/16, DeiT-B, BERT-base and
Bio_ClinicalBERT all use 64-wide heads) and are recorded as an assumption; ``image_heads`` / ``text_heads``
override them.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import numpy as np

from medvlp_jax.models import hf_import
from medvlp_jax.released.namemap import (CheckpointImportError, ReleasedImportReport, count_indexed,
                                                require, section)

BN_COUNTER = "BatchNorm step counter (torch uses it only when momentum=None; the running statistics are converted)"
POSITION_IDS = "position-id buffer (an arange saved by older transformers; not a weight)"

# Reasons for the keys hf_import's converters skip (regex on the tower-local key).
VIT_REASONS = {r"head\..*|head_dist\..*|fc_norm\..*|dist_token": "DeiT classification/distillation head, not part "
                                                                   "of the encoder"}
RESNET_REASONS = {r"fc\..*": "torchvision classifier (replaced by Identity in the authors' code)",
                  r".*num_batches_tracked": BN_COUNTER}
BERT_REASONS = {r"cls\..*": "masked-LM head, not part of the encoder",
                r".*position_ids": POSITION_IDS,
                r"pooler\..*": "BERT pooler: the authors' encoder never reads pooler_output"}


def heads_for(width: int, override: Optional[int], what: str, report: ReleasedImportReport) -> int:
    """The head count: ``override`` or width / 64 (recorded as an assumption)."""
    if override:
        if width % override:
            raise CheckpointImportError(f"{what} width {width} is not divisible by the {override} heads asked for")
        report.notes.append(f"{what}: attention heads = {override} (given)")
        return int(override)
    if width % 64:
        raise CheckpointImportError(f"{what} width {width} is not a multiple of 64, so the head count cannot be "
                                    f"assumed: pass it explicitly (--{what.split()[0]}_heads)")
    report.notes.append(f"{what}: attention heads = width / 64 = {width // 64} assumed (as ViT-B, BERT-base; "
                        f"shapes do not record it)")
    return width // 64


# ----------------------------------------------------------------------------------------------------------
# ViT (timm / DeiT layout).

def infer_vit(sd: Mapping[str, np.ndarray], prefix: str, heads: Optional[int],
              report: ReleasedImportReport) -> dict[str, Any]:
    """``config.model.image`` fields of the timm-layout ViT under ``prefix``."""
    require(sd, [prefix + k for k in ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")],
            report.source, "a timm ViT")
    sd = section(sd, prefix)
    _, n_tokens, width = sd["pos_embed"].shape
    proj = sd["patch_embed.proj.weight"]                      # [width, channels, patch, patch]
    grid = math.isqrt(n_tokens - 1)
    if grid * grid != n_tokens - 1:
        raise CheckpointImportError(f"ViT pos_embed has {n_tokens} tokens: not [CLS] + a square patch grid")
    depth = count_indexed(sd, r"blocks\.(\d+)\.")
    return dict(name="vit", patch_size=int(proj.shape[-1]), width=int(width), depth=depth,
                num_heads=heads_for(int(width), heads, "image ViT", report),
                mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]), image_size=int(grid * proj.shape[-1]),
                channels=int(proj.shape[1]), layer_norm_eps=1e-6, pool="cls", hf_checkpoint="")


def convert_vit(sd: Mapping[str, np.ndarray], prefix: str, report: ReleasedImportReport) -> dict:
    """The ViT section under ``prefix`` -> ``{"params": vit params}``."""
    sec = section(sd, prefix)
    params, sub = hf_import.convert_vit_state_dict(sec, source=report.source)
    report.add(prefix, sec, sub, VIT_REASONS)
    return {"params": params}


# ----------------------------------------------------------------------------------------------------------
# ResNet (torchvision bottleneck layout).

def infer_resnet(sd: Mapping[str, np.ndarray], prefix: str, resize_to: int, image_size: int,
                 report: ReleasedImportReport) -> dict[str, Any]:
    """``config.model.image`` fields of the torchvision-layout ResNet under ``prefix``."""
    require(sd, [prefix + k for k in ("conv1.weight", "layer1.0.conv3.weight")], report.source, "a torchvision ResNet")
    sd = section(sd, prefix)
    base = int(sd["conv1.weight"].shape[0])
    stages = tuple(count_indexed(sd, rf"layer{s}\.(\d+)\.") for s in (1, 2, 3, 4))
    if min(stages) == 0:
        raise CheckpointImportError(f"ResNet section has blocks per stage {stages}: a stage is empty")
    if sd["layer1.0.conv3.weight"].shape[0] != 4 * base:
        raise CheckpointImportError("ResNet without 4x bottleneck blocks (e.g. ResNet-18/34): our ResNet tower "
                                    "implements the ResNet-50 family only")
    return dict(name="resnet50", stage_sizes=stages, width=base, resize_to=resize_to, image_size=image_size,
                channels=int(sd["conv1.weight"].shape[1]), pool="cls", hf_checkpoint="")


def convert_resnet(sd: Mapping[str, np.ndarray], prefix: str, stage_sizes, report: ReleasedImportReport) -> dict:
    """The ResNet section under ``prefix`` -> ``{"params": ..., "batch_stats": ...}``."""
    sec = section(sd, prefix)
    variables, sub = hf_import.convert_resnet_state_dict(sec, stage_sizes=stage_sizes, source=report.source)
    report.add(prefix, sec, sub, RESNET_REASONS)
    return variables


# ----------------------------------------------------------------------------------------------------------
# BERT (Hugging Face BertModel, or the BLIP variant MGCA uses).

def infer_bert(sd: Mapping[str, np.ndarray], prefix: str, heads: Optional[int],
               report: ReleasedImportReport) -> dict[str, Any]:
    """``config.model.text`` size fields of the BERT under ``prefix``."""
    require(sd, [prefix + k for k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                                      "encoder.layer.0.intermediate.dense.weight")], report.source, "a BERT")
    sd = section(sd, prefix)
    vocab, width = sd["embeddings.word_embeddings.weight"].shape
    types = sd.get("embeddings.token_type_embeddings.weight")
    return dict(vocab_size=int(vocab), width=int(width), depth=count_indexed(sd, r"encoder\.layer\.(\d+)\."),
                num_heads=heads_for(int(width), heads, "text BERT", report),
                mlp_dim=int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
                max_position=int(sd["embeddings.position_embeddings.weight"].shape[0]),
                type_vocab_size=0 if types is None else int(types.shape[0]), layer_norm_eps=1e-12,
                hf_checkpoint="")


def convert_bert(sd: Mapping[str, np.ndarray], prefix: str, report: ReleasedImportReport, *,
                 extra_reasons: Optional[Mapping[str, str]] = None, token_types: bool = True) -> dict:
    """The BERT section under ``prefix`` -> ``{"params": bert params}``.

    Args:
      extra_reasons: regex (tower-local key) -> reason for keys of this variant that no BERT map knows
        (MGCA's BLIP cross-attention); they are recorded as ignored before conversion.
      token_types: False for a BERT without a token-type table (its absence is then expected, not missing).
    """
    sec = section(sd, prefix)
    extra = dict(extra_reasons or {})
    skipped = [k for k in sec if any(re.fullmatch(p, k) for p in extra)]
    for k in skipped:
        report.ignored[prefix + k] = next(why for p, why in extra.items() if re.fullmatch(p, k))
        del sec[k]
    params, sub = hf_import.convert_bert_state_dict(sec, source=report.source)
    absent = "embeddings.token_type_embeddings.weight"
    if not token_types and absent in sub.missing:
        sub.missing.remove(absent)
        report.notes.append(f"{prefix}: no token-type table (text.type_vocab_size=0), as in the authors' BERT")
    report.add(prefix, sec, sub, BERT_REASONS)
    return {"params": params}

