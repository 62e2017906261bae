"""Segmentation on the pretrained image encoder (methods.md 10.2), and the dense-head machinery it shares.

Protocol (MGCA's ``mgca_segmenter.py`` / ``ssl_segmenter.py``, adapted to one feature grid):

* Features: the encoder's pre-projection local features ``patch_feat`` [b, p, w] reshaped to the patch
  grid [b, gh, gw, w]. The encoder is frozen (MGCA) and its features are computed once; with
  ``cfg.finetune_encoder`` it is trained with the decoder (GLoRIA's SIIM protocol), BatchNorm statistics
  kept frozen (eval mode).
* Decoder (:class:`ProgressiveDecoder`): MGCA's ViT segmenter, a SETR decoder with progressive upsampling:
  ``[conv3x3 -> GroupNorm -> ReLU -> bilinear up x2]`` per stage (widths 512/256/128/64 for ViT-B/16 at 224:
  14 -> 224), a 1x1 conv to one logit per pixel, and a bilinear resize of the logits when the stages stop
  short of the image size (``cfg.decoder_stages``, or a grid that does not divide the image). GroupNorm
  replaces SETR's BatchNorm so the head has no mutable statistics. A U-Net needs multi-scale CNN features,
  which the single patch grid does not provide.
* Loss: ``10 * focal(gamma=2) - log(soft Dice, smooth 1)`` over the batch (:func:`segmentation_loss`,
  MGCA's ``MixedLoss``). AdamW (lr 5e-4, wd 0.05); at most ``cfg.epochs`` epochs; early stopping on the
  validation loss with ``cfg.patience``; the best-validation parameters are tested.
* Targets: the union of an example's finding masks (``cfg.finding`` = one finding name only), decoded with
  the same resize / zero-pad / centre-crop as the evaluation images (``pipeline.decode_image`` on the
  binarised mask); records without masks get their boxes rasterised (RSNA: boxes as masks).
* Label fractions (``cfg.fractions``, e.g. 1/10/100%): a subset of the distinct training image ids drawn
  with ``cfg.seed``, one independent draw per fraction (MGCA: ``np.random.choice`` seeded 42).
  ``cfg.balance_negatives`` (SIIM) keeps every positive training image and as many random negatives.
* Metric: MGCA Dice (``metrics.dice_per_image``: sigmoid > 0.5; an empty truth scores 1 only for an empty
  prediction), mean over test images (``dice``) and MGCA's mean of per-batch means (``mgca_dice``).
  No ShiftScaleRotate augmentation: frozen features are computed once (documented deviation).

Shared with detection and grounding (imported from here): :class:`LocalizedSplit` /
:func:`read_localized_split` (images, finding names, phrases, boxes and masks in the evaluation crop's
coordinates), :func:`batched_apply` (padded, mesh-sharded batched inference), :func:`patch_grid`,
:func:`fraction_subset` / :func:`fraction_key`, and :class:`HeadTrainer` (AdamW + early stopping).

Results (``"<pct>%/<metric>"``): ``dice``, ``mgca_dice``, ``val_dice``; protocol facts under ``protocol/``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvlp_jax import metrics, sharding as sharding_lib
from medvlp_jax.data import pipeline, schema
from medvlp_jax.evaluators import EVALUATORS, data_info, eval_config

Array = jax.Array



@dataclasses.dataclass
class LocalizedSplit:
    """One split with its findings, geometry matched to the evaluation images.

    Attributes:
        split: split name.
        ids: image id per example [n].
        index: example index within the split [n].
        images: [n, crop, crop, channels] float32 in [-1, 1] (the pipeline's evaluation preprocessing).
        reports: report text per example [n].
        names: per example, the finding names [k_i].
        phrases: per example, the phrase naming each finding [k_i].
        boxes: per example, [k_i, 4] float32 boxes (ymin, xmin, ymax, xmax) normalised to the crop.
        masks: per example, [k_i, crop, crop] bool finding masks in the crop.
        masks_from_boxes: number of examples whose masks were rasterised from their boxes (no PNG masks).
        findings_dropped: findings whose box lies outside the centre crop (removed from the lists).
    """
    split: str
    ids: list[str]
    index: np.ndarray
    images: np.ndarray
    reports: list[str]
    names: list[list[str]]
    phrases: list[list[str]]
    boxes: list[np.ndarray]
    masks: list[np.ndarray]
    masks_from_boxes: int = 0
    findings_dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        """Side of the (square) crop in pixels."""
        return int(self.images.shape[1])

    def target_masks(self, finding: str = "") -> np.ndarray:
        """[n, crop, crop] bool: union of each example's finding masks (only ``finding`` when given)."""
        out = np.zeros((len(self), self.size, self.size), bool)
        for i, (names, masks) in enumerate(zip(self.names, self.masks)):
            keep = [j for j, name in enumerate(names) if not finding or name == finding]
            if keep:
                out[i] = masks[keep].any(axis=0)
        return out

    def finding_names(self) -> list[str]:
        """Sorted distinct finding names of the split."""
        return sorted({n for names in self.names for n in names})


def _tf():
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")   # TF must not take accelerator memory from JAX
    except RuntimeError:                           # already initialised (set earlier by the pipeline)
        pass
    return tf


def crop_boxes(boxes: np.ndarray, height: int, width: int, resize: int, crop: int) -> np.ndarray:
    """Maps boxes normalised to the stored image into the evaluation crop (``pipeline.decode_image``).

    The image's longer side is resized to ``resize`` (aspect kept, sizes rounded as TF does in float32),
    zero-padded to a centred square, and centre-cropped to ``crop``.

    Args:
        boxes: [k, 4] (ymin, xmin, ymax, xmax) as fractions of the stored image's height/width.
        height: stored image height in pixels.
        width: stored image width in pixels.
        resize: side of the padded square.
        crop: side of the centre crop.

    Returns:
        [k, 4] float32 boxes (ymin, xmin, ymax, xmax) as fractions of the crop, clipped to [0, 1].
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    scale = np.float32(resize) / np.float32(max(height, width))
    new_h = int(np.round(np.float32(height) * scale))
    new_w = int(np.round(np.float32(width) * scale))
    off = (resize - crop) // 2
    pad_y, pad_x = (resize - new_h) // 2 - off, (resize - new_w) // 2 - off
    y = (b[:, [0, 2]] * new_h + pad_y) / crop
    x = (b[:, [1, 3]] * new_w + pad_x) / crop
    out = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _split_dataset(tf, data_cfg, root: str, split: str, num_classes: int):
    info = schema.read_info(root)
    if split not in info.get("splits", {}):
        raise ValueError(f"data set at {root!r} has no split {split!r}; it has {sorted(info.get('splits', {}))}")
    files = [os.path.join(root, s["file"]) for s in info["splits"][split]["shards"]]
    spec = schema.feature_spec(num_classes)
    resize, crop, channels = int(data_cfg.resize), int(data_cfg.crop), int(data_cfg.channels)
    seed = tf.constant([0, 0], tf.int64)

    def one_mask(png):
        # Masks are "nonzero inside": binarise first so 8- and 16-bit masks of any value resample alike,
        # then reuse the image geometry exactly (a pixel is inside when > half of it was covered).
        raw = tf.io.decode_image(png, channels=1, expand_animations=False)
        binary = tf.io.encode_png(tf.cast(raw > 0, tf.uint8) * 255)
        m = pipeline.decode_image(tf, binary, resize=resize, crop=crop, channels=1, train=False, seed=seed,
                                  random_flip=False)
        return m > 0.0

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        image = pipeline.decode_image(tf, ex["image"], resize=resize, crop=crop, channels=channels, train=False,
                                      seed=seed, random_flip=False)
        masks = tf.map_fn(one_mask, tf.sparse.to_dense(ex["finding_masks"], default_value=b""),
                          fn_output_signature=tf.TensorSpec([crop, crop, 1], tf.bool))
        return {"id": ex["id"], "index": ex["index"], "image": image, "report": ex["report"],
                "hw": pipeline.image_header(tf, ex["image"])[:2],
                "names": tf.sparse.to_dense(ex["finding_names"], default_value=b""),
                "phrases": tf.sparse.to_dense(ex["finding_phrases"], default_value=b""),
                "boxes": tf.reshape(tf.sparse.to_dense(ex["finding_boxes"]), [-1, 4]),
                "masks": masks[..., 0]}

    return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def read_localized_split(config: ml_collections.ConfigDict, split: str, *,
                         limit: Optional[int] = None) -> LocalizedSplit:
    """Reads ``split`` of ``config.data.root`` with its findings (every process reads the whole split).

    Args:
        config: a pretraining-style config (``evaluators.eval_config``): ``data.root/resize/crop/channels``.
        split: split name.
        limit: read only the first ``limit`` examples (None or 0: all).

    Returns:
        LocalizedSplit in the split's index order.
    """
    tf = _tf()
    root = config.data.root
    info = schema.read_info(root)
    ds = _split_dataset(tf, config.data, root, split, len(info["class_names"]))
    if limit:
        ds = ds.take(int(limit))
    crop, resize = int(config.data.crop), int(config.data.resize)
    rows = []
    from_boxes = dropped = 0
    for ex in ds.as_numpy_iterator():
        h, w = (int(v) for v in ex["hw"])
        names = [n.decode("utf-8") for n in ex["names"]]
        phrases = [p.decode("utf-8") for p in ex["phrases"]]
        if len(phrases) != len(names):          # records written without phrases: the name is the phrase
            phrases = list(names)
        boxes = crop_boxes(ex["boxes"], h, w, resize, crop) if len(names) else np.zeros((0, 4), np.float32)
        masks = np.asarray(ex["masks"], bool)
        if len(names) and masks.shape[0] != len(names):
            masks = np.stack([metrics.box_to_mask(b, crop, crop) if _area(b) > 0 else np.zeros((crop, crop), bool)
                              for b in boxes])
            from_boxes += 1
        keep = [j for j in range(len(names)) if _area(boxes[j]) > 0]
        dropped += len(names) - len(keep)
        rows.append(dict(id=ex["id"].decode("utf-8"), index=int(ex["index"]), image=ex["image"],
                         report=ex["report"].decode("utf-8", errors="replace"),
                         names=[names[j] for j in keep], phrases=[phrases[j] for j in keep],
                         boxes=boxes[keep].reshape(-1, 4), masks=masks[keep].reshape(-1, crop, crop)))
    rows.sort(key=lambda r: r["index"])
    images = np.stack([r["image"] for r in rows]).astype(np.float32) if rows else \
        np.zeros((0, crop, crop, int(config.data.channels)), np.float32)
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    return LocalizedSplit(split=split, ids=col("id"), index=np.array(col("index"), np.int64), images=images,
                          reports=col("report"), names=col("names"), phrases=col("phrases"), boxes=col("boxes"),
                          masks=col("masks"), masks_from_boxes=from_boxes, findings_dropped=dropped)


def _area(box) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


def has_split(config: ml_collections.ConfigDict, split: str) -> bool:
    """True when the evaluation data set has a non-empty ``split``."""
    info = data_info(config)
    return bool(split) and int(info.get("splits", {}).get(split, {}).get("num_examples", 0)) > 0



def fraction_subset(ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Rows whose image id is in a seeded random subset of ``fraction`` of the distinct ids.

    Args:
        ids: image id per row [n] (several rows may share an id).
        fraction: in (0, 1]; at least one id is kept.
        seed: ``np.random.RandomState`` seed (MGCA draws with ``np.random.choice`` seeded 42).

    Returns:
        int64 row indices [m], increasing.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    ids = list(ids)
    if fraction >= 1:
        return np.arange(len(ids), dtype=np.int64)
    distinct = sorted(set(ids))
    k = max(1, int(round(fraction * len(distinct))))
    chosen = {distinct[i] for i in np.random.RandomState(seed).choice(len(distinct), k, replace=False)}
    return np.array([i for i, x in enumerate(ids) if x in chosen], dtype=np.int64)


def balance_negatives(rows: np.ndarray, positive: np.ndarray, seed: int) -> np.ndarray:
    """SIIM's balanced training set: every positive row plus as many random negative rows (or all of them).

    Args:
        rows: candidate row indices [m].
        positive: bool per row of the whole split [n].
        seed: random seed.

    Returns:
        sorted row indices.
    """
    pos = rows[positive[rows]]
    neg = rows[~positive[rows]]
    k = min(len(neg), len(pos))
    neg = np.random.RandomState(seed).choice(neg, k, replace=False) if k < len(neg) else neg
    return np.sort(np.concatenate([pos, neg])).astype(np.int64)


def fraction_key(fraction: float) -> str:
    """0.01 -> '1%', 0.1 -> '10%', 1.0 -> '100%', 0.005 -> '0.5%'."""
    pct = round(fraction * 100, 6)
    return f"{int(pct)}%" if float(pct).is_integer() else f"{pct:g}%"



def _put_global(x: np.ndarray, sharding) -> Array:
    """A global array from a host array every process holds in full (works on several hosts)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def padded_batch_size(batch_size: int, mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh size (rows are split over every device)."""
    return max(1, -(-int(batch_size) // mesh.size)) * mesh.size


def batched_apply(fn: Callable[[dict], Any], arrays: dict[str, np.ndarray], *, mesh, batch_size: int) -> Any:
    """Runs a jitted ``fn(batch) -> pytree of [b, ...]`` over the rows of ``arrays`` in padded batches.

    Rows are split over the mesh; the last batch is padded by repeating row 0 and the padding is dropped.

    Args:
        fn: jitted function of a dict of [b, ...] arrays.
        arrays: host arrays with the same leading size n.
        mesh: the run's mesh.
        batch_size: rows per call (rounded up to the mesh size).

    Returns:
        fn's output pytree with leaves [n, ...] (numpy).
    """
    n = len(next(iter(arrays.values())))
    bs = padded_batch_size(batch_size, mesh)
    sh = sharding_lib.batch_sharding(mesh)
    outs = []
    for start in range(0, n, bs):
        rows = np.arange(start, start + bs)
        rows = np.where(rows < n, rows, 0)
        batch = {k: _put_global(np.ascontiguousarray(v[rows]), sh) for k, v in arrays.items()}
        outs.append(jax.device_get(fn(batch)))
    if not outs:
        raise ValueError("batched_apply got no rows")
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outs)


def patch_grid(model, variables, images: Array) -> Array:
    """Pre-projection local image features on the patch grid.

    Args:
        model: the run's DualEncoder.
        variables: encoder variables.
        images: [b, h, w, c].

    Returns:
        [b, gh, gw, w] float32.
    """
    out = model.apply(variables, {"image": images}, train=False, method="encode_image")
    gh, gw = out.grid
    return out.patch_feat.reshape(out.patch_feat.shape[0], gh, gw, -1)


def encode_patch_grid(run, images: np.ndarray, batch_size: int) -> np.ndarray:
    """[n, gh, gw, w] frozen ``patch_feat`` grids of ``images`` [n, h, w, c] (eval mode)."""
    rep = sharding_lib.replicated(run.mesh)
    fwd = jax.jit(lambda v, b: patch_grid(run.model, v, b["image"]), out_shardings=rep)
    return batched_apply(lambda b: fwd(run.variables, b), {"image": images}, mesh=run.mesh, batch_size=batch_size)



@dataclasses.dataclass
class FitResult:
    params: Any
    best_epoch: int          # 1-based epoch whose parameters were kept (0: the initial ones)
    epochs_run: int
    train_loss: list[float]
    val_loss: list[float]


class HeadTrainer:
    """Trains head parameters with AdamW on mesh-sharded batches; compiled once per loss and batch shape.

    ``loss_fn(params, frozen, batch) -> loss []`` where ``batch`` holds [b, ...] arrays and ``valid`` [b]
    (False on padding rows, which must not contribute); ``frozen`` is anything not trained (e.g. the
    encoder's BatchNorm statistics when it is fine-tuned).
    """

    def __init__(self, loss_fn: Callable[[Any, Any, dict], Array], *, mesh, learning_rate: float,
                 weight_decay: float, b1: float = 0.9, b2: float = 0.999):
        self.mesh = mesh
        self.tx = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
        tx = self.tx

        def step(params, opt_state, frozen, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(step, donate_argnums=(0, 1))
        self._loss = jax.jit(loss_fn)

    def _batches(self, arrays: dict[str, np.ndarray], batch_size: int, order: np.ndarray):
        sh = sharding_lib.batch_sharding(self.mesh)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            valid = np.ones(batch_size, bool)
            if len(rows) < batch_size:
                valid[len(rows):] = False
                rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
            batch = {k: np.ascontiguousarray(v[rows]) for k, v in arrays.items()}
            batch["valid"] = valid
            yield {k: _put_global(v, sh) for k, v in batch.items()}, int(valid.sum())

    def mean_loss(self, params, frozen, arrays: dict[str, np.ndarray], batch_size: int) -> float:
        """Loss over all rows of ``arrays`` (batch losses weighted by their number of real rows)."""
        n = len(next(iter(arrays.values())))
        total = count = 0.0
        for batch, k in self._batches(arrays, padded_batch_size(batch_size, self.mesh), np.arange(n)):
            total += float(self._loss(params, frozen, batch)) * k
            count += k
        return total / max(count, 1)

    def fit(self, params, train: dict[str, np.ndarray], val: Optional[dict[str, np.ndarray]], *, batch_size: int,
            epochs: int, patience: int, seed: int, frozen: Any = None, desc: str = "") -> FitResult:
        """Trains ``params`` for up to ``epochs`` epochs; keeps the best-validation parameters.

        Args:
            params: initial trainable parameters: host arrays are replicated on the mesh, device arrays
                copied with their sharding (the caller's arrays are never donated).
            train: training arrays [n, ...] (no ``valid`` key; it is added per batch).
            val: validation arrays, or None (then the last epoch's parameters are kept, no early stop).
            batch_size: rows per step (rounded up to the mesh size; the last batch of an epoch is padded).
            epochs: maximum number of epochs.
            patience: stop after this many epochs without a lower validation loss.
            seed: shuffling seed (epoch e uses ``default_rng([seed, e])``).
            frozen: non-trained inputs of the loss.
            desc: label of the progress bar over epochs (none when empty).

        Returns:
            FitResult with host (numpy) parameters.
        """
        n = len(next(iter(train.values())))
        if n == 0:
            raise ValueError("no training rows")
        bs = padded_batch_size(batch_size, self.mesh)
        rep = sharding_lib.replicated(self.mesh)
        # The step donates its parameters: copy device arrays (e.g. the run's own encoder weights when it
        # is fine-tuned, which must survive this fit) keeping their sharding; host arrays go replicated.
        params = jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array)
                              else jax.device_put(x, rep), params)
        opt_state = jax.jit(self.tx.init)(params)
        best = jax.device_get(params)
        best_loss, best_epoch, bad_epochs = math.inf, 0, 0
        train_losses, val_losses = [], []
        epoch = 0
        from tqdm.auto import tqdm
        bar = tqdm(range(1, epochs + 1), desc=desc, leave=False, disable=not desc or jax.process_index() != 0)
        for epoch in bar:
            order = np.random.default_rng([seed, epoch]).permutation(n)
            total = count = 0.0
            for batch, k in self._batches(train, bs, order):
                params, opt_state, loss = self._step(params, opt_state, frozen, batch)
                total += float(loss) * k
                count += k
            train_losses.append(total / max(count, 1))
            if val is None or len(next(iter(val.values()))) == 0:
                best, best_epoch = jax.device_get(params), epoch
                continue
            vl = self.mean_loss(params, frozen, val, batch_size)
            val_losses.append(vl)
            bar.set_postfix(train=f"{train_losses[-1]:.4f}", val=f"{vl:.4f}")
            if vl < best_loss:
                best_loss, best_epoch, bad_epochs = vl, epoch, 0
                best = jax.device_get(params)
            else:
                bad_epochs += 1
                if bad_epochs >= patience:
                    break
        bar.close()
        return FitResult(params=best, best_epoch=best_epoch, epochs_run=epoch, train_loss=train_losses,
                         val_loss=val_losses)



def upsample2x(x: Array) -> Array:
    """Bilinear x2 upsampling of [b, h, w, c] (half-pixel centres, edges clamped).

    Equals ``jax.image.resize(x, (b, 2h, 2w, c), "bilinear")``: output pixel 2i is 3/4 x[i] + 1/4 x[i-1] and
    2i+1 is 3/4 x[i] + 1/4 x[i+1]; written out because it compiles and runs much faster on a CPU.
    """
    def along(x, axis):
        n = x.shape[axis]
        first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
        last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
        prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
        nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
        pair = jnp.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis + 1)
        return pair.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])

    return along(along(x, 1), 2)


def num_upsamplings(grid: int, size: int) -> int:
    """Number of x2 stages that bring a ``grid`` side closest to ``size`` without overshooting twice."""
    return max(0, int(round(math.log2(size / grid)))) if grid < size else 0


def norm_groups_for(channels: int, groups: int) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of ``channels`` that divides ``groups``."""
    return math.gcd(channels, groups) or 1


class ProgressiveDecoder(nn.Module):
    """SETR progressive-upsampling decoder: patch grid [b, gh, gw, w] -> logits [b, H, W, out_channels].

    Attributes:
        out_size: (H, W) of the output (the input image size).
        widths: channels of the successive conv3x3 + up x2 stages (the last one repeats if more are needed).
        out_channels: logits per pixel.
        norm_groups: GroupNorm groups (gcd with the stage width).
        upsample_stages: number of x2 stages; -1 = as many as bring the grid to ``out_size``. Fewer stages
            predict at a lower resolution and resize the logits bilinearly (much cheaper on a CPU).
    """
    out_size: tuple[int, int]
    widths: Sequence[int] = (512, 256, 128, 64)
    out_channels: int = 1
    norm_groups: int = 8
    upsample_stages: int = -1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_up = num_upsamplings(x.shape[1], self.out_size[0]) if self.upsample_stages < 0 else self.upsample_stages
        x = x.astype(jnp.float32)
        for i in range(n_up):
            c = int(self.widths[min(i, len(self.widths) - 1)])
            x = nn.Conv(c, (3, 3), name=f"conv{i}")(x)
            x = nn.GroupNorm(num_groups=norm_groups_for(c, self.norm_groups), name=f"norm{i}")(x)
            x = upsample2x(nn.relu(x))
        x = nn.Conv(self.out_channels, (1, 1), name="logits")(x)
        if tuple(x.shape[1:3]) != tuple(self.out_size):
            # After the 1x1 conv: both are linear (bilinear weights sum to 1), so this equals resizing the
            # features first, on out_channels instead of the stage width.
            x = jax.image.resize(x, (x.shape[0], *self.out_size, x.shape[-1]), "bilinear")
        return x


def segmentation_loss(logits: Array, target: Array, valid: Array, *, focal_weight: float = 10.0,
                      gamma: float = 2.0, smooth: float = 1.0) -> Array:
    """MGCA's ``MixedLoss``: ``focal_weight * focal(gamma) - log(soft Dice)`` over the whole batch.

    Focal term per pixel: ``exp(gamma * log_sigmoid(-x * (2t - 1))) * BCE(x, t)`` averaged over the real
    pixels; soft Dice ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over all real pixels of the batch.

    Args:
        logits: [b, h, w].
        target: [b, h, w] in {0, 1}.
        valid: [b] bool; padding rows contribute nothing.
        focal_weight: weight of the focal term (10).
        gamma: focal exponent (2).
        smooth: Dice smoothing (1).

    Returns:
        scalar loss.
    """
    x = logits.astype(jnp.float32)
    t = target.astype(jnp.float32)
    w = jnp.broadcast_to(valid.astype(jnp.float32)[:, None, None], x.shape)
    bce = optax.sigmoid_binary_cross_entropy(x, t)
    focal = jnp.exp(gamma * jax.nn.log_sigmoid(-x * (2.0 * t - 1.0))) * bce
    focal = jnp.sum(focal * w) / jnp.maximum(jnp.sum(w), 1.0)
    p = jax.nn.sigmoid(x) * w
    t = t * w
    dice = (2.0 * jnp.sum(p * t) + smooth) / (jnp.sum(p) + jnp.sum(t) + smooth)
    return focal_weight * focal - jnp.log(dice)



def head_inputs_of(run, split: LocalizedSplit, finetune: bool, batch_size: int) -> dict[str, np.ndarray]:
    """What a dense head's batches hold: frozen ``feat`` grids [n, gh, gw, w], or ``image`` when fine-tuning."""
    if finetune:
        return {"image": split.images}
    return {"feat": encode_patch_grid(run, split.images, batch_size)}


def read_splits(config: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict):
    """(train, validation or None, test) LocalizedSplits of ``cfg.data`` (``cfg.limit_examples`` > 0: first n)."""
    limit = int(cfg.get("limit_examples", 0)) or None
    val = cfg.data.val_split
    return (read_localized_split(config, cfg.data.train_split, limit=limit),
            read_localized_split(config, val, limit=limit) if has_split(config, val) else None,
            read_localized_split(config, cfg.data.test_split, limit=limit))


def dense_head_inputs(run, cfg: ml_collections.ConfigDict, head: nn.Module):
    """How a dense head sees the encoder.

    Frozen encoder: the batch holds precomputed ``feat`` grids and only the head is trained. Fine-tuned
    encoder (``cfg.finetune_encoder``): the batch holds ``image`` and the params are
    ``{"head": ..., "encoder": encoder params}`` (BatchNorm statistics frozen, eval mode).

    Returns:
        (apply(params, frozen, batch) -> head output, finetune flag, encoder params, frozen variables or None).
    """
    finetune = bool(cfg.get("finetune_encoder", False))
    enc_params = run.variables["params"]
    frozen = {k: v for k, v in run.variables.items() if k != "params"} if finetune else None

    def features(params, frozen_, batch):
        if not finetune:
            return batch["feat"]
        return patch_grid(run.model, {"params": params["encoder"], **frozen_}, batch["image"])

    def apply(params, frozen_, batch):
        head_params = params["head"] if finetune else params
        return head.apply({"params": head_params}, features(params, frozen_, batch))

    return apply, finetune, enc_params, frozen


def init_head(head: nn.Module, grid: tuple[int, ...], seed: int):
    """Head parameters for a [1, gh, gw, w] grid input (``grid`` = (gh, gw, w))."""
    # Jitted: eager init compiles every primitive of the module one by one (seconds on a CPU).
    init = jax.jit(lambda key: head.init(key, jnp.zeros((1, *grid), jnp.float32))["params"])
    return jax.device_get(init(jax.random.PRNGKey(seed)))


def grid_shape(run, example: np.ndarray) -> tuple[int, ...]:
    """(gh, gw, w) of the encoder's patch grid for one image [h, w, c] (shape inference only)."""
    shapes = jax.eval_shape(lambda v, x: patch_grid(run.model, v, x), run.variables,
                            jax.ShapeDtypeStruct((1, *example.shape), jnp.float32))
    return tuple(shapes.shape[1:])


@EVALUATORS.register("segmentation")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains a segmentation decoder per label fraction and reports test Dice (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    seed = int(cfg.get("seed", 42))
    batch_size = config.train.batch_size                      # feature extraction / inference
    head_batch = int(cfg.get("head_batch_size", 16))
    finding = str(cfg.get("finding", "") or "")
    train, val, test = read_splits(config, cfg)
    size = test.size
    head = ProgressiveDecoder(out_size=(size, size), widths=tuple(cfg.get("decoder_widths", (512, 256, 128, 64))),
                              upsample_stages=int(cfg.get("decoder_stages", -1)))
    apply, finetune, enc_params, frozen = dense_head_inputs(run, cfg, head)

    def loss_fn(params, frozen_, batch):
        logits = apply(params, frozen_, batch)[..., 0]
        return segmentation_loss(logits, batch["mask"], batch["valid"],
                                 focal_weight=float(cfg.get("focal_weight", 10.0)),
                                 gamma=float(cfg.get("focal_gamma", 2.0)))

    trainer = HeadTrainer(loss_fn, mesh=run.mesh, learning_rate=float(cfg.get("lr", 5e-4)),
                          weight_decay=float(cfg.get("weight_decay", 0.05)))
    masks = {s.split: s.target_masks(finding).astype(np.float32) for s in (train, val, test) if s is not None}
    inputs = {s.split: head_inputs_of(run, s, finetune, batch_size) for s in (train, val, test) if s is not None}
    grid = grid_shape(run, test.images[0])
    rep = sharding_lib.replicated(run.mesh)
    predict = jax.jit(lambda p, fr, b: jax.nn.sigmoid(apply(p, fr, b)[..., 0]), out_shardings=rep)

    def probs(params, split):
        return batched_apply(lambda b: predict(params, frozen, b), inputs[split.split], mesh=run.mesh,
                             batch_size=batch_size)

    n_up = num_upsamplings(grid[0], size) if head.upsample_stages < 0 else head.upsample_stages
    decoder = f"progressive, {n_up} x2 stages {list(head.widths)[:n_up]}"
    if grid[0] * 2 ** n_up != size:
        decoder += f", logits resized x{size / (grid[0] * 2 ** n_up):g}"
    positive_train = masks[train.split].reshape(len(train), -1).any(axis=1)
    res: dict[str, Any] = {
        "protocol/data": info.get("name", ""), "protocol/root": config.data.root,
        "protocol/splits": f"{train.split}/{val.split if val else '-'}/{test.split}",
        "protocol/num_train_images": len(train), "protocol/num_val_images": len(val) if val else 0,
        "protocol/num_test_images": len(test),
        "protocol/test_positive_images": int(masks[test.split].reshape(len(test), -1).any(axis=1).sum()),
        "protocol/finding": finding or "any", "protocol/seed": seed, "protocol/grid": "x".join(map(str, grid[:2])),
        "protocol/decoder": decoder, "protocol/finetune_encoder": finetune, "protocol/image_size": size,
        "protocol/masks_from_boxes": sum(s.masks_from_boxes for s in (train, val, test) if s is not None),
        "protocol/head_batch_size": padded_batch_size(head_batch, run.mesh),
    }
    for fraction in cfg.get("fractions", (0.01, 0.1, 1.0)):
        key = fraction_key(float(fraction))
        rows = fraction_subset(train.ids, float(fraction), seed)
        if cfg.get("balance_negatives", False):
            rows = balance_negatives(rows, positive_train, seed)
        head_params = init_head(head, grid, seed)
        params = {"head": head_params, "encoder": enc_params} if finetune else head_params
        train_arrays = {k: v[rows] for k, v in inputs[train.split].items()} | {"mask": masks[train.split][rows]}
        val_arrays = (inputs[val.split] | {"mask": masks[val.split]}) if val is not None else None
        fit = trainer.fit(params, train_arrays, val_arrays, batch_size=head_batch, epochs=int(cfg.get("epochs", 50)),
                          patience=int(cfg.get("patience", 10)), seed=seed, frozen=frozen, desc=f"segmentation {key}")
        p_test = probs(fit.params, test)
        res[f"{key}/dice"] = metrics.mean_dice(p_test, masks[test.split])
        res[f"{key}/mgca_dice"] = metrics.mean_dice(p_test, masks[test.split], batch_size=head_batch)
        if val is not None:
            res[f"{key}/val_dice"] = metrics.mean_dice(probs(fit.params, val), masks[val.split])
        res[f"protocol/{key}/num_train_images"] = int(len(rows))
        res[f"protocol/{key}/positive_train_images"] = int(positive_train[rows].sum())
        res[f"protocol/{key}/best_epoch"] = fit.best_epoch
        res[f"protocol/{key}/epochs_run"] = fit.epochs_run
    return res
