"""SISTA: Semantic-aware Instance and Sparse Token Alignments (arXiv 2601.08165; methods.md section 5).

What the abstract fixes [P]: two modules, SIA (image-report contrastive learning that uses inter-report
similarity to eliminate false negatives) and STA (alignment of image patches with the relevant word
tokens through a sparse patch-word correspondence). **Everything else below is reconstructed [I]**
(methods.md section 5.2; no paper body or code was readable) and every reconstructed choice is a config
field:

SIA (global, across the batch). With S_ij = <i_i, r_j> / tau_g and the report-report similarity
sigma_ij = <sg(z_i), sg(z_j)>:

    F_ij = 1[i != j and sigma_ij >= theta]          (0 for every pair before the warm-up ends)
    "eliminate":     L = mean_i -log( e^S_ii / sum_j (1 - F_ij) e^S_ij ) + (same over columns)
    "soft_positive": y_ij ∝ 1[i = j] + F_ij sigma_ij (row-normalised), L = -sum_j y_ij log softmax_j S_i:
                     + (same over columns)

STA (within each pair, tau_s): s_tk = <w_t, p_k> over valid words t (not [CLS]/[SEP]/[PAD]);
min-max over patches; keep entries >= 1/P (or the word's top-kappa patches); alpha_tk = kept / sum kept;
c_t = normalise(sum_k alpha_tk p_k);

    L_STA = 1/(2B) sum_b sum_{t in T_b} omega_bt [ CE(<c_t, w_:>/tau_s, t) + CE(<w_t, c_:>/tau_s, t) ]

with omega = 1/|T_b| (default) or MGCA word weights (switch). That is the "word_to_patch" direction (words
select patches, SPARC's). "patch_to_word" reverses the roles, within each pair: s_kt = <p_k, w_t> over the
valid words; min-max over those words; keep entries >= 1/|T_b| (or the patch's top-kappa words);
beta_kt = kept / sum kept (a patch that keeps no word takes its best-matching one);
e_k = normalise(sum_t beta_kt w_t) (the patch's language group);

    L_STA = 1/(2B) sum_b 1/P sum_k [ CE(<e_k, p_:>/tau_s, k) + CE(<p_k, e_:>/tau_s, k) ]

(0 for a pair without valid words). "both" averages the two: (L_w2p + L_p2w) / 2.
Total L = lambda_sia L_SIA + lambda_sta L_STA.

Config (``config.method``), reconstructed choices marked [I]:
  temperature: tau_g of SIA (0.07).
  sia_variant [I]: "eliminate" (default) or "soft_positive".
  sia_similarity [I]: "report_emb" (stop-grad own report embedding, default), "batch_emb" (a frozen
      sentence-encoder embedding precomputed offline, batch[sia_similarity_key], [b, e]; L2-normalised
      here) or "label_jaccard" (Jaccard of binary labels batch[sia_similarity_key], [b, c]; two empty
      label sets count as identical, similarity 1).
  sia_similarity_key: batch key for the two batch-based sources (None -> "report_sim_emb" / "labels").
  fn_threshold [I]: theta (0.9). On near-template reports every pair can pass it: SIA then has no negative
      left, is exactly 0 and trains nothing (the blob world of issue 10: ``sia/false_negative_fraction``
      reaches 1.0 within 150 steps of the warm-up). The train loop warns when a log interval's fraction
      reaches 0.99 (``check_metrics``); raise theta or use a fixed similarity source on such data.
  sia_warmup_epochs [I]: no false-negative handling before this many epochs (1.0).
  sia_reduce_directions: "sum" (the equation above, MGCA's ITA convention) or "mean".
  sta_temperature [I]: tau_s (0.1).
  sta_direction [I]: "word_to_patch" (default: words select their patches, SPARC's grouping) |
      "patch_to_word" (patches select their words) | "both". Kept at "word_to_patch" although the abstract
      says STA "align[s] image patches with relevant word tokens", which reads patch-to-word: the clause
      names the two sides without saying which one selects, and methods.md 5.2 specifies word queries.
  sta_sparsify [I]: "threshold" (default) or "topk" (both on min-max scores), or "softmax" (word_to_patch:
      alpha_tk = softmax_k(s_tk / sta_temperature), MGCA's attention; not sparse). Min-max grouping gives the
      patch least similar to a word exactly weight 0 and no gradient: in the blob world of issue 10 the blobs
      settle there and stay; the softmax has no such dead end, yet is cold on the blobs too
      (docs/demo_results.md, "Localization in the blob world").
  sta_threshold [I]: kept if min-max score >= this; None -> 1/P (word side) and 1/|T_b| (patch side).
  sta_topk [I]: kappa for "topk" (16), for both directions.
  sta_word_weights [I]: "uniform" (1/|T_b|) or "mgca" (quantile-clipped [CLS] attention).
  sta_negatives [I]: "pair" (default: the softmaxes above run over the words / groups of the same pair, as
      SPARC's) | "batch" (word_to_patch direction: every valid word and group of every valid pair of the
      batch competes, computed over chunks of ``sta_chunk`` pairs; O(b^2 t^2 d) FLOPs). Within a pair any
      one-to-one assignment of words to patches satisfies STA, so from randomly initialised encoders the
      groups need not follow the image content; cross-pair negatives require it (measured in the blob world:
      the maps stay cold with either, docs/demo_results.md).
  sta_chunk: pairs per chunk of the "batch" negatives (16; None = one block).
  word_weight_quantiles: (0.1, 0.9), MGCA's clipping quantiles.
  lambda_sia, lambda_sta [I]: loss weights (1.0, 1.0).

Padding rows of the batch (``batch["valid"]`` False) neither count nor act as negatives; padding and
special text slots are never queries, keys or negatives in STA.

Cost (b batch, t text slots, p patches, d width): SIA O(b^2 d) FLOPs, O(b^2) memory; STA per pair:
s and alpha O(b t p d) FLOPs / O(b t p) memory, word-word logits O(b t^2 d) FLOPs / O(b t^2) memory;
"patch_to_word": beta O(b t p d) / O(b t p), patch-patch logits O(b p^2 d) FLOPs / O(b p^2) memory.
No [b, b, t, p] tensor exists.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from medvlp_jax.methods import OBJECTIVES, Objective, common, local_ops
from medvlp_jax.types import Array, Batch, EncoderOutputs, LossContext


@dataclasses.dataclass(frozen=True)
class SistaConfig:
    """Resolved ``config.method`` of SISTA (see the module docstring for each field)."""
    temperature: float = 0.07
    sia_variant: str = "eliminate"
    sia_similarity: str = "report_emb"
    sia_similarity_key: Optional[str] = None
    fn_threshold: float = 0.9
    sia_warmup_epochs: float = 1.0
    sia_reduce_directions: str = "sum"
    sta_temperature: float = 0.1
    sta_direction: str = "word_to_patch"
    sta_sparsify: str = "threshold"
    sta_threshold: Optional[float] = None
    sta_topk: int = 16
    sta_word_weights: str = "uniform"
    sta_negatives: str = "pair"
    sta_chunk: Optional[int] = 16
    word_weight_quantiles: tuple[float, float] = (0.1, 0.9)
    lambda_sia: float = 1.0
    lambda_sta: float = 1.0

    def __post_init__(self):
        _check_choice("sia_variant", self.sia_variant, ("eliminate", "soft_positive"))
        _check_choice("sia_similarity", self.sia_similarity, ("report_emb", "batch_emb", "label_jaccard"))
        _check_choice("sia_reduce_directions", self.sia_reduce_directions, ("sum", "mean"))
        _check_choice("sta_direction", self.sta_direction, ("word_to_patch", "patch_to_word", "both"))
        _check_choice("sta_sparsify", self.sta_sparsify, ("threshold", "topk", "softmax"))
        if self.sta_sparsify == "softmax" and self.sta_direction != "word_to_patch":
            raise ValueError("SISTA sta_sparsify='softmax' is defined for sta_direction='word_to_patch' only")
        _check_choice("sta_word_weights", self.sta_word_weights, ("uniform", "mgca"))
        _check_choice("sta_negatives", self.sta_negatives, ("pair", "batch"))


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"SISTA {name} must be one of {allowed}, got {value!r}")


def report_similarity(out: EncoderOutputs, batch: Batch, cfg: SistaConfig) -> Array:
    """sigma: [b, b] stop-gradient report-report similarity from the configured source."""
    if cfg.sia_similarity == "report_emb":
        z = common.l2_normalize(local_ops.wide(out.txt_emb))
        sim = z @ z.T
    elif cfg.sia_similarity == "batch_emb":
        z = common.l2_normalize(jnp.asarray(batch[cfg.sia_similarity_key or "report_sim_emb"], jnp.float32))
        sim = z @ z.T
    else:  # label_jaccard
        y = (jnp.asarray(batch[cfg.sia_similarity_key or "labels"]) > 0).astype(jnp.float32)   # [b, c]
        inter = y @ y.T
        union = y.sum(-1)[:, None] + y.sum(-1)[None, :] - inter
        sim = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
    return jax.lax.stop_gradient(sim)


def false_negative_mask(sim: Array, valid: Array, threshold: float, active: Array) -> Array:
    """F: [b, b] bool, off-diagonal valid pairs whose reports are similar enough; all False if not active.

    Args:
      sim: [b, b] report similarity; valid: [b] bool; active: [] bool (after the warm-up).
    """
    b = sim.shape[0]
    pair_valid = valid[:, None] & valid[None, :]
    return (sim >= threshold) & ~jnp.eye(b, dtype=bool) & pair_valid & active


def sia_loss(img_emb: Array, txt_emb: Array, sim: Array, fn_mask: Array, valid: Array,
             cfg: SistaConfig) -> tuple[Array, Array, Array]:
    """Semantics-aware instance alignment.

    Args:
      img_emb: [b, d], txt_emb: [b, d] L2-normalised; sim: [b, b] stop-grad report similarity;
      fn_mask: [b, b] bool false negatives; valid: [b] bool.
    Returns:
      (loss [], i2t [], t2i []).
    """
    b = img_emb.shape[0]
    logits = jnp.einsum("id,jd->ij", img_emb, txt_emb) / cfg.temperature       # [b, b] image x report
    eye = jnp.eye(b, dtype=bool)
    pair_valid = (valid[:, None] & valid[None, :]) | eye
    if cfg.sia_variant == "eliminate":
        keep = pair_valid & ~fn_mask
        masked = jnp.where(keep, logits, common.NEG_INF)
        i2t = -jnp.diagonal(jax.nn.log_softmax(masked, axis=1))
        t2i = -jnp.diagonal(jax.nn.log_softmax(masked, axis=0))
    else:
        target = eye.astype(jnp.float32) + fn_mask * jnp.maximum(sim, 0.0)     # [b, b], symmetric
        masked = jnp.where(pair_valid, logits, common.NEG_INF)
        y_row = target / jnp.sum(target, axis=1, keepdims=True)
        y_col = target / jnp.sum(target, axis=0, keepdims=True)
        i2t = -jnp.sum(y_row * jax.nn.log_softmax(masked, axis=1), axis=1)
        t2i = -jnp.sum(y_col * jax.nn.log_softmax(masked, axis=0), axis=0)
    i2t = common.masked_mean(i2t, valid)
    t2i = common.masked_mean(t2i, valid)
    total = i2t + t2i if cfg.sia_reduce_directions == "sum" else 0.5 * (i2t + t2i)
    return total, i2t, t2i


def sta_weights(word_emb: Array, patch_emb: Array, cfg: SistaConfig) -> Array:
    """Sparse word->patch grouping weights alpha.

    Args:
      word_emb: [b, t, d], patch_emb: [b, p, d], L2-normalised.
    Returns:
      [b, t, p], each row sums to 1 (0 only if all of a word's patch scores are equal).
    """
    p = patch_emb.shape[1]
    s = jnp.einsum("btd,bpd->btp", word_emb, patch_emb)
    if cfg.sta_sparsify == "softmax":
        return jax.nn.softmax(s / cfg.sta_temperature, axis=-1)
    s = local_ops.masked_minmax(s, None, axis=-1)
    if cfg.sta_sparsify == "topk":
        keep = local_ops.topk_mask(s, cfg.sta_topk)
    else:
        threshold = 1.0 / p if cfg.sta_threshold is None else cfg.sta_threshold
        keep = s >= threshold
    s = jnp.where(keep, s, 0.0)
    return s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-12)


def sta_patch_weights(patch_emb: Array, word_emb: Array, word_mask: Array, cfg: SistaConfig) -> Array:
    """Sparse patch->word grouping weights beta ("patch_to_word").

    Args:
      patch_emb: [b, p, d], word_emb: [b, t, d], L2-normalised; word_mask: [b, t] bool valid words.
    Returns:
      [b, p, t], 0 outside the valid words; each row sums to 1 (0 for a pair without valid words). A row
      that keeps nothing (one valid word, whose min-max score is 0; or a threshold above 1) falls back to
      its best-matching valid word.
    """
    raw = jnp.einsum("bpd,btd->bpt", patch_emb, word_emb)
    keys = jnp.broadcast_to(word_mask[:, None, :], raw.shape)
    s = local_ops.masked_minmax(raw, keys, axis=-1)
    if cfg.sta_sparsify == "topk":
        keep = local_ops.topk_mask(s, cfg.sta_topk, keys)
    else:
        n_words = jnp.maximum(jnp.sum(word_mask, axis=-1), 1).astype(s.dtype)[:, None, None]
        threshold = 1.0 / n_words if cfg.sta_threshold is None else cfg.sta_threshold
        keep = keys & (s >= threshold)
    s = jnp.where(keep, s, 0.0)
    total = jnp.sum(s, axis=-1, keepdims=True)
    best = jax.nn.one_hot(jnp.argmax(jnp.where(keys, raw, -jnp.inf), axis=-1), raw.shape[-1], dtype=s.dtype)
    return jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), jnp.where(keys, best, 0.0))


def sta_loss(out: EncoderOutputs, valid: Array, cfg: SistaConfig) -> tuple[Array, Array]:
    """Sparse token-level alignment (within each pair), in the configured direction(s).

    Args:
      out: word_emb [b, t, d], patch_emb [b, p, d], word_mask [b, t], word_attn [b, t].
      valid: [b] bool batch rows.
    Returns:
      (loss [], map [b, t, p]): alpha (word -> patch weights) for "word_to_patch" and "both", beta
      transposed (the weight each patch gives the word) for "patch_to_word".
    """
    word = local_ops.wide(out.word_emb)
    patch = local_ops.wide(out.patch_emb)
    mask = out.word_mask
    if cfg.sta_direction == "word_to_patch":
        return _sta_word_to_patch(out, word, patch, valid, cfg)
    per_pair_p, beta = _sta_patch_to_word_per_pair(word, patch, mask, cfg)
    l_p2w = common.masked_mean(per_pair_p, valid)
    if cfg.sta_direction == "patch_to_word":
        return l_p2w, jnp.swapaxes(beta, 1, 2)
    l_w2p, alpha = _sta_word_to_patch(out, word, patch, valid, cfg)
    return 0.5 * (l_w2p + l_p2w), alpha


def _sta_patch_to_word_per_pair(word: Array, patch: Array, mask: Array, cfg: SistaConfig) -> tuple[Array, Array]:
    """([b] patch->word loss per pair, 0 without valid words; beta [b, p, t])."""
    beta = sta_patch_weights(patch, word, mask, cfg)
    e = local_ops.group_vectors(beta, word)                                      # [b, p, d]
    z = jnp.einsum("bkd,bld->bkl", e, patch) / cfg.sta_temperature              # [b, p (group), p (patch)]
    every = jnp.ones(z.shape[:2], bool)
    ce = common.diag_ce(z, every) + common.diag_ce(jnp.swapaxes(z, 1, 2), every)   # [b, p]
    per_pair = 0.5 * jnp.mean(ce, axis=-1)
    return jnp.where(jnp.any(mask, axis=-1), per_pair, 0.0), beta


def _sta_word_to_patch(out: EncoderOutputs, word: Array, patch: Array, valid: Array,
                       cfg: SistaConfig) -> tuple[Array, Array]:
    """(word->patch loss [], alpha [b, t, p]): the equation of the module docstring."""
    mask = out.word_mask
    alpha = sta_weights(word, patch, cfg)
    c = local_ops.group_vectors(alpha, patch)                                    # [b, t, d]
    if cfg.sta_negatives == "batch":
        # Every valid word of every valid pair competes: a group must match its own word better than the
        # same word of another report (whose group lies in another image), so the grouping must follow the
        # image content; within a pair, any one-to-one word->patch assignment already wins (the demo and
        # the blob world of issue 10 show it).
        b, t, d = c.shape
        keys = (mask & valid[:, None]).reshape(-1)
        rows = None if cfg.sta_chunk is None else cfg.sta_chunk * t
        ce_group = common.chunked_diag_ce(c.reshape(b * t, d), word.reshape(b * t, d), keys,
                                          cfg.sta_temperature, rows).reshape(b, t)
        ce_word = common.chunked_diag_ce(word.reshape(b * t, d), c.reshape(b * t, d), keys,
                                         cfg.sta_temperature, rows).reshape(b, t)
    else:
        z = jnp.einsum("btd,bsd->bts", c, word) / cfg.sta_temperature           # [b, t (group), s (word)]
        ce_group = common.diag_ce(z, mask)                                   # c_t against words
        ce_word = common.diag_ce(jnp.swapaxes(z, 1, 2), mask)                # w_t against groups
    if cfg.sta_word_weights == "mgca":
        omega = common.quantile_clipped_weights(out.word_attn, mask, *cfg.word_weight_quantiles)
    else:
        omega = local_ops.uniform_word_weights(mask)
    omega = jnp.where(mask, omega, 0.0)
    per_pair = 0.5 * jnp.sum(omega * (ce_group + ce_word), axis=-1)              # [b]
    return common.masked_mean(per_pair, valid), alpha


# check_metrics warns when the logged false-negative fraction of an interval reaches this.
SIA_COLLAPSE_FRACTION = 0.99


@OBJECTIVES.register("sista")
def make(cfg, *, steps_per_epoch: int) -> Objective:
    """SISTA objective; see the module docstring for the config fields."""
    settings = local_ops.read_config(SistaConfig, cfg)
    warmup_steps = local_ops.epochs_to_steps(settings.sia_warmup_epochs, steps_per_epoch)

    def init(rng, out):
        del rng, out
        return {}

    def loss(method_params, out: EncoderOutputs, batch: Batch, ctx: LossContext):
        del method_params
        b = out.img_emb.shape[0]
        valid = batch.get("valid", jnp.ones((b,), bool))
        active = jnp.asarray(ctx.step) >= warmup_steps
        sim = report_similarity(out, batch, settings)
        fn = false_negative_mask(sim, valid, settings.fn_threshold, active)
        l_sia, i2t, t2i = sia_loss(local_ops.wide(out.img_emb), local_ops.wide(out.txt_emb),
                                   sim, fn, valid, settings)
        l_sta, _ = sta_loss(out, valid, settings)
        total = settings.lambda_sia * l_sia + settings.lambda_sta * l_sta
        n_neg = jnp.maximum(jnp.sum(valid) * (jnp.sum(valid) - 1), 1)
        return total, {
            "loss/sia": l_sia, "loss/sta": l_sta, "loss/i2t": i2t, "loss/t2i": t2i,
            "sia/false_negative_fraction": jnp.sum(fn) / n_neg,
            "sia/active": active.astype(jnp.float32),
        }

    def similarity_maps(method_params, out: EncoderOutputs) -> Array:
        """[b, t, p] sparse STA weights: alpha (word -> patches), or for "patch_to_word" beta transposed
        (the weight each patch gives the word); rows of non-word slots are 0."""
        del method_params
        word, patch = local_ops.wide(out.word_emb), local_ops.wide(out.patch_emb)
        if settings.sta_direction == "patch_to_word":
            maps = jnp.swapaxes(sta_patch_weights(patch, word, out.word_mask, settings), 1, 2)
        else:
            maps = sta_weights(word, patch, settings)
        return jnp.where(out.word_mask[..., None], maps, 0.0)

    def check_metrics(metrics: dict[str, float]) -> dict[str, str]:
        """Warns when, over a whole log interval after the warm-up, (almost) every negative pair of the batch
        was eliminated as a false negative: SIA then has nothing to contrast and gives no gradient."""
        fraction = metrics.get("sia/false_negative_fraction", 0.0)
        if settings.lambda_sia and metrics.get("sia/active", 0.0) >= 1.0 and fraction >= SIA_COLLAPSE_FRACTION:
            return {"sia_no_negatives": (
                f"SISTA: {fraction:.1%} of the batch's negative pairs pass fn_threshold={settings.fn_threshold} "
                f"({settings.sia_similarity} similarity) and are removed as false negatives, so SIA has "
                f"(almost) no negatives left and no gradient (loss/sia {metrics.get('loss/sia', float('nan')):.3g});"
                f" the report embeddings may have collapsed onto each other. Raise method.fn_threshold or use a "
                f"fixed similarity source (method.sia_similarity='batch_emb' or 'label_jaccard')")}
        return {}

    return Objective(name="sista", init=init, loss=loss, similarity_maps=similarity_maps,
                     check_metrics=check_metrics)
