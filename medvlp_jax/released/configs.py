"""The pretraining config of an imported checkpoint: the method's paper config, resized to the file's shapes.

An imported workdir must be readable by ``launch/evaluate.py`` exactly like one of ours, so its config.json
is a full pretraining config: ``configs/<method>.py`` (paper variant: the authors' losses, temperatures,
batch size, optimiser) with ``model.*`` replaced by the architecture found in the tensor shapes and the
quirks of the released model, and ``data.*`` pointing at the data and tokenizer the user names.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import ml_collections

from medvlp_jax import config_lib
from medvlp_jax.released.namemap import CheckpointImportError, ReleasedImportReport

@dataclasses.dataclass
class ImportOptions:
    """What a user may set when importing (launch/import_checkpoint.py flags).

    Attributes:
      tokenizer_dir: local Hugging Face tokenizer directory of the released model (Bio_ClinicalBERT's
        vocab.txt for MGCA and GLoRIA); it is not in the checkpoint.
      data_root: prepared data the workdir's config points at (launch/evaluate.py needs a prepared data set).
      image_heads, text_heads: attention heads (None: width / 64, see towers.py).
      image_encoder: "auto" (from the keys), "vit" or "resnet50"; a value the keys contradict is an error.
      max_text_len: token length (None: the authors', 112 MGCA / 97 GLoRIA).
    """
    tokenizer_dir: str = "checkpoints/Bio_ClinicalBERT"
    data_root: str = "data/mimic_cxr"
    image_heads: Optional[int] = None
    text_heads: Optional[int] = None
    image_encoder: str = "auto"
    max_text_len: Optional[int] = None


def method_config(name: str, arg: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py:<arg>`` of this repository (the configs/ folder is not a package)."""
    try:
        return config_lib.repo_config(name, arg)
    except FileNotFoundError as e:
        raise CheckpointImportError(f"{e}; the importer builds on the repository's method configs") from None


def _dataset_name(root: str) -> Optional[str]:
    path = os.path.join(root, "dataset_info.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("name")


def check_tokenizer(tokenizer_dir: str, vocab_size: int) -> None:
    """The tokenizer must exist and fit the embedding table (a larger one would index past it).

    Raises:
      CheckpointImportError: one line naming the directory and the fix.
    """
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointImportError(f"tokenizer directory {tokenizer_dir!r} does not exist: pass --tokenizer_dir=<the "
                                    f"released model's tokenizer, e.g. a local Bio_ClinicalBERT dir with vocab.txt>")
    from medvlp_jax.data import tokenizer as tokenizer_lib
    try:
        n = len(tokenizer_lib.load_tokenizer(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise CheckpointImportError(f"tokenizer directory {tokenizer_dir!r} is not a readable Hugging Face tokenizer "
                                    f"({e})") from None
    if n > vocab_size:
        raise CheckpointImportError(f"tokenizer {tokenizer_dir!r} has {n} tokens but the checkpoint's word embedding "
                                    f"table has {vocab_size} rows: it is not the tokenizer this model was trained with")


def finish_config(c: ml_collections.ConfigDict, *, image: Mapping[str, Any], text: Mapping[str, Any],
                  proj: Mapping[str, Any], max_text_len: int, options: ImportOptions,
                  report: ReleasedImportReport) -> ml_collections.ConfigDict:
    """Puts the inferred architecture and the user's data paths into a method config.

    Args:
      c: ``method_config(...)`` (modified in place and returned).
      image: the complete ``config.model.image`` (replaces the method's).
      text: ``config.model.text`` fields to set (the method's other text fields stay).
      proj: ``config.model.proj`` fields to set.
      max_text_len: ``config.data.max_text_len``.
      options: the user's options (data root, tokenizer).
      report: gets notes about the data root.

    Returns:
      ``c``.
    """
    c.model.image = ml_collections.ConfigDict(dict(image))
    c.model.text.update(dict(text))
    c.model.proj.update(dict(proj))
    if max_text_len > c.model.text.max_position:
        raise CheckpointImportError(f"max_text_len {max_text_len} exceeds the checkpoint's {c.model.text.max_position} "
                                    f"positions")
    crop = int(image["image_size"])
    c.data.crop = crop
    c.data.resize = max(crop, round(crop * 256 / 224))     # the authors: resize to 256, centre crop 224
    c.data.channels = int(image["channels"])
    c.data.max_text_len = int(max_text_len)
    c.data.root = options.data_root
    c.data.tokenizer_dir = options.tokenizer_dir
    c.data.auto_prepare = False
    name = _dataset_name(options.data_root)
    if name is None:
        report.notes.append(f"config.data.root={options.data_root!r} holds no prepared data set yet: "
                            f"launch/evaluate.py needs one there (launch/prepare_data.py), or edit config.json")
    else:
        c.data.name = name
    return c
