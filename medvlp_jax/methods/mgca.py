"""MGCA: Multi-Granularity Cross-modal Alignment (Wang et al., NeurIPS 2022; methods.md section 4).

Reproduces the loss arithmetic of the authors' code (``mgca/models/mgca/mgca_module.py`` at
HKU-MedAI/MGCA @ 680fe4a: ITA L101-109, CTA L119-227, CPA L229-262, Sinkhorn L266-318, freeze L340).
Inputs are L2-normalised: i = ``img_emb`` [b, d], r = ``txt_emb`` [b, d], p = ``patch_emb`` [b, P, d],
w = ``word_emb[:, 1:]`` [b, W, d] (slot 0 is [CLS]; MGCA's word slots are 1..t-1, so W = t - 1 and
[SEP] is a word slot), a = ``word_attn[:, 1:]``, alpha = ``patch_attn`` (None for CNNs).

ITA (tau_g):   S_ij = <i_i, r_j> / tau_g;   L_ITA = mean_i CE(S_i:, i) + mean_j CE(S_:j, j)   (SUM of directions)
CTA word side (tau_l), per pair b:
    A_btk = softmax_k(<w_bt, p_bk> / tau_l),   o_bt = normalise(sum_k A_btk p_bk)
    Z^w_bts = <w_bt, o_bs> / tau_l                                                         [b, W, W]
    omega_b = a_b's non-zero entries clipped to their own 10%/90% quantiles (torch linear interpolation),
              zeros kept, normalised to sum 1 (stop-grad)
    L_w1 = 1/B sum_bt omega_bt CE(Z^w_bt:, t),   L_w2 = 1/B sum_bs omega_bs CE(Z^w_b:s, s)
CTA patch side:
    B_bkt = softmax_{t not padding}(<p_bk, w_bt> / tau_l),   q_bk = sum_t B_bkt w_bt   (normalised for CNN only)
    Z^p_bkl = <p_bk, q_bl> / tau_l;  pi_b = alpha_b clipped to its own 10/90% quantiles, normalised (ViT),
              or 1/P (CNN);   L_p1, L_p2 as the word side with pi
    L_CTA = (L_w1 + L_w2) / 2 + (L_p1 + L_p2) / 2
CPA (prototypes C [K, d], rows re-normalised before every step by ``prepare_params``):
    s^I = i C^T, s^R = r C^T [b, K];  q^I, q^R = Sinkhorn(s / eps, 3 iterations) (float32, stop-grad)
    L_CPA = 1/2 [ -mean_b sum_k q^I_bk log softmax(s^R_b / tau_p)_k - mean_b sum_k q^R_bk log softmax(s^I_b / tau_p)_k ]
L = lambda_ita L_ITA + lambda_cta L_CTA + lambda_cpa L_CPA, all terms from step 0; the prototypes get no
update (no AdamW step, decay or moment update: ``trainable``) for the first
``freeze_prototypes_epochs * steps_per_epoch`` optimiser steps (quirk 8).

Config (``config.method``); defaults reproduce the authors' run:
  temperature: tau_g 0.07. local_temperature: tau_l 0.1. proto_temperature: tau_p 0.2.
  num_prototypes: K 500. epsilon: Sinkhorn eps 0.05. sinkhorn_iterations: 3.
  freeze_prototypes_epochs: 1 (may be fractional; rounded to whole steps).
  lambda_ita, lambda_cta, lambda_cpa: 1.0, 1.0, 1.0 (the CLI values; the class defaults 1/0.7/0.5 are unused).
  bidirectional: True (patch side of CTA on).
  weight_quantiles: (0.1, 0.9), the clipping quantiles of word and patch weights.
  patch_weights: "attention" (ViT CLS->patch attention, clipped; uniform when ``patch_attn`` is None) |
      "uniform".
  word_slots [quirk 3]: which word slots take part on the word side.
      "all" (default, authors): all W slots are negatives in both softmaxes of Z^w (padding and [SEP]
          included); omega over the non-zero entries of a; the patch side masks padding keys only.
      "occupied": padding slots are masked as negatives and keys, omega over words + [SEP].
      "words": [SEP] is masked too; omega over the real words only.
  patch_context_norm [quirk 4]: "auto" (default, authors: q normalised only for CNN encoders, i.e. when
      ``patch_attn`` is None) | "always".
  ita_reduce [quirk 5]: "sum" (default, authors: i2t + t2i, while every other term is a mean) | "mean"
      ((i2t + t2i) / 2).
  local_negatives [quirk 6]: "pair" (default, authors: CTA softmaxes within each pair) | "batch" (the
      tokens of every other pair of the batch are extra negatives: a row CE over all b*W (b*P) items of
      the batch, computed in chunks of ``local_chunk`` samples; our corrected form, not the paper's).
  local_chunk: samples per chunk of the "batch" local negatives (16; None = one block).
  ita_groups [quirk 7]: 1 (default: negatives over the whole global batch). n > 1 splits the batch into
      n contiguous blocks (the authors' per-GPU batches: 2 for 2 x 72) and takes ITA within each block,
      averaged over the blocks, as DDP does without all-gather. Sinkhorn stays global (the authors
      all-reduce it). BatchNorm statistics per device are the model's business, not this module's.

Encoder-level quirks are model-config switches, not here: 1 BERT without positions
(``model.text.use_position_ids``), 2 off-by-one word attention (``model.text.word_attn_shift = 1``) and
the lost last word and [SEP] of a report that fills all tokens (``model.text.full_length_tail = "drop"``,
set by configs/mgca.py; the dropped slots are padding here: zero attention, so no omega, and masked patch
keys), 9 the 6-layer BERT (``model.text.depth``). An [UNK] is an ordinary word slot, as in the authors'
aggregation (data/tokenizer.py); no switch, because that is not a defect. Quirk 8 is ``trainable``.
Padding rows of an eval batch (``batch["valid"]`` False) neither count nor act as negatives, and get no
Sinkhorn mass.

Cost (b batch, t = W text slots, p patches, d width, K prototypes): ITA O(b^2 d) FLOPs / O(b^2) memory;
word side 4 b t p d + 2 b t^2 d FLOPs, O(b (t p + t^2)) memory; patch side 4 b p t d + 2 b p^2 d FLOPs,
O(b (p t + p^2)) memory; CPA 4 b K d + O(iterations b K) FLOPs, O(b K) memory. No O(b^2) local tensor
("pair"). With local_negatives="batch": O(b^2 (t^2 + p^2) d) FLOPs and O(local_chunk * b (t^2 + p^2))
live memory.

``similarity_maps`` returns A (softmax over patches of <w, p> / tau_l) for every text slot: [b, t, p].
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from medvlp_jax.methods import OBJECTIVES, Objective, common, local_ops
from medvlp_jax.types import Array, Batch, EncoderOutputs, LossContext


@dataclasses.dataclass(frozen=True)
class MgcaConfig:
    """Resolved ``config.method`` of MGCA (see the module docstring for each field)."""
    temperature: float = 0.07
    local_temperature: float = 0.1
    proto_temperature: float = 0.2
    num_prototypes: int = 500
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0
    lambda_ita: float = 1.0
    lambda_cta: float = 1.0
    lambda_cpa: float = 1.0
    bidirectional: bool = True
    weight_quantiles: tuple[float, float] = (0.1, 0.9)
    patch_weights: str = "attention"
    word_slots: str = "all"
    patch_context_norm: str = "auto"
    ita_reduce: str = "sum"
    local_negatives: str = "pair"
    local_chunk: Optional[int] = 16
    ita_groups: int = 1

    def __post_init__(self):
        for name, allowed in (("patch_weights", ("attention", "uniform")),
                              ("word_slots", ("all", "occupied", "words")),
                              ("patch_context_norm", ("auto", "always")),
                              ("ita_reduce", ("sum", "mean")),
                              ("local_negatives", ("pair", "batch"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MGCA {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if int(self.ita_groups) < 1:
            raise ValueError(f"MGCA ita_groups must be >= 1, got {self.ita_groups!r}")
        if len(self.weight_quantiles) != 2:
            raise ValueError(f"MGCA weight_quantiles must be (lo, hi), got {self.weight_quantiles!r}")


def word_slot_masks(out: EncoderOutputs, word_slots: str) -> tuple[Optional[Array], Array, Array]:
    """Masks over MGCA's word slots 1..t-1.

    Args:
      out: EncoderOutputs (word_mask, slot_mask, word_attn [b, t]).
      word_slots: "all" | "occupied" | "words" (module docstring).
    Returns:
      negatives: [b, W] bool of slots that compete on the word side, or None (all compete);
      weight_support: [b, W] bool, the slots whose attention is clipped and normalised into omega;
      patch_keys: [b, W] bool, the keys of the patch-side attention.
    """
    occupied = out.slot_mask[:, 1:]
    if word_slots == "all":
        return None, out.word_attn[:, 1:] != 0, occupied
    mask = occupied if word_slots == "occupied" else out.word_mask[:, 1:]
    return mask, mask, mask


def word_weights(out: EncoderOutputs, support: Array, quantiles: tuple[float, float]) -> Array:
    """omega: [b, W], MGCA's clipped, normalised word attention (stop-grad)."""
    return common.quantile_clipped_weights(local_ops.wide(out.word_attn[:, 1:]), support, *quantiles)


def patch_weights(out: EncoderOutputs, mode: str, quantiles: tuple[float, float]) -> Array:
    """pi: [b, P]; ViT attention clipped to its own quantiles over all patches, or uniform."""
    b, p = out.patch_emb.shape[:2]
    if mode == "uniform" or out.patch_attn is None:
        return jnp.full((b, p), 1.0 / p, jnp.float32)
    return common.quantile_clipped_weights(local_ops.wide(out.patch_attn), jnp.ones((b, p), bool), *quantiles)


def word_to_patch_attention(word_emb: Array, patch_emb: Array, tau: float) -> Array:
    """A: [b, t, p] = softmax over patches of <w_bt, p_bk> / tau (no mask: MGCA's word side)."""
    return jax.nn.softmax(jnp.einsum("btd,bpd->btp", word_emb, patch_emb) / tau, axis=-1)


def _weighted_pair_ce(queries: Array, keys: Array, neg_mask: Optional[Array], weights: Array, valid: Array,
                      tau: float, negatives: str, chunk: Optional[int]) -> tuple[Array, Array]:
    """Both directions of a weighted token-level contrast: query n of pair b matches key n of pair b.

    Args:
      queries, keys: [b, n, d]; neg_mask: [b, n] bool or None (all compete); weights: [b, n];
      valid: [b] bool; tau: temperature; negatives: "pair" (within each pair) or "batch" (all pairs);
      chunk: samples per chunk ("batch").
    Returns:
      (L_1, L_2): sum over valid pairs and tokens of weight * CE, divided by the number of valid pairs;
      L_1 has rows <query, key_:>, L_2 rows <key, query_:> (the columns of the first).
    """
    b, n, d = queries.shape
    w = weights * valid[:, None].astype(weights.dtype)
    n_valid = jnp.maximum(jnp.sum(valid), 1).astype(queries.dtype)
    if negatives == "pair":
        z = jnp.einsum("bnd,bmd->bnm", queries, keys) / tau                   # [b, n, n]
        cols = jnp.ones((b, n), bool) if neg_mask is None else neg_mask
        ce1 = common.diag_ce(z, cols)
        ce2 = common.diag_ce(jnp.swapaxes(z, -1, -2), cols)
    else:
        key_mask = valid[:, None] if neg_mask is None else (neg_mask & valid[:, None])
        key_mask = jnp.broadcast_to(key_mask, (b, n)).reshape(-1)
        q, k = queries.reshape(b * n, d), keys.reshape(b * n, d)
        rows = None if chunk is None else chunk * n
        ce1 = common.chunked_diag_ce(q, k, key_mask, tau, rows).reshape(b, n)
        ce2 = common.chunked_diag_ce(k, q, key_mask, tau, rows).reshape(b, n)
    return jnp.sum(w * ce1) / n_valid, jnp.sum(w * ce2) / n_valid


def cta_word(out: EncoderOutputs, valid: Array, cfg: MgcaConfig) -> tuple[Array, Array]:
    """(L_w1, L_w2) of the word side."""
    words = local_ops.wide(out.word_emb[:, 1:])
    patches = local_ops.wide(out.patch_emb)
    negatives, support, _ = word_slot_masks(out, cfg.word_slots)
    attn = word_to_patch_attention(words, patches, cfg.local_temperature)      # [b, W, P]
    ctx = common.l2_normalize(jnp.einsum("btp,bpd->btd", attn, patches))
    omega = word_weights(out, support, cfg.weight_quantiles)
    return _weighted_pair_ce(words, ctx, negatives, omega, valid, cfg.local_temperature,
                             cfg.local_negatives, cfg.local_chunk)


def cta_patch(out: EncoderOutputs, valid: Array, cfg: MgcaConfig) -> tuple[Array, Array]:
    """(L_p1, L_p2) of the patch side."""
    words = local_ops.wide(out.word_emb[:, 1:])
    patches = local_ops.wide(out.patch_emb)
    _, _, keys = word_slot_masks(out, cfg.word_slots)
    logits = jnp.einsum("bpd,btd->bpt", patches, words) / cfg.local_temperature
    attn = jax.nn.softmax(jnp.where(keys[:, None, :], logits, common.NEG_INF), axis=-1)   # [b, P, W]
    ctx = jnp.einsum("bpt,btd->bpd", attn, words)
    if cfg.patch_context_norm == "always" or out.patch_attn is None:
        ctx = common.l2_normalize(ctx)
    pi = patch_weights(out, cfg.patch_weights, cfg.weight_quantiles)
    return _weighted_pair_ce(patches, ctx, None, pi, valid, cfg.local_temperature,
                             cfg.local_negatives, cfg.local_chunk)


def ita(out: EncoderOutputs, valid: Array, cfg: MgcaConfig) -> tuple[Array, Array, Array, Array]:
    """(L_ITA, i2t, t2i, global logits [b, b]); with ita_groups > 1, negatives within contiguous blocks."""
    img, txt = local_ops.wide(out.img_emb), local_ops.wide(out.txt_emb)
    b, g = img.shape[0], int(cfg.ita_groups)
    logits = img @ txt.T / cfg.temperature
    if b % g:
        raise ValueError(f"MGCA ita_groups={g} must divide the batch {b}")

    def block(x, y, v):
        _, i2t, t2i, _ = common.infonce(x, y, cfg.temperature, v)
        return i2t, t2i

    rs = lambda x: x.reshape((g, b // g) + x.shape[1:])
    i2t, t2i = jax.vmap(block)(rs(img), rs(txt), rs(valid))                     # [g]
    n = jnp.sum(rs(valid), axis=1).astype(img.dtype)
    i2t = jnp.sum(n * i2t) / jnp.maximum(jnp.sum(n), 1.0)
    t2i = jnp.sum(n * t2i) / jnp.maximum(jnp.sum(n), 1.0)
    total = i2t + t2i if cfg.ita_reduce == "sum" else 0.5 * (i2t + t2i)
    return total, i2t, t2i, logits


def cpa(prototypes: Array, out: EncoderOutputs, valid: Array, cfg: MgcaConfig) -> tuple[Array, Array, Array]:
    """(L_CPA, image->report term, report->image term). prototypes: [K, d], used as given."""
    img, txt = local_ops.wide(out.img_emb), local_ops.wide(out.txt_emb)
    protos = local_ops.wide(prototypes)
    s_img, s_txt = img @ protos.T, txt @ protos.T                              # [b, K]
    q_img = common.sinkhorn(s_img, cfg.epsilon, cfg.sinkhorn_iterations, valid).astype(s_img.dtype)
    q_txt = common.sinkhorn(s_txt, cfg.epsilon, cfg.sinkhorn_iterations, valid).astype(s_img.dtype)
    logp_img = jax.nn.log_softmax(s_img / cfg.proto_temperature, axis=-1)
    logp_txt = jax.nn.log_softmax(s_txt / cfg.proto_temperature, axis=-1)
    i2t = common.masked_mean(-jnp.sum(q_img * logp_txt, axis=-1), valid)
    t2i = common.masked_mean(-jnp.sum(q_txt * logp_img, axis=-1), valid)
    return 0.5 * (i2t + t2i), i2t, t2i


def mgca_loss(method_params, out: EncoderOutputs, valid: Array, cfg: MgcaConfig) -> tuple[Array, dict[str, Array]]:
    """The MGCA objective (module docstring). valid: [b] bool. Returns (loss [], metrics {name: []})."""
    l_ita, i2t, t2i, logits = ita(out, valid, cfg)
    lw1, lw2 = cta_word(out, valid, cfg)
    l_word = 0.5 * (lw1 + lw2)
    if cfg.bidirectional:
        lp1, lp2 = cta_patch(out, valid, cfg)
        l_patch = 0.5 * (lp1 + lp2)
    else:
        l_patch = jnp.zeros((), l_word.dtype)
    l_cta = l_word + l_patch
    l_cpa, cpa_i2t, cpa_t2i = cpa(method_params["prototypes"], out, valid, cfg)
    total = cfg.lambda_ita * l_ita + cfg.lambda_cta * l_cta + cfg.lambda_cpa * l_cpa
    return total, {
        "loss/ita": l_ita, "loss/ita_i2t": i2t, "loss/ita_t2i": t2i,
        "loss/cta": l_cta, "loss/cta_word": l_word, "loss/cta_patch": l_patch,
        "loss/cpa": l_cpa, "loss/cpa_i2t": cpa_i2t, "loss/cpa_t2i": cpa_t2i,
        "acc/i2t": common.retrieval_accuracy(logits, valid),
        "acc/t2i": common.retrieval_accuracy(logits.T, valid),
    }


def init_prototypes(rng: Array, num_prototypes: int, dim: int) -> Array:
    """[K, d] rows drawn as torch's Linear(d, K) default (U(-1/sqrt(d), 1/sqrt(d))), then L2-normalised."""
    bound = 1.0 / jnp.sqrt(dim)
    w = jax.random.uniform(rng, (num_prototypes, dim), jnp.float32, -bound, bound)
    return common.l2_normalize(w)


@OBJECTIVES.register("mgca")
def make(cfg, *, steps_per_epoch: int) -> Objective:
    settings = local_ops.read_config(MgcaConfig, cfg)
    freeze_steps = local_ops.epochs_to_steps(settings.freeze_prototypes_epochs, steps_per_epoch) or 0

    def init(rng, out: EncoderOutputs):
        return {"prototypes": init_prototypes(rng, settings.num_prototypes, out.img_emb.shape[-1])}

    def prepare_params(method_params):
        # MGCA overwrites the prototype rows with their normalised version before every forward, outside
        # the graph: the loss then differentiates w.r.t. the normalised array (methods.md 12.2).
        protos = jax.lax.stop_gradient(method_params["prototypes"])
        return dict(method_params, prototypes=common.l2_normalize(protos))

    def trainable(step):
        return {"prototypes": jnp.asarray(step) >= freeze_steps}

    def loss(method_params, out: EncoderOutputs, batch: Batch, ctx: LossContext):
        valid = batch.get("valid", jnp.ones(out.img_emb.shape[:1], bool))
        total, metrics = mgca_loss(method_params, out, valid, settings)
        metrics["prototypes/trainable"] = (jnp.asarray(ctx.step) >= freeze_steps).astype(jnp.float32)
        return total, metrics

    def similarity_maps(method_params, out: EncoderOutputs) -> Array:
        del method_params
        return word_to_patch_attention(local_ops.wide(out.word_emb), local_ops.wide(out.patch_emb),
                                       settings.local_temperature)

    def map_diagnostics(method_params, out: EncoderOutputs) -> dict[str, Array]:
        """Per pair: the largest patch weight of each word's attention, averaged over the words."""
        return {"word_map_peak_mass": common.word_map_peak_mass(similarity_maps(method_params, out),
                                                                out.word_mask)}

    return Objective(name="mgca", init=init, loss=loss, prepare_params=prepare_params, trainable=trainable,
                     similarity_maps=similarity_maps, map_diagnostics=map_diagnostics)
