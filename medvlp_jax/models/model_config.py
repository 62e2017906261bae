"""``config.model`` as typed settings: every field the model reads, with its default (the one home of each).

``read(config.model) -> ModelConfig`` takes a ConfigDict, a plain dict or None. A missing field and a field
set to None both take the default below; a key that is not a field is a ``ConfigError`` naming it (a misspelt
switch would otherwise be ignored silently). Lists (a config read back from JSON) become tuples.

The encoder presets are also here: ``config_lib.base`` builds its image configs from them, and
``ImageConfig.name`` picks one of ``VIT_PRESETS`` / ``RESNET_PRESETS`` for the size fields a config leaves
unset. Size fields left None in ``TextConfig`` take ``Bert``'s defaults (BERT-base, Bio_ClinicalBERT's
vocabulary of 28,996); ``hf_import.bert_config_from_hf(dir)`` gives them for a checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from medvlp_jax.errors import ConfigError

# ---- encoder presets (sizes; the config's fields override them) ----
VIT_B16 = dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, image_size=224)   # the papers'
VIT_TINY = dict(patch_size=16, width=192, depth=4, num_heads=3, mlp_dim=768, image_size=128)     # demo
VIT_TEST = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=32)         # test suite
RESNET50 = dict(stage_sizes=(3, 4, 6, 3), width=64)                                              # the papers'
RESNET_DEMO = dict(stage_sizes=(1, 1, 1, 1), width=16)                                           # demo
RESNET_TEST = dict(stage_sizes=(1, 1, 1, 1), width=8)                                            # test suite
# ``image.name`` -> the preset that supplies the size fields the config leaves unset.
VIT_PRESETS = {"vit": VIT_B16, "vit_b16": VIT_B16, "vit_demo": VIT_TINY, "vit_tiny": VIT_TINY}
RESNET_PRESETS = {"resnet50": RESNET50, "resnet": RESNET_TEST}
HEAD_ROLES = ("image", "text", "patch", "word")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """``config.model.image``: a ViT or a ResNet (fields of the other family are ignored)."""
    name: str = "vit"                       # a key of VIT_PRESETS or RESNET_PRESETS (picks the size defaults)
    patch_size: Optional[int] = None        # ViT sizes; None: the preset's
    width: Optional[int] = None             # ViT width / ResNet base width; None: the preset's
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    image_size: Optional[int] = None        # input side (ViT position table; ``example_batch``)
    layer_norm_eps: Optional[float] = None  # ViT; None: ViT's default (1e-6)
    stage_sizes: Optional[tuple] = None     # ResNet blocks per stage; None: the preset's
    resize_to: Optional[int] = None         # ResNet bilinear upsampling side (GLoRIA: 299); 0 / None: none
    local_stage: Optional[str] = None       # ResNet local grid: "layer3" (ResNet's default, the papers) | "layer2"
    channels: int = 3                       # input channels (``example_batch``)
    pool: str = "cls"                       # global feature: "cls" (the papers) | anything else: mean of patches
    hf_checkpoint: str = ""                 # read by ``hf_import.load_image_tower``, not here

    def __post_init__(self):
        if self.name not in VIT_PRESETS and self.name not in RESNET_PRESETS:
            raise ValueError(f"unknown config.model.image.name {self.name!r}; known: "
                             f"{sorted(VIT_PRESETS) + sorted(RESNET_PRESETS)}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """``config.model.text``: BERT sizes (None: ``Bert``'s default) and how tokens become word slots."""
    vocab_size: Optional[int] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    max_position: Optional[int] = None
    type_vocab_size: Optional[int] = None
    layer_norm_eps: Optional[float] = None
    dropout: Optional[float] = None            # None: Bert's default (0.1)
    attention_dropout: Optional[float] = None  # None: = dropout
    use_position_ids: Optional[bool] = None    # None: Bert's default (True); False = MGCA quirk, all positions 0
    sum_last_layers: Optional[int] = None      # None: Bert's default (1); GLoRIA 4
    # True: a slot's feature (and attention) is the SUM of its word pieces' (dual_encoder docstring).
    merge_word_pieces: bool = False
    # Global text feature: "cls", "mean" (over real tokens) or "mean_all_slots" (GLoRIA: mean of the merged
    # slot features over all l slots, padding included).
    pool: str = "cls"
    word_attn_shift: int = 0                   # 1: MGCA's off-by-one word weights (token i gets i+1's attention)
    # "drop": MGCA's aggregate_tokens, a report filling all l tokens loses its last word and [SEP] (merged
    # slots only; dual_encoder docstring); "keep": those slots are like any other report's.
    full_length_tail: str = "keep"
    hf_checkpoint: str = ""                    # read by ``hf_import.load_text_tower``, not here

    def __post_init__(self):
        if self.full_length_tail not in ("keep", "drop"):
            raise ValueError(f"config.model.text.full_length_tail must be 'keep' or 'drop', "
                             f"got {self.full_length_tail!r}")

    def bert_kwargs(self) -> dict[str, Any]:
        """The ``Bert`` fields this config sets (unset ones keep Bert's defaults)."""
        names = ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_position", "type_vocab_size",
                 "layer_norm_eps", "dropout", "use_position_ids", "sum_last_layers")
        kwargs = {f: getattr(self, f) for f in names if getattr(self, f) is not None}
        attention_dropout = self.dropout if self.attention_dropout is None else self.attention_dropout
        if attention_dropout is not None:
            kwargs["attention_dropout"] = attention_dropout
        return kwargs


@dataclasses.dataclass(frozen=True)
class ProjConfig:
    """``config.model.proj``: the four projection heads (HEAD_ROLES)."""
    kind: str = "linear"                # "linear" | "mlp_bn" (MGCA) | "identity" (heads.HEAD_KINDS)
    dim: int = 128                      # joint embedding width
    hidden: int = 2048                  # hidden width of "mlp_bn"
    normalize: bool = True              # L2-normalise the *_emb (False: raw, e.g. GLoRIA's dot products)
    image_kind: Optional[str] = None    # per-head kind; None: ``kind``
    text_kind: Optional[str] = None
    patch_kind: Optional[str] = None
    word_kind: Optional[str] = None
    image_bias: bool = True             # per-head Dense bias (GLoRIA's patch 1x1 conv has none)
    text_bias: bool = True
    patch_bias: bool = True
    word_bias: bool = True

    def __post_init__(self):
        from medvlp_jax.models.heads import HEAD_KINDS     # here: config_lib imports this module without flax
        for role in HEAD_ROLES:
            if self.kind_of(role) not in HEAD_KINDS:
                raise ValueError(f"config.model.proj: unknown kind {self.kind_of(role)!r} for the {role} head; "
                                 f"known: {HEAD_KINDS}")

    def kind_of(self, role: str) -> str:
        own = getattr(self, f"{role}_kind")
        return self.kind if own is None else own


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``config.model``."""
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    proj: ProjConfig = dataclasses.field(default_factory=ProjConfig)
    dtype: str = "float32"              # compute dtype: "float32" | "bfloat16" (params stay float32)
    remat: bool = False                 # recompute every ViT/BERT block / ResNet bottleneck in the backward pass
    fusion_barrier: Any = "auto"        # "auto" (on for XLA:CPU) | "on" | "off" (models/fusion_barrier.py)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"config.model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


def _items(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    return dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)


def _section(settings_cls, cfg: Any, where: str):
    """``settings_cls`` from one section; None values count as absent, unknown keys raise."""
    items = {k: v for k, v in _items(cfg).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(settings_cls)}
    unknown = sorted(set(items) - fields)
    if unknown:
        raise ConfigError(f"{where} has no field {unknown[0]!r}"
                          + (f" (nor {unknown[1:]})" if len(unknown) > 1 else "") + f"; known: {sorted(fields)}")
    return settings_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in items.items()})


def read(model_cfg: Any) -> ModelConfig:
    """``config.model`` (ConfigDict, dict or None) as a ModelConfig; raises on unknown keys and bad values."""
    items = {k: v for k, v in _items(model_cfg).items() if v is not None}
    sections = {"image": ImageConfig, "text": TextConfig, "proj": ProjConfig}
    top = {k: v for k, v in items.items() if k not in sections}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for k in sorted(top):
        if k not in known:
            raise ConfigError(f"config.model has no field {k!r}; known: {sorted(known)}")
    return ModelConfig(**top, **{name: _section(cls, items.get(name), f"config.model.{name}")
                                 for name, cls in sections.items()})
