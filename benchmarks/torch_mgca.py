"""Our PyTorch stand-in for the authors' MGCA train step, built from a medvlp_jax config (benchmarks only).

It is NOT the authors' code (HKU-MedAI/MGCA): it is the same architecture from transformers' PyTorch classes
(``ViTModel``, ``BertModel``, eager attention so the attention maps MGCA reads are returned), MGCA's
projection heads (Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d without affine, position-wise on the
local features), the word-piece merge as a one-hot matmul (the authors loop over tokens in Python, which is
slower), and a line-by-line port of our MGCA objective (``medvlp_jax/methods/mgca.py``, the faithful defaults:
word_slots="all", pair-wise local negatives, ita_reduce="sum", patch context unnormalised for a ViT), with
torch.optim.AdamW. ``tests/benchmarks/test_compare_torch.py`` checks the loss port against our JAX loss and
the parameter count against our model.

Shapes follow the config: ViT ``model.image`` (patch_size, width, depth, num_heads, mlp_dim, image_size,
channels), BERT ``model.text`` (vocab_size, width, depth, num_heads, mlp_dim, max_position, type_vocab_size,
dropout), heads ``model.proj`` (mlp_bn | linear, hidden, dim), MGCA ``method`` (temperatures, prototypes,
Sinkhorn, quantiles). Only the fields that the paper and test configs use are supported; anything else raises.
``model.dtype`` float32 or bfloat16 (the forward under bfloat16 autocast, parameters and AdamW in float32, as
our train step); the model and ``to_torch``'s batch go to any device (``default_device``: CUDA when visible).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = -1e9      # as medvlp_jax.methods.common.NEG_INF
# config.model.dtype -> the autocast dtype of the forward pass (None: plain float32); parameters, gradients
# and AdamW's moments stay float32, as in our train step.
AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def _get(cfg: Any, key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


class Head(nn.Module):
    """MGCA's projection head on the last axis (``mlp_bn``) or a Linear (``linear``); leading axes are batch."""

    def __init__(self, kind: str, width: int, hidden: int, dim: int):
        super().__init__()
        if kind == "mlp_bn":
            self.layers = nn.ModuleList([nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, dim),
                                         nn.BatchNorm1d(dim, affine=False)])
        elif kind == "linear":
            self.layers = nn.ModuleList([nn.Linear(width, dim)])
        else:
            raise ValueError(f"compare_torch: projection head kind {kind!r} is not ported (mlp_bn, linear)")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> [..., dim]; BatchNorm statistics over every leading position (as ours)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.kind == "mlp_bn":
            lin1, bn1, lin2, bn2 = self.layers
            x = bn2(lin2(F.relu(bn1(lin1(x)))))
        else:
            x = self.layers[0](x)
        return x.reshape(*lead, x.shape[-1])


class TorchMgca(nn.Module):
    """ViT + BERT + four heads + the MGCA prototypes; ``forward(batch)`` returns the loss and its terms."""

    def __init__(self, config):
        super().__init__()
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel
        m, mc = config.model, config.method
        img, txt, proj = m.image, m.text, m.proj
        if img.name not in ("vit", "vit_b16") or mc.name != "mgca":
            raise ValueError("compare_torch ports the ViT image tower and the MGCA objective only "
                             f"(config.model.image.name={img.name!r}, config.method.name={mc.name!r})")
        unsupported = {"method.local_negatives": (_get(mc, "local_negatives", "pair"), "pair"),
                       "method.word_slots": (_get(mc, "word_slots", "all"), "all"),
                       "method.ita_groups": (int(_get(mc, "ita_groups", 1)), 1),
                       "model.text.word_attn_shift": (int(_get(txt, "word_attn_shift", 0)), 0),
                       "model.text.sum_last_layers": (int(_get(txt, "sum_last_layers", 1)), 1)}
        for field, (value, want) in unsupported.items():
            if value != want:
                raise ValueError(f"compare_torch: config.{field}={value!r} is not ported (only {want!r})")
        if m.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"compare_torch: config.model.dtype={m.dtype!r} is not ported "
                             f"(one of {sorted(AUTOCAST_DTYPES)})")
        # Our model.dtype is the compute dtype with float32 parameters; torch's counterpart is autocast.
        self.autocast_dtype = AUTOCAST_DTYPES[m.dtype]
        self.vit = ViTModel(ViTConfig(
            hidden_size=img.width, num_hidden_layers=img.depth, num_attention_heads=img.num_heads,
            intermediate_size=img.mlp_dim, image_size=img.image_size, patch_size=img.patch_size,
            num_channels=img.channels, hidden_act="gelu", layer_norm_eps=_get(img, "layer_norm_eps", 1e-6),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True,
            attn_implementation="eager"), add_pooling_layer=False)
        drop = float(_get(txt, "dropout", 0.1))
        self.bert = BertModel(BertConfig(
            vocab_size=txt.vocab_size, hidden_size=txt.width, num_hidden_layers=txt.depth,
            num_attention_heads=txt.num_heads, intermediate_size=txt.mlp_dim,
            max_position_embeddings=txt.max_position, type_vocab_size=txt.type_vocab_size,
            layer_norm_eps=txt.layer_norm_eps, hidden_dropout_prob=drop,
            attention_probs_dropout_prob=float(_get(txt, "attention_dropout", drop)), hidden_act="gelu",
            attn_implementation="eager"), add_pooling_layer=False)
        kind, hidden, dim = proj.kind, proj.hidden, proj.dim
        self.img_head = Head(kind, img.width, hidden, dim)
        self.txt_head = Head(kind, txt.width, hidden, dim)
        self.patch_head = Head(kind, img.width, hidden, dim)
        self.word_head = Head(kind, txt.width, hidden, dim)
        bound = 1.0 / dim ** 0.5
        self.prototypes = nn.Parameter(torch.empty(mc.num_prototypes, dim).uniform_(-bound, bound))
        self.image_pool = _get(img, "pool", "cls")
        self.text_pool = _get(txt, "pool", "cls")
        self.use_position_ids = bool(_get(txt, "use_position_ids", True))
        self.method = mc

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoder outputs MGCA reads (names as ``EncoderOutputs``); images NHWC as our pipeline's."""
        v = self.vit(pixel_values=batch["image"].permute(0, 3, 1, 2), output_attentions=True)
        x = v.last_hidden_state                                              # [b, 1 + p, w]
        patch_attn = v.attentions[-1][:, :, 0, 1:].mean(dim=1)               # [b, p]
        pooled = x[:, 0] if self.image_pool == "cls" else x[:, 1:].mean(dim=1)
        ids, mask, word_ids = batch["input_ids"], batch["attention_mask"], batch["word_ids"]
        b, l = ids.shape
        positions = None if self.use_position_ids else torch.zeros_like(ids)
        t = self.bert(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
        tokens = t.last_hidden_state                                         # [b, l, w]
        token_attn = t.attentions[-1][:, :, 0, :].mean(dim=1)                # [b, l]
        slots = torch.arange(l, device=ids.device)
        onehot = (word_ids[:, :, None] == slots[None, None, :]).to(tokens.dtype)          # [b, l, l]
        word_feat = torch.einsum("bts,btw->bsw", onehot, tokens)
        word_attn = torch.einsum("bts,bt->bs", onehot, token_attn)
        slot_mask = onehot.amax(dim=1) > 0
        if self.text_pool == "cls":
            txt_pooled = tokens[:, 0]
        else:
            mf = mask.to(tokens.dtype)[:, :, None]
            txt_pooled = (tokens * mf).sum(1) / mf.sum(1).clamp_min(1.0)
        norm = lambda y: F.normalize(y, dim=-1)
        return {"img_emb": norm(self.img_head(pooled)), "txt_emb": norm(self.txt_head(txt_pooled)),
                "patch_emb": norm(self.patch_head(x[:, 1:])), "word_emb": norm(self.word_head(word_feat)),
                "patch_attn": patch_attn, "word_attn": word_attn, "slot_mask": slot_mask}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():               # MGCA re-normalises the prototype rows before every step
            self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))
        return mgca_loss(self.prototypes, self.encode(batch), self.method)


def quantile_clipped_weights(x: torch.Tensor, mask: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Each row clipped to its own torch.quantile over ``mask`` and normalised to sum 1 (no gradient). [b, n]"""
    x = x.detach()
    rows = []
    for xi, mi in zip(x, mask):
        if not bool(mi.any()):
            rows.append(torch.zeros_like(xi))
            continue
        v = xi[mi]
        w = torch.where(mi, xi.clip(torch.quantile(v, lo), torch.quantile(v, hi)), 0.0)
        total = w.sum()
        rows.append(w / total if total > 0 else w)
    return torch.stack(rows)


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV/MGCA Sinkhorn-Knopp codes [b, k] of scores [b, k] (no gradient), as common.sinkhorn."""
    s = scores.detach().float()
    b, k = s.shape
    q = torch.exp(s.T / epsilon - (s.T / epsilon).max())
    q = q / q.sum()
    safe = lambda num, den: num / torch.where(den > 0, den, torch.ones_like(den))
    for _ in range(iterations):
        q = q * safe(q.new_tensor(1.0 / k), q.sum(dim=1, keepdim=True))
        q = q * safe(q.new_tensor(1.0 / b), q.sum(dim=0, keepdim=True))
    return safe(q, q.sum(dim=0, keepdim=True)).T


def _diag_ce(logits: torch.Tensor, col_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row CE with the diagonal as target over [..., n, n]; ``col_mask`` [..., n] drops other columns."""
    n = logits.shape[-1]
    if col_mask is not None:
        keep = col_mask[..., None, :] | torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = torch.where(keep, logits, logits.new_tensor(NEG_INF))
    return -torch.diagonal(F.log_softmax(logits, dim=-1), dim1=-2, dim2=-1)


def _pair_ce(queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, tau: float):
    """Both directions of MGCA's weighted token contrast within each pair: (L_1, L_2)."""
    z = torch.einsum("bnd,bmd->bnm", queries, keys) / tau
    b = queries.shape[0]
    return (weights * _diag_ce(z)).sum() / b, (weights * _diag_ce(z.transpose(-1, -2))).sum() / b


def mgca_loss(prototypes: torch.Tensor, out: dict[str, torch.Tensor], mc) -> tuple[torch.Tensor, dict]:
    """Port of ``medvlp_jax.methods.mgca.mgca_loss`` (faithful defaults, every sample valid).

    Args:
      prototypes: [K, d] (already row-normalised).
      out: img_emb/txt_emb [b, d], patch_emb [b, p, d], word_emb [b, t, d], patch_attn [b, p],
        word_attn [b, t], slot_mask [b, t] bool.
      mc: ``config.method`` (temperature, local_temperature, proto_temperature, epsilon, sinkhorn_iterations,
        weight_quantiles, lambda_ita/cta/cpa, bidirectional, ita_reduce, patch_context_norm).
    Returns:
      (loss [], terms {"ita", "cta", "cpa"}).
    """
    img, txt = out["img_emb"], out["txt_emb"]
    tau, tau_l = mc.temperature, mc.local_temperature
    lo, hi = tuple(mc.weight_quantiles)
    logits = img @ txt.T / tau
    i2t, t2i = _diag_ce(logits).mean(), _diag_ce(logits.T).mean()
    l_ita = i2t + t2i if _get(mc, "ita_reduce", "sum") == "sum" else 0.5 * (i2t + t2i)

    words, patches = out["word_emb"][:, 1:], out["patch_emb"]
    attn = torch.softmax(torch.einsum("btd,bpd->btp", words, patches) / tau_l, dim=-1)
    ctx = F.normalize(torch.einsum("btp,bpd->btd", attn, patches), dim=-1, eps=1e-12)
    omega = quantile_clipped_weights(out["word_attn"][:, 1:], out["word_attn"][:, 1:] != 0, lo, hi)
    lw1, lw2 = _pair_ce(words, ctx, omega, tau_l)
    l_cta = 0.5 * (lw1 + lw2)
    if _get(mc, "bidirectional", True):
        keys = out["slot_mask"][:, 1:]
        logits_p = torch.einsum("bpd,btd->bpt", patches, words) / tau_l
        attn_p = torch.softmax(torch.where(keys[:, None, :], logits_p, logits_p.new_tensor(NEG_INF)), dim=-1)
        ctx_p = torch.einsum("bpt,btd->bpd", attn_p, words)
        if _get(mc, "patch_context_norm", "auto") == "always":
            ctx_p = F.normalize(ctx_p, dim=-1, eps=1e-12)
        pi = quantile_clipped_weights(out["patch_attn"], torch.ones_like(out["patch_attn"], dtype=torch.bool),
                                      lo, hi)
        lp1, lp2 = _pair_ce(patches, ctx_p, pi, tau_l)
        l_cta = l_cta + 0.5 * (lp1 + lp2)

    s_img, s_txt = img @ prototypes.T, txt @ prototypes.T
    q_img = sinkhorn(s_img, mc.epsilon, mc.sinkhorn_iterations)
    q_txt = sinkhorn(s_txt, mc.epsilon, mc.sinkhorn_iterations)
    logp_img = F.log_softmax(s_img / mc.proto_temperature, dim=-1)
    logp_txt = F.log_softmax(s_txt / mc.proto_temperature, dim=-1)
    l_cpa = 0.5 * ((-(q_img * logp_txt).sum(-1)).mean() + (-(q_txt * logp_img).sum(-1)).mean())
    total = mc.lambda_ita * l_ita + mc.lambda_cta * l_cta + mc.lambda_cpa * l_cpa
    return total, {"ita": l_ita, "cta": l_cta, "cpa": l_cpa}


def make_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """torch.optim.AdamW with the config's lr, betas and weight decay (no clipping: compare with clip_norm=0)."""
    return torch.optim.AdamW(model.parameters(), lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2),
                             weight_decay=optim_cfg.weight_decay, eps=1e-8)


def train_step(model: TorchMgca, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """Forward, backward and AdamW update (dropout and BatchNorm in training mode); the loss value."""
    model.train()
    opt.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=model.autocast_dtype or torch.float32,
                        enabled=model.autocast_dtype is not None):
        loss, _ = model(batch)
    loss.backward()
    opt.step()
    return float(loss.detach())


def to_torch(batch: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The synthetic numpy batch (data.example_batch.example_batch_for) as torch tensors (int64 ids) on
    ``device``."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v.copy())
        out[k] = (t.long() if k in ("input_ids", "attention_mask", "word_ids") else t).to(device)
    return out


def default_device() -> str:
    """"cuda" when PyTorch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"
