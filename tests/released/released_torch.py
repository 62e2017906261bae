"""PyTorch references of the released MGCA and GLoRIA models, for the import parity tests (needs torch).

Written for these tests from the authors' forward passes (HKU-MedAI/MGCA @ 680fe4a: ``backbones/vits.py``,
``backbones/med.py``, ``backbones/encoder.py``, ``mgca/mgca_module.py``; marshuang80/gloria @ 416466a:
``models/vision_model.py``, ``models/text_model.py``, ``models/gloria_model.py``) at any width and depth,
with the authors' module attribute names, so ``state_dict()`` has exactly the released key layout
(../shared/checkpoints/*.keys.tsv, modulo layer and block counts). GLoRIA's text encoder is Hugging Face's
own ``BertModel``, as in the authors' code.

``lightning_checkpoint`` wraps a state dict the way pytorch-lightning 1.5.10 (MGCA) or 1.1.4 (GLoRIA) saves
it; the GLoRIA style keys callbacks by classes and stores an omegaconf-like config object, which the
restricted unpickler refuses (stand-in classes registered here under the real module names while saving).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ----------------------------------------------------------------------------------------------------------
# timm-layout ViT (MGCA backbones/vits.py: VisionTransformer with qkv bias, LayerNorm eps 1e-6, exact GELU).

class PatchEmbed(nn.Module):
    def __init__(self, channels, width, patch):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_size=224, patch=16, channels=3, width=768, depth=12, heads=12, mlp=3072):
        super().__init__()
        self.patch_embed = PatchEmbed(channels, width, patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed[:, :x.size(1), :]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------
# torchvision-layout ResNet (v1.5: stride on the 3x3 conv), fc replaced by Identity (no fc keys).

class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, stage_sizes=(3, 4, 6, 3), width=64, channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for s, n in enumerate(stage_sizes):
            planes = width * 2 ** s
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inplanes, planes, 2 if (s > 0 and j == 0) else 1))
                inplanes = planes * 4
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()


def resnet_trunk(model: ResNet, x):
    """The authors' ``resnet_forward`` (both repositories): upsample to 299 (align_corners=True), stem, stages.

    Returns (layer3 [b, c3, 19, 19], layer4 average-pooled [b, c4]).
    """
    x = nn.Upsample(size=(299, 299), mode="bilinear", align_corners=True)(x)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer3(model.layer2(model.layer1(x)))
    local = x
    x = model.layer4(x)
    return local, nn.AdaptiveAvgPool2d((1, 1))(x).view(x.size(0), -1)


# ----------------------------------------------------------------------------------------------------------
# BLIP BertModel as MGCA uses it (backbones/med.py): word + position embeddings (no token types), a persistent
# position_ids buffer, post-LN layers with an (unused in mode "text") cross-attention, no pooler.

@dataclasses.dataclass
class BertSizes:
    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12


class BlipEmbeddings(nn.Module):
    def __init__(self, c: BertSizes):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = self.position_ids[:, :input_ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(position_ids))


class BlipSelfAttention(nn.Module):
    def __init__(self, c: BertSizes):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, mask):
        b, n, w = x.shape
        split = lambda t: t.view(b, n, self.heads, w // self.heads).permute(0, 2, 1, 3)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5 + mask
        probs = scores.softmax(dim=-1)
        return (probs @ v).permute(0, 2, 1, 3).reshape(b, n, w), probs


class BlipSelfOutput(nn.Module):
    def __init__(self, c: BertSizes, width_in: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(width_in or c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BlipAttention(nn.Module):
    def __init__(self, c: BertSizes):
        super().__init__()
        self.self = BlipSelfAttention(c)
        self.output = BlipSelfOutput(c)

    def forward(self, x, mask):
        h, probs = self.self(x, mask)
        return self.output(h, x), probs


class BlipIntermediate(nn.Module):
    def __init__(self, c: BertSizes):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))             # transformers ACT2FN["gelu"]: the exact erf GELU


class BlipLayer(nn.Module):
    def __init__(self, c: BertSizes):
        super().__init__()
        self.attention = BlipAttention(c)
        self.crossattention = BlipAttention(c)   # key/value from encoder_width (= hidden size); mode "text" skips it
        self.intermediate = BlipIntermediate(c)
        self.output = BlipSelfOutput(c, c.intermediate_size)

    def forward(self, x, mask):
        a, probs = self.attention(x, mask)
        return self.output(self.intermediate(a), a), probs


class BlipEncoder(nn.Module):
    def __init__(self, c: BertSizes):
        super().__init__()
        self.layer = nn.ModuleList([BlipLayer(c) for _ in range(c.num_hidden_layers)])


class BlipBertModel(nn.Module):
    def __init__(self, c: BertSizes):
        super().__init__()
        self.embeddings = BlipEmbeddings(c)
        self.encoder = BlipEncoder(c)

    def forward(self, input_ids, attention_mask, position_ids=None):
        """med.py's argument order: the third positional argument is ``position_ids``."""
        x = self.embeddings(input_ids, position_ids)
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        attentions = []
        for layer in self.encoder.layer:
            x, probs = layer(x, mask)
            attentions.append(probs)
        return x, attentions


# ----------------------------------------------------------------------------------------------------------
# Word-piece aggregation (both repositories' ``aggregate_tokens``: pieces summed, [SEP] kept, then stop).

def aggregate_tokens(embeddings, caption_ids, idxtoword, last_attn=None):
    """embeddings [b, layers, l, w] -> [b, layers, l, w] merged and zero-padded.

    ``last_attn`` [b, l - 1] (MGCA only): MGCA's loop zips the tokens with the last layer's [CLS] attention on
    keys 1..l-1, so it stops after l - 1 tokens: a report that fills all l tokens never reaches its [SEP] and
    never flushes its last word (both slots stay zero). GLoRIA's loop has no attention and sees every token.
    """
    _, num_layers, num_words, dim = embeddings.shape
    out = []
    for i, (embs, ids) in enumerate(zip(embeddings.permute(0, 2, 1, 3), caption_ids)):
        agg, bank = [], []
        steps = zip(embs, ids) if last_attn is None else ((e, w) for e, w, _ in zip(embs, ids, last_attn[i]))
        for emb, wid in steps:
            word = idxtoword[wid.item()]
            if word == "[SEP]":
                agg.append(torch.stack(bank).sum(axis=0))
                agg.append(emb)
                break
            if not word.startswith("##"):
                if bank:
                    agg.append(torch.stack(bank).sum(axis=0))
                bank = [emb]
            else:
                bank.append(emb)
        agg = torch.stack(agg)
        out.append(torch.cat([agg, torch.zeros(num_words - len(agg), num_layers, dim)]))
    return torch.stack(out).permute(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------------------
# MGCA.

class GlobalEmbedding(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, output_dim), nn.BatchNorm1d(output_dim, affine=False))

    def forward(self, x):
        return self.head(x)


class LocalEmbedding(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.head = nn.Sequential(nn.Conv1d(input_dim, hidden_dim, 1), nn.BatchNorm1d(hidden_dim),
                                  nn.ReLU(inplace=True), nn.Conv1d(hidden_dim, output_dim, 1),
                                  nn.BatchNorm1d(output_dim, affine=False))

    def forward(self, x):
        return self.head(x.permute(0, 2, 1)).permute(0, 2, 1)


class MgcaImageEncoder(nn.Module):
    def __init__(self, model: nn.Module, global_in: int, local_in: int, hidden: int, dim: int):
        super().__init__()
        self.model = model
        self.global_embed = GlobalEmbedding(global_in, hidden, dim)
        self.local_embed = LocalEmbedding(local_in, hidden, dim)

    def forward(self, x):
        if isinstance(self.model, VisionTransformer):
            feat = self.model(x)
            return feat[:, 0].contiguous(), feat[:, 1:].contiguous()
        local, pooled = resnet_trunk(self.model, x)
        return pooled, local.flatten(2).transpose(1, 2).contiguous()     # einops "b c w h -> b (w h) c"


class MgcaTextEncoder(nn.Module):
    def __init__(self, sizes: BertSizes, hidden: int, dim: int, idxtoword: dict):
        super().__init__()
        self.model = BlipBertModel(sizes)
        self.global_embed = GlobalEmbedding(sizes.hidden_size, hidden, dim)
        self.local_embed = LocalEmbedding(sizes.hidden_size, hidden, dim)
        self.idxtoword = idxtoword

    def forward(self, ids, attn_mask, token_type):
        last, attentions = self.model(ids, attn_mask, token_type)  # the authors' positional call (the quirk)
        last_layer_attn = attentions[-1][:, :, 0, 1:].mean(dim=1)
        feat = aggregate_tokens(last.unsqueeze(1), ids, self.idxtoword, last_layer_attn)[:, 0]
        return feat[:, 0].contiguous(), feat[:, 1:].contiguous()


class MGCA(nn.Module):
    """``MGCA.__init__``'s modules; ``embed`` is ``MGCA.forward`` up to the L2-normalised embeddings."""

    def __init__(self, image: nn.Module, image_dims: tuple[int, int], text: BertSizes, idxtoword: dict,
                 hidden: int = 2048, dim: int = 128, num_prototypes: int = 500):
        super().__init__()
        self.img_encoder_q = MgcaImageEncoder(image, *image_dims, hidden, dim)
        self.text_encoder_q = MgcaTextEncoder(text, hidden, dim, idxtoword)
        self.patch_local_atten_layer = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.word_local_atten_layer = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.prototype_layer = nn.Linear(dim, num_prototypes, bias=False)

    @torch.no_grad()
    def embed(self, imgs, ids, mask):
        img_feat, patch_feat = self.img_encoder_q(imgs)
        patch_emb = F.normalize(self.img_encoder_q.local_embed(patch_feat), dim=-1)
        img_emb = F.normalize(self.img_encoder_q.global_embed(img_feat), dim=-1)
        report_feat, word_feat = self.text_encoder_q(ids, mask, torch.zeros_like(ids))
        word_emb = F.normalize(self.text_encoder_q.local_embed(word_feat), dim=-1)
        report_emb = F.normalize(self.text_encoder_q.global_embed(report_feat), dim=-1)
        return dict(img_emb=img_emb, patch_emb=patch_emb, txt_emb=report_emb, word_emb=word_emb)


# ----------------------------------------------------------------------------------------------------------
# GLoRIA.

class GloriaImageEncoder(nn.Module):
    def __init__(self, model: ResNet, feature_dim: int, interm_dim: int, dim: int):
        super().__init__()
        self.model = model
        self.global_embedder = nn.Linear(feature_dim, dim)
        self.local_embedder = nn.Conv2d(interm_dim, dim, 1, 1, 0, bias=False)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))


class GloriaTextEncoder(nn.Module):
    def __init__(self, bert_config, idxtoword: dict):
        super().__init__()
        from transformers import BertModel
        self.model = BertModel(bert_config)
        self.idxtoword = idxtoword

    def forward(self, ids, attn_mask, token_type):
        hidden = self.model(ids, attn_mask, token_type, output_hidden_states=True)[2]
        emb = torch.stack(hidden[-4:]).permute(1, 0, 2, 3)        # [b, 4, l, w]
        emb = aggregate_tokens(emb, ids, self.idxtoword)
        sent = emb.mean(axis=2).sum(axis=1)                        # mean over all l slots, summed over layers
        return emb.sum(axis=1).permute(0, 2, 1), sent              # [b, w, l], [b, w]


class GLoRIA(nn.Module):
    def __init__(self, image: ResNet, image_dims: tuple[int, int], bert_config, idxtoword: dict):
        super().__init__()
        self.text_encoder = GloriaTextEncoder(bert_config, idxtoword)
        self.img_encoder = GloriaImageEncoder(image, *image_dims, bert_config.hidden_size)


class GloriaPretrainModel(nn.Module):
    """``PretrainModel`` holds the model as ``self.gloria``: every key starts with ``gloria.``."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.gloria = GLoRIA(*args, **kwargs)

    @torch.no_grad()
    def embed(self, imgs, ids, mask):
        g = self.gloria
        local, pooled = resnet_trunk(g.img_encoder.model, imgs)
        img_emb_g, img_emb_l = g.img_encoder.global_embedder(pooled), g.img_encoder.local_embedder(local)
        text_emb_l, text_emb_g = g.text_encoder(ids, mask, torch.zeros_like(ids))
        return dict(img_emb=img_emb_g, patch_emb=img_emb_l.flatten(2).transpose(1, 2),
                    txt_emb=text_emb_g, word_emb=text_emb_l.transpose(1, 2))

    def state_dict_released(self):
        """state_dict() plus the position_ids buffer transformers 4.2.1 saved (4.31+ no longer persists it)."""
        sd = self.state_dict()
        key = "gloria.text_encoder.model.embeddings.position_ids"
        n = self.gloria.text_encoder.model.config.max_position_embeddings
        return OrderedDict([(key, torch.arange(n).expand((1, -1)).clone())] + list(sd.items()))


# ----------------------------------------------------------------------------------------------------------
# Random weights with non-trivial normalisation layers and running statistics.

@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights; LayerNorm/BatchNorm affine terms, running statistics and embeddings away from defaults."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(("embeddings.weight", "cls_token", "pos_embed")):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
        elif name.endswith("num_batches_tracked"):
            b.fill_(1234)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Lightning checkpoint dicts.

@contextlib.contextmanager
def fake_lightning_modules():
    """Registers stand-ins for pytorch_lightning's callbacks and omegaconf's DictConfig under their real module
    names, so a pickle written here names the same globals as GLoRIA's file; removed afterwards."""
    names = {"pytorch_lightning.callbacks.model_checkpoint": "ModelCheckpoint",
             "pytorch_lightning.callbacks.early_stopping": "EarlyStopping",
             "omegaconf.dictconfig": "DictConfig", "omegaconf.base": "ContainerMetadata", "omegaconf.nodes": "AnyNode"}
    added = []
    classes = {}
    for module_name, cls_name in names.items():
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            n = ".".join(parts[:i])
            if n in sys.modules and n not in added:
                raise RuntimeError(f"{n} is really installed; the fake-module helper would shadow it")
            if n not in sys.modules:
                sys.modules[n] = types.ModuleType(n)
                added.append(n)
        cls = type(cls_name, (), {"__module__": module_name})
        setattr(sys.modules[module_name], cls_name, cls)
        classes[cls_name] = cls
    try:
        yield classes
    finally:
        for n in reversed(added):
            sys.modules.pop(n, None)


def _fake_dictconfig(classes, content: dict):
    """An object graph shaped like omegaconf's DictConfig pickle: metadata, nodes, parent back-references."""
    meta = classes["ContainerMetadata"]()
    meta.__dict__.update(ref_type=typing.Any, object_type=dict, optional=True, key=None, flags={})
    cfg = classes["DictConfig"]()
    nodes = {}
    for k, v in content.items():
        node = classes["AnyNode"]()
        node.__dict__.update(_val=v, _parent=cfg, _metadata=meta)
        nodes[k] = node
    cfg.__dict__.update(_metadata=meta, _parent=None, _content=nodes)
    return cfg


def lightning_checkpoint(state_dict: "OrderedDict[str, torch.Tensor]", style: str, *,
                         hparams: Optional[dict] = None, classes: Optional[dict] = None) -> dict:
    """The dict a Lightning ``.ckpt`` holds. style "mgca" (PL 1.5.10) or "gloria" (PL 1.1.4: pass the classes
    of ``fake_lightning_modules()`` and ``torch.save`` inside that context)."""
    params = [v for k, v in state_dict.items() if v.is_floating_point() and "running_" not in k]
    optimizer = {"state": {i: {"step": torch.tensor(5.0), "exp_avg": torch.zeros_like(p),
                               "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                                   "params": list(range(len(params)))}]}
    out = {"epoch": 12, "global_step": 3456, "state_dict": state_dict, "optimizer_states": [optimizer]}
    if style == "mgca":
        monitor = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}"
        out.update({"pytorch-lightning_version": "1.5.10",
                    "callbacks": {monitor: {"monitor": "val_loss", "best_model_score": torch.tensor(1.25),
                                            "best_model_path": "/home/author/ckpts/epoch=11.ckpt",
                                            "current_score": torch.tensor(1.3), "dirpath": "/home/author/ckpts",
                                            "best_k_models": {"/home/author/ckpts/epoch=11.ckpt": torch.tensor(1.25)},
                                            "kth_best_model_path": "", "kth_value": torch.tensor(1.3),
                                            "last_model_path": "/home/author/ckpts/last.ckpt"},
                                  "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                                      "wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(1.25),
                                      "patience": 10}},
                    "lr_schedulers": [{"base_lrs": [2e-5], "step_in_cycle": 100, "cycle": 0}],
                    "hparams_name": "kwargs", "hyper_parameters": dict(hparams or {}, gpus=2, strategy="ddp")})
    elif style == "gloria":
        if classes is None:
            raise ValueError("the gloria style needs the classes of fake_lightning_modules()")
        out.update({"pytorch-lightning_version": "1.1.4",
                    "callbacks": {classes["ModelCheckpoint"]: {
                                      "monitor": "val_loss", "best_model_score": torch.tensor(1.1),
                                      "best_model_path": "/data/ckpt/epoch=5.ckpt", "current_score": torch.tensor(1.2),
                                      "dirpath": "./data/ckpt"},
                                  classes["EarlyStopping"]: {"wait_count": 1, "stopped_epoch": 0,
                                                             "best_score": torch.tensor(1.1), "patience": 10}},
                    "lr_schedulers": [{"mode": "min", "factor": 0.5, "best": 1.1}],
                    "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
                    "hparams_name": "cfg",
                    "hyper_parameters": _fake_dictconfig(classes, dict(hparams or {}, lr=5e-5)),
                    "hparams_type": classes["DictConfig"]})
    else:
        raise ValueError(style)
    return out


# ----------------------------------------------------------------------------------------------------------
# Vocabularies and key-set comparison.

def toy_vocab(words: Sequence[str], pieces: Sequence[str]) -> list[str]:
    """Special tokens, whole words, then "##" continuation pieces (index = token id)."""
    return SPECIAL + list(words) + [f"##{p}" for p in pieces]


def normalize_key(key: str) -> str:
    """Replaces layer/block indices so key sets of different depths compare."""
    import re
    key = re.sub(r"\.(blocks|layer)\.\d+\.", r".\1.N.", key)
    return re.sub(r"\.layer(\d)\.\d+\.", r".layer\1.N.", key)


def manifest_keys(path: str) -> list[str]:
    """Keys of a ../shared/checkpoints/*.keys.tsv manifest, in order."""
    with open(path) as f:
        return [line.split("\t")[0] for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Stand-in checkpoints for the docs table (docs/checkpoint_import.md): the released layouts and resolutions
# (ViT-B/16 grid at 224, ResNet-50 block layout at 299, Bio_ClinicalBERT vocabulary, 512 positions, MGCA's
# 128-d heads and 500 prototypes) with small widths and depths, random weights.

STANDINS = ("mgca_vit", "mgca_resnet50", "gloria_resnet50")


def write_standin(name: str, path: str, seed: int = 0) -> str:
    """Writes a random-weight stand-in of a released checkpoint as a Lightning-style ``.ckpt``.

    Args:
      name: one of ``STANDINS``.
      path: output file.

    Returns:
      path.
    """
    idx = {}                                      # aggregation needs no vocabulary: the stand-in is never run here
    if name.startswith("mgca"):
        if name == "mgca_vit":
            net, dims = VisionTransformer(image_size=224, patch=16, width=64, depth=2, heads=1, mlp=128), (64, 64)
        else:
            net, dims = ResNet(stage_sizes=(1, 1, 1, 1), width=16), (16 * 32, 16 * 16)
        text = BertSizes(vocab_size=28996, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                         intermediate_size=128, max_position_embeddings=512)
        model = randomize(MGCA(net, dims, text, idx, hidden=256, dim=128, num_prototypes=500), seed)
        torch.save(lightning_checkpoint(model.state_dict(), "mgca", hparams=dict(emb_dim=128, num_prototypes=500)),
                   path)
    elif name == "gloria_resnet50":
        from transformers import BertConfig
        cfg = BertConfig(vocab_size=28996, hidden_size=64, num_hidden_layers=4, num_attention_heads=1,
                         intermediate_size=128, max_position_embeddings=512)
        model = randomize(GloriaPretrainModel(ResNet(stage_sizes=(1, 1, 1, 1), width=16), (16 * 32, 16 * 16), cfg,
                                              idx), seed)
        with fake_lightning_modules() as classes:
            torch.save(lightning_checkpoint(model.state_dict_released(), "gloria", classes=classes), path)
    else:
        raise ValueError(f"unknown stand-in {name!r}; known: {STANDINS}")
    return path


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="write a random-weight stand-in of a released checkpoint")
    p.add_argument("name", choices=STANDINS)
    p.add_argument("path")
    a = p.parse_args()
    print(write_standin(a.name, a.path))
