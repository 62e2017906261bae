"""Building blocks shared by the objectives: masked softmax/means, the diagonal cross-entropy
(``diag_ce``, ``bidirectional_ce``) and InfoNCE, normalisation, masked
quantile clipping (torch.quantile semantics), Sinkhorn-Knopp, torch-style cosine, and the chunked
cross-sample helpers (``map_in_chunks``, ``chunked_diag_ce``) that keep [b, b, t, p] tensors out of memory, and
``word_map_peak_mass`` (a diagnostic of word-to-patch maps)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medvlp_jax.numerics import l2_normalize  # noqa: F401  (re-exported: objectives use common.l2_normalize)

NEG_INF = -1e9  # finite "minus infinity": exp() underflows to 0 and gradients stay NaN-free


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``x`` over entries where ``mask``; 0 where nothing is selected."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_log_softmax(logits: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """log_softmax over entries where ``mask`` (others get NEG_INF before the softmax)."""
    return jax.nn.log_softmax(jnp.where(mask, logits, NEG_INF), axis=axis)


def diag_ce(logits: jax.Array, col_mask: jax.Array | None = None) -> jax.Array:
    """Per-row cross-entropy with the diagonal as target, over one or a stack of square logit matrices.

    Args:
      logits: [..., n, n]; row r's target is column r.
      col_mask: [..., n] bool, the columns that may compete (the diagonal always competes); None: all.
    Returns:
      [..., n] CE per row (rows whose own column is masked out are meaningless; mask them downstream).
    """
    n = logits.shape[-1]
    if col_mask is not None:
        keep = col_mask[..., None, :] | jnp.eye(n, dtype=bool)
        logits = jnp.where(keep, logits, NEG_INF)
    return -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=-2, axis2=-1)


def bidirectional_ce(logits: jax.Array, valid: jax.Array, reduce_directions: str = "mean",
                     i2t_weight: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Bidirectional CE over a batch logit matrix with the matching pairs on the diagonal.

    Args:
      logits: [b, b], rows = images, columns = reports.
      valid: [b] bool; invalid rows neither count nor act as negatives.
      reduce_directions: "mean" (w * i2t + (1 - w) * t2i) or "sum" (i2t + t2i).
      i2t_weight: w, the weight of the image->text direction under "mean".
    Returns:
      (loss [], i2t [], t2i []): i2t and t2i are means over the valid rows.
    """
    i2t = masked_mean(diag_ce(logits, valid), valid)
    t2i = masked_mean(diag_ce(logits.T, valid), valid)
    if reduce_directions == "sum":
        return i2t + t2i, i2t, t2i
    if reduce_directions == "mean":
        return i2t_weight * i2t + (1.0 - i2t_weight) * t2i, i2t, t2i
    raise ValueError(f"reduce_directions must be 'mean' or 'sum', got {reduce_directions!r}")


def infonce(img: jax.Array, txt: jax.Array, temperature, valid: jax.Array | None = None,
            i2t_weight: float = 0.5, reduce_directions: str = "mean"):
    """Bidirectional InfoNCE with the matching pairs on the diagonal.

    Args:
      img: [b, d] L2-normalised image embeddings.
      txt: [b, d] L2-normalised text embeddings.
      temperature: scalar (float or traced).
      valid: [b] bool; padded rows neither count nor act as negatives.
      i2t_weight: weight of the image->text direction; text->image gets 1 - i2t_weight.
      reduce_directions: "mean" -> w*i2t + (1-w)*t2i ; "sum" -> i2t + t2i (MGCA/ConVIRT-in-MGCA).
    Returns:
      (loss [], i2t [], t2i [], logits [b, b]).
    """
    b = img.shape[0]
    if valid is None:
        valid = jnp.ones((b,), bool)
    logits = jnp.einsum("id,jd->ij", img, txt) / temperature
    loss, i2t, t2i = bidirectional_ce(logits, valid, reduce_directions, i2t_weight)
    return loss, i2t, t2i, logits


def retrieval_accuracy(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Fraction of valid rows whose argmax is the diagonal. logits: [b, b]; valid: [b]."""
    logits = jnp.where(valid[None, :], logits, NEG_INF)
    hit = jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])
    return masked_mean(hit.astype(jnp.float32), valid)


# ---- Masked quantiles and weight clipping (methods.md sections 4.3 and 12.4) ----------------------------

def _torch_lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    """torch.lerp's two-sided formula (exact to torch's rounding): weight < 0.5 counts from ``start``."""
    return jnp.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


def masked_quantile(x: jax.Array, mask: jax.Array, q: float) -> jax.Array:
    """torch.quantile(x[mask], q) along the last axis, with torch's 'linear' interpolation.

    The valid entries are sorted (masked ones are moved to the end as +inf) and interpolated at rank
    q * (n - 1), n = number of valid entries in the row, exactly as torch.quantile does on the gathered
    valid entries.

    Args:
      x: [..., n] values (any float dtype; computed in at least float32).
      mask: [..., n] bool, the entries that count.
      q: quantile in [0, 1].
    Returns:
      [..., 1]; 0 for rows with no valid entry.
    """
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mask = jnp.broadcast_to(mask, x.shape)
    n = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.int32)            # [..., 1]
    srt = jnp.sort(jnp.where(mask, x, jnp.inf), axis=-1)                    # valid entries first
    rank = jnp.asarray(q, x.dtype) * jnp.maximum(n - 1, 0).astype(x.dtype)
    below = jnp.floor(rank).astype(jnp.int32)
    above = jnp.ceil(rank).astype(jnp.int32)
    v_below = jnp.take_along_axis(srt, below, axis=-1)
    v_above = jnp.take_along_axis(srt, above, axis=-1)
    value = _torch_lerp(v_below, v_above, rank - below.astype(x.dtype))
    return jnp.where(n > 0, value, 0.0)


def quantile_clip(x: jax.Array, mask: jax.Array, lo: float = 0.1, hi: float = 0.9) -> jax.Array:
    """Entries under ``mask`` clipped to their own row's [lo, hi] quantiles; 0 elsewhere.

    Args:
      x: [..., n]; mask: [..., n] bool.
    Returns:
      [..., n].
    """
    lo_q = masked_quantile(x, mask, lo)
    hi_q = masked_quantile(x, mask, hi)
    x = x.astype(lo_q.dtype)
    return jnp.where(mask, jnp.minimum(jnp.maximum(x, lo_q), hi_q), 0.0)   # torch.clip(min, max) order


def quantile_clipped_weights(x: jax.Array, mask: jax.Array, lo: float = 0.1, hi: float = 0.9) -> jax.Array:
    """MGCA token weights: clip to the row's own quantiles over ``mask``, normalise to sum 1 (stop-grad).

    Args:
      x: [..., n] non-negative importances (word attention, patch attention).
      mask: [..., n] bool, the entries that carry weight (MGCA's word side: the non-zero entries).
    Returns:
      [..., n] weights, 0 outside ``mask``, rows summing to 1 (all 0 for a row with no valid entry).
    """
    w = quantile_clip(jax.lax.stop_gradient(x), mask, lo, hi)
    total = jnp.sum(w, axis=-1, keepdims=True)
    return jax.lax.stop_gradient(w / jnp.where(total > 0, total, 1.0))


# ---- Sinkhorn-Knopp (methods.md sections 4.4 and 12.5) ------------------------------------------------

def sinkhorn(scores: jax.Array, epsilon: float = 0.05, iterations: int = 3,
             valid: jax.Array | None = None) -> jax.Array:
    """SwAV/MGCA Sinkhorn-Knopp soft assignments, float32, outside the gradient.

    With Q = exp(scores^T / epsilon) [k, b] normalised to total mass 1, each iteration rescales the rows
    to mass 1/k and then the columns to mass 1/b; the codes are Q's columns renormalised to sum 1,
    transposed. The global maximum is subtracted inside exp() (it cancels in the first normalisation)
    so unnormalised scores cannot overflow; rows and columns with no mass are left at 0.

    Args:
      scores: [b, k] sample-to-prototype scores (any float dtype; cast to float32).
      epsilon: entropy regularisation (0.05).
      iterations: Sinkhorn iterations (3).
      valid: [b] bool or None; invalid samples get no mass (they are not part of the batch).
    Returns:
      codes: [b, k] float32, each valid row summing to 1; 0 rows for invalid samples.
    """
    s = jax.lax.stop_gradient(jnp.asarray(scores)).astype(jnp.float32)
    b, k = s.shape
    if valid is None:
        valid = jnp.ones((b,), bool)
    col_ok = valid[None, :]                                                  # [1, b]
    logits = jnp.where(col_ok, s.T / epsilon, -jnp.inf)                     # [k, b]
    top = jnp.max(logits)
    q = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    q = jnp.where(col_ok, q, 0.0)
    q = q / jnp.sum(q)
    n_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    r = jnp.full((k, 1), 1.0 / k, jnp.float32)
    c = jnp.where(col_ok, 1.0 / n_valid, 0.0)                               # [1, b]

    def safe_div(num, den):
        return num / jnp.where(den > 0, den, 1.0)

    def body(_, q):
        q = q * safe_div(r, jnp.sum(q, axis=1, keepdims=True))
        return q * safe_div(c, jnp.sum(q, axis=0, keepdims=True))

    q = jax.lax.fori_loop(0, iterations, body, q)
    codes = safe_div(q, jnp.sum(q, axis=0, keepdims=True)).T                # [b, k]
    return jax.lax.stop_gradient(codes)


# ---- Cosine similarity with torch's clamp (GLoRIA) ----------------------------------------------------

def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """||x||_2 with a zero (not NaN) gradient at x = 0, as torch.norm."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def cosine_similarity(x: jax.Array, y: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    """<x, y> / max(||x|| ||y||, eps) along ``axis`` (GLoRIA's / AttnGAN's cosine; broadcasting)."""
    dot = jnp.sum(x * y, axis=axis)
    return dot / jnp.maximum(safe_norm(x, axis) * safe_norm(y, axis), eps)


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """log sum_{mask} exp(x) along ``axis``; a row with nothing selected gives ~NEG_INF (finite)."""
    return jax.nn.logsumexp(jnp.where(mask, x, NEG_INF), axis=axis)


# ---- Chunked cross-sample helpers (methods.md section 12.6) -------------------------------------------

def map_in_chunks(body, xs, chunk: int | None, remat: bool = True):
    """Applies ``body`` to chunks of the leading axis of ``xs`` and concatenates the results.

    The cross-sample local terms (every text against every image) would build [b, b, t, p] at full batch;
    mapping over chunks of c texts with ``lax.map`` keeps one chunk's [c, b, t, p] alive, and
    ``jax.checkpoint`` on the body makes the backward recompute it chunk by chunk instead of storing every
    chunk's intermediates. The leading axis is padded to a multiple of ``chunk`` by repeating the last
    row (real data: no NaN or empty-mask rows appear in the padding's forward or backward); the padded
    rows are sliced off, so they receive no gradient.

    Args:
      body: pytree with leading axis c -> pytree with leading axis c.
      xs: pytree of arrays sharing the leading axis n.
      chunk: rows per chunk; None or >= n runs ``body`` once on everything (the unchunked reference).
      remat: wrap the body in ``jax.checkpoint``.
    Returns:
      pytree of outputs with leading axis n.
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if chunk is None or chunk >= n:
        return body(xs)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def split(x):
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    fn = jax.checkpoint(body) if remat else body
    out = jax.lax.map(fn, jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda y: y.reshape((n_chunks * chunk,) + y.shape[2:])[:n], out)


def chunked_diag_ce(queries: jax.Array, keys: jax.Array, key_mask: jax.Array | None, temperature,
                    chunk: int | None = None) -> jax.Array:
    """Per-query CE of <q_i, k_:>/temperature with target i, over all n keys, in chunks of queries.

    Used for contrastive terms over a flattened set (e.g. every word of every sample) whose [n, n] logit
    matrix is too large to hold: memory O(chunk * n), FLOPs O(n^2 d).

    Args:
      queries: [n, d]; keys: [n, d] (row i of each is a matching pair).
      key_mask: [n] bool or None; masked keys never compete (a query's own key always does).
      temperature: scalar.
      chunk: queries per chunk (None: one block).
    Returns:
      [n] CE per query.
    """
    n = queries.shape[0]
    if key_mask is None:
        key_mask = jnp.ones((n,), bool)

    def body(args):
        q, idx = args                                                       # [c, d], [c]
        logits = jnp.einsum("cd,nd->cn", q, keys) / temperature
        keep = key_mask[None, :] | (idx[:, None] == jnp.arange(n)[None, :])
        lse = jax.nn.logsumexp(jnp.where(keep, logits, NEG_INF), axis=-1)
        own = jnp.sum(q * keys[idx], axis=-1) / temperature
        return lse - own

    return map_in_chunks(body, (queries, jnp.arange(n)), chunk)


def word_map_peak_mass(beta: jax.Array, words: jax.Array) -> jax.Array:
    """The largest region weight of each word's map, averaged over ``words``.

    Args:
      beta: [b, t, p] maps whose word rows sum to 1; words: [b, t] bool.
    Returns:
      [b]: 1/p for uniform maps, 1 for maps on a single region; 0 for a row of ``words`` that is all False.
    """
    peak = jnp.max(beta, axis=-1)                                              # [b, t]
    w = words.astype(peak.dtype)
    return jnp.sum(peak * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)
