"""Hugging Face / PyTorch checkpoints -> our Flax parameter trees, with explicit name maps and a report.

Nothing is silent: every conversion returns an ``ImportReport`` listing the checkpoint keys the name map
needed but did not find (``missing``), the keys it neither used nor knows to be irrelevant
(``unexpected``), and the keys it skipped on purpose (``ignored``: MLM/NSP heads, the pooler when the
tower has none, ``position_ids`` buffers, layers beyond the configured depth). ``load_text_tower`` fails
on any missing or unexpected key and on any shape mismatch.

Weights are read from a local directory only (never downloaded): ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), else ``pytorch_model.bin`` through ``torch.load(weights_only=True)``
when torch is installed. Without torch a ``.bin`` is refused: it is a pickle and is never unpickled here.

Layouts supported:
  * BERT (``bert.py``): ``BertModel`` (keys ``embeddings.*``, ``encoder.layer.N.*``, ``pooler.*``) and
    ``BertForMaskedLM`` / ``BertForPreTraining`` (``bert.`` prefix, ``cls.*`` heads ignored); old
    ``LayerNorm.gamma/beta`` names are accepted.
  * ViT (``vit.py``): Hugging Face ``ViTModel`` (optionally ``vit.`` prefix) and timm/DeiT
    (``blocks.N.attn.qkv`` split into query/key/value).
  * ResNet (``resnet.py``): torchvision ``resnet50`` state dicts (params + ``batch_stats``).

``load_text_tower`` / ``load_image_tower`` put a converted tower into an initialised DualEncoder tree
(``config.model.text.hf_checkpoint`` / ``config.model.image.hf_checkpoint``) after checking every shape.

Torch Linear weights are [out, in] -> Flax kernels [in, out]; conv weights [out, in, kh, kw] ->
[kh, kw, in, out].
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]

# HF config.json field -> config.model.text field.
_HF_TO_TEXT = {
    "vocab_size": "vocab_size", "hidden_size": "width", "num_hidden_layers": "depth",
    "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim",
    "max_position_embeddings": "max_position", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
}
# Checkpoint keys (after the prefix is stripped) that a BERT tower never uses.
_BERT_IGNORED = (r"cls\..*", r".*position_ids$", r"embeddings\.position_ids")


@dataclasses.dataclass
class ImportReport:
    """What a conversion did with each checkpoint key.

    Attributes:
      source: the directory or description of the state dict.
      loaded: number of checkpoint tensors that were converted.
      missing: checkpoint keys the name map needs but the checkpoint lacks.
      unexpected: checkpoint keys neither converted nor known to be irrelevant.
      ignored: checkpoint keys skipped on purpose (heads, buffers, truncated layers).
      notes: human-readable remarks (prefix stripped, layers truncated, ...).
    """
    source: str
    loaded: int = 0
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        return (f"{self.source}: loaded {self.loaded}, missing {len(self.missing)} {self.missing[:8]}, "
                f"unexpected {len(self.unexpected)} {self.unexpected[:8]}, ignored {len(self.ignored)}"
                + (f"; {'; '.join(self.notes)}" if self.notes else ""))

    def raise_if_incomplete(self) -> None:
        """Raises ValueError naming the source when any key is missing or unexpected."""
        if not self.ok:
            raise ValueError(f"incomplete checkpoint import: {self.summary()}")


# ----------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory.

def read_hf_config(ckpt_dir: str) -> dict:
    """config.json of a Hugging Face checkpoint directory."""
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {ckpt_dir!r}")
    with open(path) as f:
        return json.load(f)


def _load_safetensors(path: str) -> StateDict:
    from safetensors import safe_open
    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (TypeError, ValueError):
        # numpy has no bfloat16; read through jax (ml_dtypes) and upcast.
        with safe_open(path, framework="flax") as f:
            for k in f.keys():
                out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
    return out


def _load_torch_file(path: str) -> StateDict:
    """A torch checkpoint file through ``torch.load(weights_only=True)``; never unpickled without torch."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path!r} is a PyTorch pickle; install torch to read it with weights_only=True, "
                          f"or convert it to safetensors") from e
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):             # timm/DeiT releases wrap the state dict
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in raw.items() if hasattr(v, "numpy")}


def load_state_dict(ckpt_dir: str) -> StateDict:
    """All tensors of a local checkpoint directory (or single weight file) as float32/int numpy arrays.

    In a directory, in order of preference: model.safetensors, model.safetensors.index.json (sharded),
    pytorch_model.bin (only with torch installed, loaded with ``weights_only=True``). A file path is read
    as safetensors when it ends in ``.safetensors``, else as a torch checkpoint (``.pth``/``.pt``/``.bin``).

    Raises:
      FileNotFoundError: naming the directory, when no weight file is there.
      ImportError: when only a PyTorch pickle is there and torch is not installed.
    """
    if os.path.isfile(ckpt_dir):
        sd = _load_safetensors(ckpt_dir) if ckpt_dir.endswith(".safetensors") else _load_torch_file(ckpt_dir)
        return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in sd.items()}
    single = os.path.join(ckpt_dir, "model.safetensors")
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    binary = os.path.join(ckpt_dir, "pytorch_model.bin")
    if os.path.isfile(single):
        sd = _load_safetensors(single)
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(_load_safetensors(os.path.join(ckpt_dir, name)))
    elif os.path.isfile(binary):
        sd = _load_torch_file(binary)
    else:
        raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                                f"in checkpoint directory {ckpt_dir!r}")
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------
# The generic name-map engine.

def _linear(prefix: str, path: Path) -> list[tuple[str, Path, Callable]]:
    """Torch Linear -> Flax Dense: weight [out, in] -> kernel [in, out], bias as is."""
    return [(f"{prefix}.weight", path + ("kernel",), lambda a: a.T),
            (f"{prefix}.bias", path + ("bias",), lambda a: a)]


def _layernorm(prefix: str, path: Path) -> list[tuple[str, Path, Callable]]:
    return [(f"{prefix}.weight", path + ("scale",), lambda a: a),
            (f"{prefix}.bias", path + ("bias",), lambda a: a)]


def _conv(key: str, path: Path) -> tuple[str, Path, Callable]:
    return (key, path + ("kernel",), lambda a: a.transpose(2, 3, 1, 0))


def _set(tree: dict, path: Path, value: np.ndarray) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _apply_map(sd: StateDict, entries: Iterable[tuple[str, Path, Callable]], ignored_patterns: Sequence[str],
               source: str, multi: Iterable[tuple[str, Callable[[np.ndarray], list[tuple[Path, np.ndarray]]]]] = ()
               ) -> tuple[dict, ImportReport]:
    """Converts ``sd`` with (key, target path, transform) entries; everything else is reported."""
    report = ImportReport(source=source)
    tree: dict = {}
    used = set()
    for key, path, fn in entries:
        if key not in sd:
            report.missing.append(key)
            continue
        _set(tree, path, np.ascontiguousarray(fn(sd[key])))
        used.add(key)
    for key, fn in multi:
        if key not in sd:
            report.missing.append(key)
            continue
        for path, value in fn(sd[key]):
            _set(tree, path, np.ascontiguousarray(value))
        used.add(key)
    report.loaded = len(used)
    pattern = re.compile("|".join(f"(?:{p})" for p in ignored_patterns)) if ignored_patterns else None
    for key in sorted(set(sd) - used):
        (report.ignored if pattern is not None and pattern.fullmatch(key) else report.unexpected).append(key)
    return tree, report


def _strip_prefix(sd: StateDict, prefix: str, marker: str) -> tuple[StateDict, Optional[str]]:
    """Drops ``prefix`` from every key that has it when the checkpoint uses it (detected via ``marker``)."""
    if any(k.startswith(prefix + marker) for k in sd):
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}, prefix
    return dict(sd), None


# ----------------------------------------------------------------------------------------------------------
# BERT.

def _count_layers(sd: StateDict, pattern: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def convert_bert_state_dict(state_dict: Mapping[str, np.ndarray], *, depth: Optional[int] = None,
                            with_pooler: bool = False, source: str = "state dict") -> tuple[dict, ImportReport]:
    """HF BertModel / BertForMaskedLM state dict -> ``bert.Bert`` params.

    Args:
      state_dict: tensor name -> array (``bert.`` prefix optional; ``LayerNorm.gamma/beta`` accepted).
      depth: layers to convert (default: all in the checkpoint); layers >= depth are reported as ignored
        (MGCA keeps the first 6 of Bio_ClinicalBERT's 12).
      with_pooler: convert ``pooler.dense`` (for a ``Bert(add_pooler=True)``); otherwise it is ignored.
      source: name used in the report and errors.

    Returns:
      (params nested dict of float32 numpy arrays, ImportReport).
    """
    sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
          for k, v in state_dict.items()}
    sd, prefix = _strip_prefix(sd, "bert.", "embeddings.")
    n_ckpt = _count_layers(sd, r"encoder\.layer\.(\d+)\.")
    depth = n_ckpt if depth is None else depth
    if depth > n_ckpt:
        raise ValueError(f"{source}: checkpoint has {n_ckpt} layers, the model wants {depth}")
    entries = [
        ("embeddings.word_embeddings.weight", ("word_embeddings", "embedding"), lambda a: a),
        ("embeddings.position_embeddings.weight", ("position_embeddings", "embedding"), lambda a: a),
        ("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding"), lambda a: a),
        *_layernorm("embeddings.LayerNorm", ("embeddings_ln",)),
    ]
    for i in range(depth):
        p, t = f"encoder.layer.{i}", (f"layer_{i}",)
        for name in ("query", "key", "value"):
            entries += _linear(f"{p}.attention.self.{name}", t + ("attn", name))
        entries += _linear(f"{p}.attention.output.dense", t + ("attn", "out"))
        entries += _layernorm(f"{p}.attention.output.LayerNorm", t + ("attn_ln",))
        entries += _linear(f"{p}.intermediate.dense", t + ("mlp_in",))
        entries += _linear(f"{p}.output.dense", t + ("mlp_out",))
        entries += _layernorm(f"{p}.output.LayerNorm", t + ("mlp_ln",))
    ignored = list(_BERT_IGNORED) + [rf"encoder\.layer\.(?:{'|'.join(str(i) for i in range(depth, n_ckpt))})\..*"
                                     ] * (depth < n_ckpt)
    if with_pooler:
        entries += _linear("pooler.dense", ("pooler",))
    else:
        ignored.append(r"pooler\..*")
    params, report = _apply_map(sd, entries, ignored, source)
    if prefix:
        report.notes.append(f"stripped key prefix {prefix!r}")
    if depth < n_ckpt:
        report.notes.append(f"kept the first {depth} of {n_ckpt} layers")
    return params, report


def bert_config_from_hf(ckpt_dir: str) -> dict:
    """``config.model.text`` fields for a Hugging Face BERT checkpoint directory.

    Returns:
      dict with vocab_size, width, depth, num_heads, mlp_dim, max_position, type_vocab_size, layer_norm_eps,
      dropout, attention_dropout, hf_checkpoint.

    Raises:
      ValueError: naming the directory when the architecture is not one ``bert.Bert`` reproduces.
    """
    hf = read_hf_config(ckpt_dir)
    _check_bert_architecture(hf, ckpt_dir)
    out = {ours: hf[theirs] for theirs, ours in _HF_TO_TEXT.items() if theirs in hf}
    missing = sorted(set(_HF_TO_TEXT.values()) - set(out) - {"layer_norm_eps", "type_vocab_size"})
    if missing:
        raise ValueError(f"{ckpt_dir}/config.json lacks {missing}")
    out.setdefault("layer_norm_eps", 1e-12)
    out.setdefault("type_vocab_size", 2)
    out["dropout"] = hf.get("hidden_dropout_prob", 0.1)
    out["attention_dropout"] = hf.get("attention_probs_dropout_prob", 0.1)
    out["hf_checkpoint"] = ckpt_dir
    return out


def _check_bert_architecture(hf: dict, ckpt_dir: str) -> None:
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"{ckpt_dir}: model_type {hf.get('model_type')!r} is not 'bert'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{ckpt_dir}: hidden_act {hf['hidden_act']!r}; bert.Bert implements exact 'gelu' only")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{ckpt_dir}: position_embedding_type {hf['position_embedding_type']!r} is not 'absolute'")


def check_text_config(hf: dict, expected: Mapping[str, Any], ckpt_dir: str) -> list[str]:
    """Compares a HF config with the text fields the model is built with.

    ``depth`` may be smaller than the checkpoint's (truncation, as MGCA); every other field must agree.

    Returns:
      notes (e.g. the truncation).

    Raises:
      ValueError: listing every disagreeing field, naming the directory.
    """
    _check_bert_architecture(hf, ckpt_dir)
    problems, notes = [], []
    for theirs, ours in _HF_TO_TEXT.items():
        if ours not in expected or expected[ours] is None or theirs not in hf:
            continue
        want, have = expected[ours], hf[theirs]
        if ours == "depth":
            if want > have:
                problems.append(f"text.depth={want} > num_hidden_layers={have}")
            elif want < have:
                notes.append(f"text.depth={want} keeps the first {want} of {have} layers")
        elif ours == "layer_norm_eps":
            if not np.isclose(want, have, rtol=1e-6, atol=0):
                problems.append(f"text.layer_norm_eps={want} != layer_norm_eps={have}")
        elif want != have:
            problems.append(f"text.{ours}={want} != {theirs}={have}")
    if problems:
        raise ValueError(f"config.model.text disagrees with {ckpt_dir}/config.json: " + "; ".join(problems))
    return notes


def load_hf_bert(ckpt_dir: str, expected: Optional[Mapping[str, Any]] = None, *,
                 with_pooler: bool = False) -> tuple[dict, ImportReport]:
    """Reads a local HF BERT directory and converts it to ``bert.Bert`` params.

    Args:
      ckpt_dir: directory with config.json and model.safetensors (or pytorch_model.bin, see module doc).
      expected: ``config.model.text``-style fields to check against config.json (absent fields unchecked);
        its ``depth`` selects how many layers are converted.
      with_pooler: also convert the pooler.

    Returns:
      (params, ImportReport).
    """
    hf = read_hf_config(ckpt_dir)
    expected = dict(expected or {})
    notes = check_text_config(hf, expected, ckpt_dir)
    depth = expected.get("depth") or hf.get("num_hidden_layers")
    params, report = convert_bert_state_dict(load_state_dict(ckpt_dir), depth=depth, with_pooler=with_pooler,
                                             source=ckpt_dir)
    report.notes += notes
    logging.getLogger(__name__).info("BERT import %s", report.summary())
    return params, report


def _check_same_shapes(new: Any, old: Any, where: str) -> list[str]:
    new_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(new)}
    old_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(old)}
    problems = [f"{where}{k}: not in the checkpoint" for k in sorted(set(old_leaves) - set(new_leaves))]
    problems += [f"{where}{k}: not in the model" for k in sorted(set(new_leaves) - set(old_leaves))]
    problems += [f"{where}{k}: checkpoint {tuple(np.shape(new_leaves[k]))} vs model {tuple(np.shape(old_leaves[k]))}"
                 for k in sorted(set(new_leaves) & set(old_leaves))
                 if tuple(np.shape(new_leaves[k])) != tuple(np.shape(old_leaves[k]))]
    return problems


def load_text_tower(params: Mapping[str, Any], model_cfg: Any) -> tuple[dict, ImportReport]:
    """Replaces the text tower of an initialised DualEncoder param tree with ``config.model.text.hf_checkpoint``.

    Args:
      params: the ``params`` collection of ``DualEncoder.init`` (a dict with a ``text`` entry), or the whole
        variables dict (``{"params": {...}, ...}``); the same kind is returned.
      model_cfg: ``config.model``; ``text.hf_checkpoint`` names the directory, the text fields are checked
        against its config.json.

    Returns:
      (params with ``text`` replaced by float32 numpy arrays (re-shard them as needed), ImportReport).

    Raises:
      ValueError: on missing/unexpected checkpoint keys, disagreeing config fields, or any shape mismatch.
    """
    from flax.core import unfreeze

    from medvlp_jax.models.dual_encoder import build_text_tower

    tree = unfreeze(params) if hasattr(params, "unfreeze") else dict(params)
    target = tree["params"] if "params" in tree and "text" not in tree else tree
    if "text" not in target:
        raise ValueError(f"params have no 'text' entry (top-level keys {sorted(target)})")
    ckpt_dir = (model_cfg.get("text") or {}).get("hf_checkpoint")
    if not ckpt_dir:
        raise ValueError("config.model.text.hf_checkpoint is not set")
    tower = build_text_tower(model_cfg)
    expected = {f: getattr(tower, f) for f in set(_HF_TO_TEXT.values())}
    new_text, report = load_hf_bert(ckpt_dir, expected, with_pooler=tower.add_pooler)
    report.raise_if_incomplete()
    problems = _check_same_shapes(new_text, target["text"], "params['text']")
    if problems:
        raise ValueError(f"text tower from {ckpt_dir} does not fit the model: " + "; ".join(problems))
    target["text"] = new_text
    return tree, report


def load_image_tower(variables: Mapping[str, Any], model_cfg: Any) -> tuple[dict, ImportReport]:
    """Replaces the image tower of initialised DualEncoder variables with ``config.model.image.hf_checkpoint``.

    ViT: a HF ``ViTModel`` directory or a timm/DeiT state dict (directory or file). ResNet: a torchvision
    state dict (file or directory); its running statistics go to ``batch_stats``. Position embeddings are
    not resampled: a checkpoint for another image size fails the shape check.

    Args:
      variables: ``{"params": {...}, ["batch_stats": {...}]}`` from ``DualEncoder.init`` (or eval_shape).
      model_cfg: ``config.model``.

    Returns:
      (variables with ``image`` replaced by float32 numpy arrays, ImportReport).

    Raises:
      ValueError: on missing/unexpected keys or any shape mismatch.
    """
    from flax.core import unfreeze

    from medvlp_jax.models.dual_encoder import build_image_tower
    from medvlp_jax.models.resnet import ResNet

    tree = unfreeze(variables) if hasattr(variables, "unfreeze") else {k: dict(v) for k, v in variables.items()}
    path = (model_cfg.get("image") or {}).get("hf_checkpoint")
    if not path:
        raise ValueError("config.model.image.hf_checkpoint is not set")
    tower = build_image_tower(model_cfg)
    sd = load_state_dict(path)
    if isinstance(tower, ResNet):
        new, report = convert_resnet_state_dict(sd, stage_sizes=tower.stage_sizes, source=path)
        collections = ("params", "batch_stats")
    else:
        if os.path.isfile(os.path.join(path, "config.json")):
            check_vit_config(read_hf_config(path), tower, path)
        new, report = convert_vit_state_dict(sd, source=path)
        new, collections = {"params": new}, ("params",)
    report.raise_if_incomplete()
    problems = []
    for col in collections:
        if col not in tree or "image" not in tree[col]:
            raise ValueError(f"variables have no {col}['image'] (top-level keys {sorted(tree)})")
        problems += _check_same_shapes(new[col], tree[col]["image"], f"{col}['image']")
    if problems:
        raise ValueError(f"image tower from {path} does not fit the model: " + "; ".join(problems))
    for col in collections:
        tree[col]["image"] = new[col]
    logging.getLogger(__name__).info("image import %s", report.summary())
    return tree, report


# ----------------------------------------------------------------------------------------------------------
# ViT.

def convert_vit_state_dict(state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"
                           ) -> tuple[dict, ImportReport]:
    """HF ``ViTModel`` or timm/DeiT ViT state dict -> ``vit.ViT`` params (layout auto-detected).

    Classification heads, HF's pooler and DeiT's distillation token are reported as ignored (the distilled
    variant's extra token also changes pos_embed's length, which the shape check in the caller catches).

    Returns:
      (params nested dict of float32 numpy arrays, ImportReport).
    """
    sd, prefix = _strip_prefix(dict(state_dict), "vit.", "embeddings.")
    if "embeddings.cls_token" in sd:
        params, report = _convert_hf_vit(sd, source)
    elif "cls_token" in sd and "pos_embed" in sd:
        params, report = _convert_timm_vit(sd, source)
    else:
        raise ValueError(f"{source}: neither a HF ViTModel (embeddings.cls_token) nor a timm ViT (cls_token, "
                         f"pos_embed) state dict")
    if prefix:
        report.notes.append(f"stripped key prefix {prefix!r}")
    return params, report


def check_vit_config(hf: dict, tower: Any, ckpt_dir: str) -> None:
    """Raises ValueError listing every HF ViTConfig field that disagrees with the ``vit.ViT`` tower.

    Shapes catch most size errors; this also catches the head count, the LayerNorm eps (HF ViT defaults
    to 1e-12, timm/DeiT and ours to 1e-6) and the activation.
    """
    pairs = {"hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
             "intermediate_size": "mlp_dim", "patch_size": "patch_size", "image_size": "image_size",
             "layer_norm_eps": "layer_norm_eps"}
    problems = [f"image.{ours}={getattr(tower, ours)} != {theirs}={hf[theirs]}" for theirs, ours in pairs.items()
                if theirs in hf and not np.isclose(getattr(tower, ours), hf[theirs], rtol=1e-6, atol=0)]
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {hf['hidden_act']!r} is not the exact 'gelu'")
    if hf.get("qkv_bias", True) is False:
        problems.append("qkv_bias=False")
    if problems:
        raise ValueError(f"config.model.image disagrees with {ckpt_dir}/config.json: " + "; ".join(problems))


def _vit_common(depth: int, names: dict) -> list:
    entries = []
    for i in range(depth):
        p, t = names["block"].format(i), (f"block_{i}",)
        entries += _layernorm(f"{p}.{names['ln_1']}", t + ("ln_1",))
        entries += _layernorm(f"{p}.{names['ln_2']}", t + ("ln_2",))
        entries += _linear(f"{p}.{names['out']}", t + ("attn", "out"))
        entries += _linear(f"{p}.{names['mlp_in']}", t + ("mlp_in",))
        entries += _linear(f"{p}.{names['mlp_out']}", t + ("mlp_out",))
    return entries


def _convert_hf_vit(sd: StateDict, source: str) -> tuple[dict, ImportReport]:
    depth = _count_layers(sd, r"encoder\.layer\.(\d+)\.")
    entries = [
        ("embeddings.cls_token", ("cls_token",), lambda a: a),
        ("embeddings.position_embeddings", ("pos_embed",), lambda a: a),
        _conv("embeddings.patch_embeddings.projection.weight", ("patch_embed",)),
        ("embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias"), lambda a: a),
        *_layernorm("layernorm", ("ln_final",)),
    ]
    entries += _vit_common(depth, dict(block="encoder.layer.{}", ln_1="layernorm_before", ln_2="layernorm_after",
                                       out="attention.output.dense", mlp_in="intermediate.dense",
                                       mlp_out="output.dense"))
    for i in range(depth):
        for name in ("query", "key", "value"):
            entries += _linear(f"encoder.layer.{i}.attention.attention.{name}", (f"block_{i}", "attn", name))
    return _apply_map(sd, entries, (r"pooler\..*", r"classifier\..*", r"embeddings\.mask_token"), source)


def _convert_timm_vit(sd: StateDict, source: str) -> tuple[dict, ImportReport]:
    depth = _count_layers(sd, r"blocks\.(\d+)\.")
    entries = [
        ("cls_token", ("cls_token",), lambda a: a),
        ("pos_embed", ("pos_embed",), lambda a: a),
        _conv("patch_embed.proj.weight", ("patch_embed",)),
        ("patch_embed.proj.bias", ("patch_embed", "bias"), lambda a: a),
        *_layernorm("norm", ("ln_final",)),
    ]
    entries += _vit_common(depth, dict(block="blocks.{}", ln_1="norm1", ln_2="norm2", out="attn.proj",
                                       mlp_in="mlp.fc1", mlp_out="mlp.fc2"))

    def split_qkv(i: int, kind: str):
        def fn(a: np.ndarray) -> list[tuple[Path, np.ndarray]]:
            parts = np.split(a, 3, axis=0)        # timm stacks q, k, v along the output dimension
            leaf = "kernel" if kind == "weight" else "bias"
            return [((f"block_{i}", "attn", n, leaf), part.T if kind == "weight" else part)
                    for n, part in zip(("query", "key", "value"), parts)]
        return fn

    multi = [(f"blocks.{i}.attn.qkv.{kind}", split_qkv(i, kind)) for i in range(depth) for kind in ("weight", "bias")]
    return _apply_map(sd, entries, (r"head\..*", r"head_dist\..*", r"fc_norm\..*", r"dist_token"), source, multi)


# ----------------------------------------------------------------------------------------------------------
# ResNet.

def convert_resnet_state_dict(state_dict: Mapping[str, np.ndarray], *, stage_sizes: Sequence[int] = (3, 4, 6, 3),
                              source: str = "state dict") -> tuple[dict, ImportReport]:
    """torchvision ResNet (bottleneck) state dict -> ``resnet.ResNet`` variables.

    Returns:
      ({"params": ..., "batch_stats": ...} of float32 numpy arrays, ImportReport); ``fc.*`` and
      ``num_batches_tracked`` are ignored.
    """
    sd = dict(state_dict)
    entries: list = []

    def bn(prefix: str, path: Path) -> None:
        entries.extend([(f"{prefix}.weight", ("params",) + path + ("scale",), lambda a: a),
                        (f"{prefix}.bias", ("params",) + path + ("bias",), lambda a: a),
                        (f"{prefix}.running_mean", ("batch_stats",) + path + ("mean",), lambda a: a),
                        (f"{prefix}.running_var", ("batch_stats",) + path + ("var",), lambda a: a)])

    entries.append(_conv("conv1.weight", ("params", "conv1")))
    bn("bn1", ("bn1",))
    for s, n in enumerate(stage_sizes):
        for j in range(n):
            p, t = f"layer{s + 1}.{j}", (f"layer{s + 1}_{j}",)
            for c in (1, 2, 3):
                entries.append(_conv(f"{p}.conv{c}.weight", ("params",) + t + (f"conv{c}",)))
                bn(f"{p}.bn{c}", t + (f"bn{c}",))
            if f"{p}.downsample.0.weight" in sd or j == 0:
                entries.append(_conv(f"{p}.downsample.0.weight", ("params",) + t + ("downsample_conv",)))
                bn(f"{p}.downsample.1", t + ("downsample_bn",))
    return _apply_map(sd, entries, (r"fc\..*", r".*num_batches_tracked"), source)
