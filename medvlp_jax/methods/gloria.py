"""GLoRIA: Global-Local Representations for Images using Attention (Huang et al., ICCV 2021; methods.md 3).

Reproduces the loss arithmetic of the authors' code (``gloria/loss/gloria_loss.py``,
``gloria/models/gloria_model.py`` at marshuang80/gloria @ 416466a). Text i has word vectors e_{i,t}
(``out.word_emb``, slot 0 = [CLS]), image j has region vectors v_{j,r} (``out.patch_emb``); for EVERY
text i and image j of the batch:

    a_{t,r}   = softmax_t( <v_{j,r}, e_{i,t}> )           over the words t of text i (first softmax; per region)
    beta_{t,r} = softmax_r( temp1 * a_{t,r} )                                   (second softmax; per word)
    c_t       = sum_r beta_{t,r} v_{j,r}
    R(i, j)   = log sum_t exp( temp2 * cos(e_{i,t}, c_t) )      (code; the paper has an extra 1/temp2)
    M_{j,i}   = temp3 * R(i, j)
    L_local   = 1/B sum_j CE(M_{j,:}, j) + 1/B sum_i CE(M_{:,i}, i)
    G_{j,i}   = temp3 * cos(g^I_j, g^T_i);   L_global = the same two CE terms on G
    L         = local_weight * L_local + global_weight * L_global           (four CE terms summed)

cos(x, y) = <x, y> / max(|x| |y|, 1e-8) (GLoRIA's clamp). g^I = ``out.img_emb``; g^T = the report vector
(``report_vector`` below). Nothing is L2-normalised here: the cosines are taken inside, and the first
softmax uses raw dot products, so the faithful model config sets ``model.proj.normalize = False``
(GLoRIA's embeddings are not normalised), ``proj.patch_kind = "linear"`` without bias (the 1x1 conv to
768), ``proj.image_kind = "linear"`` (2048 -> 768) and ``proj.word_kind = proj.text_kind = "identity"``
with ``text.sum_last_layers = 4`` and ``text.merge_word_pieces = True``. With normalised embeddings the
first softmax sees cosines instead of dot products (a different model, still a valid loss).

Config (``config.method``), defaults = the authors' arithmetic:
  temp1, temp2, temp3: 4.0, 5.0, 10.0 (attention sharpening, word aggregation, logit scale).
  attention [quirk]: "words_then_regions" (default, the authors' code: the two softmaxes above; the first,
      over the words, is AttnGAN's) | "regions" (the paper: beta_{t,r} = softmax_r(temp1 * <v_{j,r}, e_{i,t}>),
      one softmax over the regions). The first softmax bounds a_{t,r} to [0, 1], so temp1 * a spans at most
      4 nats: each word's map over the regions stays nearly flat. Yet in the blob world the authors' form
      localizes better (docs/demo_results.md, "Localization in the blob world": pointing game 0.60 vs 0.24);
      on the demo both are at or below chance (0.067 ± 0.091 vs 0.137 ± 0.061, three seeds).
      Used in the loss, the maps and GLoRIA's zero-shot scores (``gloria_zero_shot_scores``).
  local_weight, global_weight: 1.0, 1.0.
  local_agg: "sum" (log-sum-exp over words, the authors' default) | "mean" (log-mean-exp, their option).
      "sum" adds log(#words) to R, so at initialisation the longest report wins every image (the demo's
      image->text local CE starts at 7.1-7.6 against chance 4.16). On two demo seeds of three, training
      removes that bias within 100 steps by making [CLS] the winner of the first softmax at every region
      (``include_cls_word``). "mean" starts at chance and does not collapse on any of three demo seeds,
      but its maps are at chance there too (docs/demo_results.md, "Why [CLS] takes the first softmax").
  count_unk_words [quirk]: False (authors: the local term uses the first n_i = (#words whose string does
      not start with "[") + 1 slots, so an [UNK] word -- which keeps its own slot, data/tokenizer.py --
      is not counted yet occupies a column, and the LAST real word of the text is dropped, one per [UNK]);
      True (fixed) counts every word. The count comes from ``batch["bracket_words"]`` (data/tokenizer.py);
      a batch without that key counts no [UNK]. ``similarity_maps`` has no batch and uses every word.
  include_cls_word [quirk]: True (authors: [CLS] takes part as a word in the local term); False = fixed.
      On the demo it is what flattens the authors' maps on two seeds of three: trained, [CLS] takes >99% of
      the first softmax at every region, so each word's map is uniform (the grounding evaluator's
      ``attention/first_softmax_cls_share``, also logged in training; docs/demo_results.md, "Why GLoRIA's
      maps collapse"). [CLS] wins by direction, not norm, while training removes ``local_agg="sum"``'s
      word-count bias (above). False removes the collapse but the maps stay at chance there.
  include_sep_word [quirk]: False (authors: the first n_i = #words + 1 columns, so [SEP] is dropped);
      True adds [SEP] (the slot after the last word) to the local words.
  report_vector [quirk]: how g^T is formed.
      "mean_all_slots" (default, authors): sum of ``word_emb`` over ALL t slots divided by t, padding
          included (zero slots lower the norm; non-zero padding, e.g. after a biased word head, leaks in).
          Equals GLoRIA's sentence vector when the word head is the identity on un-normalised features.
      "mean_slots" (fixed): mean of ``word_emb`` over occupied slots ([CLS], words, [SEP]).
      "cls": ``out.txt_emb`` as the encoder gives it (e.g. a projected [CLS]).
  paper_local_scale [quirk]: False (code: no 1/temp2 in R); True uses the paper's (1/temp2) log sum exp.
  text_chunk: texts per chunk of the cross-sample local term (8); None = one block (materialises
      [b, b, t, p]; the reference the chunked form is tested against).

Padding rows of an eval batch (``batch["valid"]`` False) neither count nor act as negatives.

Cost (b batch, t text slots, p regions, d width): local term forward ~4 b^2 t p d FLOPs (dot products and
attended contexts; ~3x that with the backward, plus one forward recomputation from the checkpoint);
memory O(text_chunk * b * t * (p + d)) live per chunk, since ``lax.map`` + ``jax.checkpoint`` keep only
each chunk's inputs for the backward (O(b^2 t (p + d)) when ``text_chunk`` is None). Global term
O(b^2 d) FLOPs, O(b^2) memory.

Also here: ``similarity_maps`` (beta of the matching pairs, the attention maps GLoRIA plots and grounding
reads), ``gloria_zero_shot_scores`` (methods.md 3.4), a pure function, and the map diagnostics the grounding
evaluator (and the train loop, ``train.map_diagnostics``) reports as ``attention/*``:
``first_softmax_cls_share`` (how much of the first softmax [CLS] takes), ``first_softmax_top_share`` (how
much its largest slot takes, whichever it is), ``word_map_peak_mass`` (1/p when every
word's map is uniform) and ``cls_word_norm_ratio`` (|e_[CLS]| over the words' mean norm).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from medvlp_jax.methods import OBJECTIVES, Objective, common, local_ops
from medvlp_jax.types import Array, Batch, EncoderOutputs, LossContext

COS_EPS = 1e-8  # GLoRIA's cosine clamp


@dataclasses.dataclass(frozen=True)
class GloriaConfig:
    """Resolved ``config.method`` of GLoRIA (see the module docstring for each field)."""
    temp1: float = 4.0
    attention: str = "words_then_regions"
    temp2: float = 5.0
    temp3: float = 10.0
    local_weight: float = 1.0
    global_weight: float = 1.0
    local_agg: str = "sum"
    count_unk_words: bool = False
    include_cls_word: bool = True
    include_sep_word: bool = False
    report_vector: str = "mean_all_slots"
    paper_local_scale: bool = False
    text_chunk: Optional[int] = 8

    def __post_init__(self):
        for name, value, allowed in (("local_agg", self.local_agg, ("sum", "mean")),
                                     ("attention", self.attention, ("words_then_regions", "regions")),
                                     ("report_vector", self.report_vector, ("cls", "mean_all_slots", "mean_slots"))):
            if value not in allowed:
                raise ValueError(f"GLoRIA {name} must be one of {allowed}, got {value!r}")
        if self.text_chunk is not None and int(self.text_chunk) < 1:
            raise ValueError(f"GLoRIA text_chunk must be >= 1 or None, got {self.text_chunk!r}")


def uncounted_words(batch: Batch, b: int) -> Array:
    """[b] int32: words per text that GLoRIA's ``cap_lens`` does not count ([UNK]; data/tokenizer.py)."""
    bracket = batch.get("bracket_words")
    if bracket is None:
        return jnp.zeros((b,), jnp.int32)
    return jnp.sum(jnp.asarray(bracket) > 0, axis=-1).astype(jnp.int32)


def counted_words(word_mask: Array, n_uncounted: Array) -> Array:
    """The authors' words: the first (#words - n_uncounted) words of each text (the last ones are lost).

    Args:
      word_mask: [b, t] bool real words (an [UNK] slot included); n_uncounted: [b] int.
    Returns:
      [b, t] bool.
    """
    rank = jnp.cumsum(word_mask.astype(jnp.int32), axis=-1)                  # 1 for the first word, ...
    keep = jnp.sum(word_mask, axis=-1, keepdims=True) - n_uncounted[:, None]
    return word_mask & (rank <= keep)


def local_word_set(word_mask: Array, slot_mask: Array, include_cls: bool = True,
                   include_sep: bool = False) -> Array:
    """The slots that take part in the local term as words.

    Args:
      word_mask: [b, t] bool, real words; slot_mask: [b, t] bool, occupied slots (slot 0 = [CLS]; [SEP] is
        the occupied non-word slot after the words).
      include_cls: count [CLS] as a word (authors). include_sep: count [SEP] as a word.
    Returns:
      [b, t] bool.
    """
    idx = jnp.arange(word_mask.shape[-1])[None, :]
    words = word_mask
    if include_cls:
        words = words | (slot_mask & (idx == 0))
    if include_sep:
        words = words | (slot_mask & ~word_mask & (idx >= 1))
    return words


def words_used(out: EncoderOutputs, cfg: GloriaConfig, n_uncounted: Optional[Array] = None) -> Array:
    """The slots of the local term: ``local_word_set`` minus the words the authors do not count.

    Args:
      out: encoder outputs (word_mask, slot_mask [b, t]); cfg: settings;
      n_uncounted: [b] int [UNK] words per text (``uncounted_words``) or None (every word counts).
    Returns:
      [b, t] bool.
    """
    words = local_word_set(out.word_mask, out.slot_mask, cfg.include_cls_word, cfg.include_sep_word)
    if n_uncounted is None or cfg.count_unk_words:
        return words
    lost = out.word_mask & ~counted_words(out.word_mask, n_uncounted)          # the last real words
    return words & ~lost


def report_vector(word_emb: Array, slot_mask: Array, txt_emb: Array, mode: str = "mean_all_slots") -> Array:
    """The global text vector g^T.

    Args:
      word_emb: [b, t, d]; slot_mask: [b, t] bool; txt_emb: [b, d].
      mode: "mean_all_slots" (sum over all t slots / t, the authors'), "mean_slots" (mean over occupied
        slots) or "cls" (``txt_emb``).
    Returns:
      [b, d].
    """
    if mode == "cls":
        return txt_emb
    if mode == "mean_all_slots":
        return jnp.mean(word_emb, axis=1)
    if mode == "mean_slots":
        return common.masked_mean(word_emb, slot_mask[:, :, None], axis=1)
    raise ValueError(f"report_vector must be 'cls', 'mean_all_slots' or 'mean_slots', got {mode!r}")


def _two_softmaxes(dots: Array, word_set: Array, temp1, attention: str = "words_then_regions") -> Array:
    """beta from word-region dot products: softmax over words (axis -2), then over regions of temp1 * a
    (``attention="words_then_regions"``, the authors' code), or the paper's single softmax over regions of
    temp1 * dots (``"regions"``).

    Args:
      dots: [..., t, p] <v_r, e_t>; word_set: broadcastable to [..., t, 1] bool.
    Returns:
      beta: [..., t, p] (rows of words outside the set are meaningless; mask them downstream).
    """
    if attention == "regions":
        return jax.nn.softmax(temp1 * dots, axis=-1)
    a = jax.nn.softmax(jnp.where(word_set, dots, common.NEG_INF), axis=-2)
    return jax.nn.softmax(temp1 * a, axis=-1)


def _aggregate(s: Array, mask: Array, agg: str) -> Array:
    """Aggregates temp2 * cos over the words in ``mask`` (last axis): 'sum' -> log sum exp, 'mean' -> log
    mean exp, 'max' -> max."""
    if agg == "sum":
        return common.masked_logsumexp(s, mask, axis=-1)
    if agg == "mean":
        n = jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(s.dtype)
        return common.masked_logsumexp(s, mask, axis=-1) - jnp.log(n)
    if agg == "max":
        return jnp.max(jnp.where(mask, s, common.NEG_INF), axis=-1)
    raise ValueError(f"unknown aggregation {agg!r}")


def attention_maps(word_emb: Array, word_set: Array, patch_emb: Array, temp1: float = 4.0,
                   attention: str = "words_then_regions") -> Array:
    """beta for the matching pairs: each word's attention over its own image's regions.

    Args:
      word_emb: [b, t, d]; word_set: [b, t] bool (the words of the first softmax); patch_emb: [b, p, d].
      temp1: attention sharpening.
    Returns:
      [b, t, p], rows summing to 1 on ``word_set`` and 0 elsewhere.
    """
    word_emb, patch_emb = local_ops.wide(word_emb), local_ops.wide(patch_emb)
    dots = jnp.einsum("btd,bpd->btp", word_emb, patch_emb)
    beta = _two_softmaxes(dots, word_set[:, :, None], temp1, attention)
    return jnp.where(word_set[:, :, None], beta, 0.0)


def first_softmax_shares(word_emb: Array, word_set: Array, patch_emb: Array) -> dict[str, Array]:
    """How the authors' first softmax (over words, at each region) is shared, averaged over the p regions.

    Args:
      word_emb: [b, t, d]; word_set: [b, t] bool (the words of the first softmax); patch_emb: [b, p, d].
    Returns:
      {"first_softmax_cls_share": [b], the weight on slot 0 ([CLS]); 0 where slot 0 is not in ``word_set``.
         Near 1, every word's second-softmax map is uniform (temp1 times ~0 for all regions).
       "first_softmax_top_share": [b], the largest slot's weight, whichever slot (1/#words when uniform; near
         1, one slot takes every region and every other word's map is uniform); 0 for a text without words.}
    """
    word_emb, patch_emb = local_ops.wide(word_emb), local_ops.wide(patch_emb)
    dots = jnp.einsum("btd,bpd->btp", word_emb, patch_emb)
    a = jax.nn.softmax(jnp.where(word_set[:, :, None], dots, common.NEG_INF), axis=-2)   # [b, t, p]
    top = jnp.max(jnp.where(word_set[:, :, None], a, 0.0), axis=1)                       # [b, p]
    return {"first_softmax_cls_share": jnp.where(word_set[:, 0], jnp.mean(a[:, 0, :], axis=-1), 0.0),
            "first_softmax_top_share": jnp.where(jnp.any(word_set, axis=-1), jnp.mean(top, axis=-1), 0.0)}


def cls_word_norm_ratio(word_emb: Array, word_mask: Array, slot_mask: Array) -> Array:
    """|e_[CLS]| over the mean norm of the text's real words: whether [CLS] wins the first softmax by size.

    Args:
      word_emb: [b, t, d] (slot 0 = [CLS]); word_mask: [b, t] bool real words; slot_mask: [b, t] bool.
    Returns:
      [b]; 0 where a text has no word or no [CLS] slot.
    """
    norms = common.safe_norm(local_ops.wide(word_emb), axis=-1)                 # [b, t]
    word_norm = common.masked_mean(norms, word_mask, axis=-1)
    ok = slot_mask[:, 0] & jnp.any(word_mask, axis=-1) & (word_norm > 0)
    return jnp.where(ok, norms[:, 0] / jnp.where(ok, word_norm, 1.0), 0.0)


def _cross_block(words: Array, word_set: Array, regions: Array, temp1, temp2, agg: str,
                 attention: str = "words_then_regions") -> Array:
    """R for c texts against n images. words: [c, t, d]; word_set: [c, t]; regions: [n, p, d]. Returns [c, n]."""
    dots = jnp.einsum("ctd,npd->cntp", words, regions)                       # [c, n, t, p]
    beta = _two_softmaxes(dots, word_set[:, None, :, None], temp1, attention)
    ctx = jnp.einsum("cntp,npd->cntd", beta, regions)                        # [c, n, t, d]
    dot = jnp.einsum("ctd,cntd->cnt", words, ctx)
    norms = common.safe_norm(words, axis=-1)[:, None, :] * common.safe_norm(ctx, axis=-1)
    cos = dot / jnp.maximum(norms, COS_EPS)                                  # [c, n, t]
    return _aggregate(temp2 * cos, word_set[:, None, :], agg)


def local_similarity(word_emb: Array, word_set: Array, patch_emb: Array, *, temp1: float = 4.0,
                     temp2: float = 5.0, agg: str = "sum", text_chunk: Optional[int] = None,
                     attention: str = "words_then_regions") -> Array:
    """R(i, j) for every text i and image j, mapped over chunks of texts (never [m, n, t, p] when chunked).

    Args:
      word_emb: [m, t, d] text word vectors; word_set: [m, t] bool, the words of each text.
      patch_emb: [n, p, d] image region vectors.
      temp1, temp2: the two temperatures; agg: "sum" | "mean" | "max" (zero-shot).
      text_chunk: texts per chunk (None: one block).
      attention: "words_then_regions" (the authors' two softmaxes) | "regions" (the paper's one).
    Returns:
      [n, m]: row j = image j, column i = text i (GLoRIA's similarity-matrix layout).
    """
    word_emb, patch_emb = local_ops.wide(word_emb), local_ops.wide(patch_emb)
    body = lambda args: _cross_block(args[0], args[1], patch_emb, temp1, temp2, agg, attention)
    r = common.map_in_chunks(body, (word_emb, word_set), text_chunk)        # [m, n]
    return r.T


def cosine_matrix(x: Array, y: Array, eps: float = COS_EPS) -> Array:
    """[n, m] cosines of the rows of x [n, d] and y [m, d], with the product of norms clamped at eps."""
    x, y = local_ops.wide(x), local_ops.wide(y)
    dots = x @ y.T
    norms = common.safe_norm(x, axis=-1)[:, None] * common.safe_norm(y, axis=-1)[None, :]
    return dots / jnp.maximum(norms, eps)


def gloria_loss(out: EncoderOutputs, valid: Array, cfg: GloriaConfig,
                n_uncounted: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """The GLoRIA objective (module docstring).

    Args:
      out: encoder outputs; valid: [b] bool; cfg: settings.
      n_uncounted: [b] int, [UNK] words per text (``uncounted_words``); None or ``cfg.count_unk_words``:
        every word counts.
    Returns:
      (loss [], metrics {name: []}).
    """
    words = words_used(out, cfg, n_uncounted)
    r = local_similarity(out.word_emb, words, out.patch_emb, temp1=cfg.temp1, temp2=cfg.temp2,
                         agg=cfg.local_agg, text_chunk=cfg.text_chunk, attention=cfg.attention)   # [b_img, b_txt]
    if cfg.paper_local_scale:
        r = r / cfg.temp2
    local_logits = cfg.temp3 * r
    _, l_i2t, l_t2i = common.bidirectional_ce(local_logits, valid)
    g_txt = report_vector(local_ops.wide(out.word_emb), out.slot_mask, local_ops.wide(out.txt_emb), cfg.report_vector)
    global_logits = cfg.temp3 * cosine_matrix(out.img_emb, g_txt)
    _, g_i2t, g_t2i = common.bidirectional_ce(global_logits, valid)
    local, glob = l_i2t + l_t2i, g_i2t + g_t2i
    total = cfg.local_weight * local + cfg.global_weight * glob
    return total, {
        "loss/local": local, "loss/global": glob,
        "loss/local_i2t": l_i2t, "loss/local_t2i": l_t2i, "loss/global_i2t": g_i2t, "loss/global_t2i": g_t2i,
        "acc/i2t": common.retrieval_accuracy(global_logits, valid),
        "acc/t2i": common.retrieval_accuracy(global_logits.T, valid),
        "acc/local_i2t": common.retrieval_accuracy(local_logits, valid),
        "acc/local_t2i": common.retrieval_accuracy(local_logits.T, valid),
    }


def gloria_zero_shot_scores(img_emb: Array, patch_emb: Array, prompt_emb: Array, prompt_word_emb: Array,
                            prompt_word_set: Array, prompt_class: Array, num_classes: int, *,
                            temp1: float = 4.0, temp2: float = 5.0, text_chunk: Optional[int] = None,
                            normalize: bool = True, attention: str = "words_then_regions") -> Array:
    """GLoRIA zero-shot class scores (methods.md 3.4, ``gloria.zero_shot_classification``).

    For image j and prompt i: local = max_t temp2 * cos(e_{i,t}, c_t) (the attention as in training, with
    temp1 = 4 and the first softmax over the prompt's words), global = cos(g^I_j, g^T_i) (no temp3);
    score = (local + global) / 2. A class's score is the max over its prompts; each class column is then
    z-normalised over the images (mean, population std; skipped for a single image). Predict argmax.

    The authors' words are slots 1..n (no [CLS]): pass ``out.word_mask`` as ``prompt_word_set``. (Their
    ``process_text`` counts n in characters, so their slice also takes [SEP] and padding slots up to
    min(#characters, t - 1); build that mask to reproduce it.) ``prompt_emb`` is the prompt's report vector
    (``report_vector(..., "mean_all_slots")`` for GLoRIA).

    Args:
      img_emb: [n, d] global image vectors; patch_emb: [n, p, d] region vectors.
      prompt_emb: [m, d] prompt global vectors; prompt_word_emb: [m, t, d]; prompt_word_set: [m, t] bool.
      prompt_class: [m] int in [0, num_classes), the class of each prompt (every class needs one).
      num_classes: C (static).
      temp1, temp2: 4.0 and 5.0 (hard-coded by the authors). text_chunk: prompts per chunk.
      normalize: z-normalise each class column over the images.
      attention: the run's ``method.attention`` ("words_then_regions", the authors' two softmaxes, or
        "regions"), so a model is scored with the attention it was trained with.
    Returns:
      [n, C] scores.
    """
    local = local_similarity(prompt_word_emb, prompt_word_set, patch_emb, temp1=temp1, temp2=temp2,
                             agg="max", text_chunk=text_chunk, attention=attention)   # [n, m]
    glob = cosine_matrix(img_emb, prompt_emb)                               # [n, m]
    sim = (local + glob) / 2.0
    member = jnp.asarray(prompt_class)[:, None] == jnp.arange(num_classes)[None, :]   # [m, C]
    scores = jnp.max(jnp.where(member[None, :, :], sim[:, :, None], -jnp.inf), axis=1)  # [n, C]
    if normalize and scores.shape[0] > 1:
        mean = jnp.mean(scores, axis=0, keepdims=True)
        std = jnp.std(scores, axis=0, keepdims=True)
        scores = jnp.where(std > 0, (scores - mean) / jnp.where(std > 0, std, 1.0), 0.0)
    return scores


def zero_shot_scorer(*, report_vector_mode: str = "mean_all_slots", attention: str = "words_then_regions",
                     temp1: float = 4.0, temp2: float = 5.0, text_chunk: Optional[int] = 8):
    """GLoRIA's zero-shot score (methods.md 3.4) as ``Objective.zero_shot_scores``.

    Returns scores(img_emb [n, d], patch_emb [n, p, d], prompts, prompt_class [m], num_classes) -> [n, c]
    class scores before z-normalisation; ``prompts`` holds the encoded prompts' ``txt_emb`` [m, d],
    ``word_emb`` [m, t, d], ``word_mask`` and ``slot_mask`` [m, t].
    """
    def scores(img_emb, patch_emb, prompts, prompt_class, num_classes: int):
        g_txt = report_vector(jnp.asarray(prompts["word_emb"]), jnp.asarray(prompts["slot_mask"]),
                              jnp.asarray(prompts["txt_emb"]), report_vector_mode)
        return gloria_zero_shot_scores(img_emb, patch_emb, g_txt, prompts["word_emb"], prompts["word_mask"],
                                       prompt_class, num_classes, temp1=temp1, temp2=temp2, text_chunk=text_chunk,
                                       normalize=False, attention=attention)
    return scores


@OBJECTIVES.register("gloria")
def make(cfg, *, steps_per_epoch: int) -> Objective:
    del steps_per_epoch
    settings = local_ops.read_config(GloriaConfig, cfg)

    def init(rng, out):
        del rng, out
        return {}

    def loss(method_params, out: EncoderOutputs, batch: Batch, ctx: LossContext):
        del method_params, ctx
        b = out.img_emb.shape[0]
        valid = batch.get("valid", jnp.ones((b,), bool))
        return gloria_loss(out, valid, settings, uncounted_words(batch, b))

    def similarity_maps(method_params, out: EncoderOutputs) -> Array:
        del method_params
        words = local_word_set(out.word_mask, out.slot_mask, settings.include_cls_word, settings.include_sep_word)
        return attention_maps(out.word_emb, words, out.patch_emb, settings.temp1, settings.attention)

    def map_diagnostics(method_params, out: EncoderOutputs) -> dict[str, Array]:
        """Per pair: the [CLS] and the top slot's share of the first softmax (authors' two softmaxes), the
        words' peak mass and [CLS]'s norm relative to the words'."""
        beta = similarity_maps(method_params, out)
        stats = {"word_map_peak_mass": common.word_map_peak_mass(beta, out.word_mask),
                 "cls_word_norm_ratio": cls_word_norm_ratio(out.word_emb, out.word_mask, out.slot_mask)}
        if settings.attention == "words_then_regions":
            words = local_word_set(out.word_mask, out.slot_mask, settings.include_cls_word,
                                   settings.include_sep_word)
            stats.update(first_softmax_shares(out.word_emb, words, out.patch_emb))
        return stats

    zero_shot_scores = zero_shot_scorer(report_vector_mode=settings.report_vector, attention=settings.attention,
                                        temp1=settings.temp1, temp2=settings.temp2)
    return Objective(name="gloria", init=init, loss=loss, similarity_maps=similarity_maps,
                     zero_shot_scores=zero_shot_scores, map_diagnostics=map_diagnostics)
