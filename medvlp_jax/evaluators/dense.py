"""The dense-task toolkit of the segmentation, detection and grounding evaluators.

:func:`batched_apply` (padded, mesh-sharded batched inference), :func:`patch_grid` /
:func:`encode_patch_grid` (the encoder's local features as a [b, gh, gw, w] grid), :class:`HeadTrainer`
(AdamW + early stopping on the validation loss), the inputs of a dense head on a localized split
(:func:`read_splits`, :func:`dense_head_inputs`, :func:`init_head`), and decoder pieces
(:func:`upsample2x`, :func:`norm_groups_for`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.evaluators.localized import LocalizedSplit, has_split, read_localized_split

Array = jax.Array


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


def norm_groups_for(channels: int, groups: int) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of ``channels`` that divides ``groups``."""
    return math.gcd(channels, groups) or 1
