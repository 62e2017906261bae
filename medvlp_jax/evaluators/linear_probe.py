"""Linear probe on the frozen image encoder (methods.md 10.1: CheXpert, RSNA, COVIDx; demo; synthetic).

Protocol:
  1. Features: the pre-projection global image feature ``img_feat`` (ViT [CLS], ResNet pooled), eval mode,
     extracted once per split (train / validation / test).
  2. Label fractions (``cfg.fractions``, e.g. 1%, 10%, 100%): one permutation of the training split's example
     indices (the schema's ``index`` field, 0..n-1) drawn with ``cfg.seed``; fraction f keeps its first
     ``max(1, round(f * n))``. The subsets are therefore deterministic and nested (1% within 10% within
     100%), and the fine-tune evaluator trains on exactly the same examples. MGCA draws each fraction
     separately (``DataFrame.sample(frac, random_state=42)``), so its subsets are not nested; sizes match.
  3. Head: one linear layer (zero init) trained with AdamW (MGCA: lr 5e-4, betas (0.9, 0.999), wd 1e-6,
     batch 48, <= 50 epochs) inside jit: one ``lax.scan`` over the shuffled minibatches per epoch
     (``cfg.head_batch_size`` <= 0: full batch). After every epoch the validation loss is computed; training
     stops after ``cfg.patience`` epochs without improvement and the best-validation head is tested.
  4. Task: multi-label (BCE, per-class and macro AUROC; RSNA = one label) or multiclass (softmax CE,
     top-1 accuracy, macro F1, one-vs-rest AUROC), ``cfg.task="auto"`` picks multiclass when every row of
     every split has exactly one positive (COVIDx).

Result keys ``"<fraction>/<metric>"`` with fraction written as a percentage (``"1%/macro_auroc"``), and
``"protocol/..."``: split sizes, the n of each fraction, seed, epochs run, best epoch, hyper-parameters.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvlp_jax import metrics
from medvlp_jax.evaluators import EVALUATORS
from medvlp_jax.evaluators.protocol import binary_labels, class_columns, data_info, eval_config, is_single_label
from medvlp_jax.evaluators import embed

TASKS = ("multilabel", "multiclass")


def fraction_name(fraction: float) -> str:
    """0.01 -> "1%", 0.1 -> "10%", 1.0 -> "100%"."""
    return f"{fraction * 100:g}%"


def fraction_size(n: int, fraction: float) -> int:
    """Examples kept of ``n`` at ``fraction``: ``max(1, round(fraction * n))`` (all when fraction >= 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fractions must be in (0, 1], got {fraction}")
    return n if fraction >= 1 else min(n, max(1, int(round(fraction * n))))


def label_fraction_subsets(n: int, fractions: Sequence[float], seed: int) -> dict[float, np.ndarray]:
    """Nested, deterministic training subsets: {fraction: sorted row indices [fraction_size(n, f)]}.

    One permutation of ``range(n)`` from ``np.random.default_rng(seed)``; each fraction takes its prefix,
    so a smaller fraction's subset is contained in every larger one's.
    """
    perm = np.random.default_rng(seed).permutation(n)
    return {float(f): np.sort(perm[:fraction_size(n, f)]) for f in fractions}


def infer_task(task: str, *label_sets: np.ndarray) -> str:
    """'multiclass' when ``task='auto'`` and every row of every label set has exactly one positive."""
    if task == "auto":
        return "multiclass" if all(is_single_label(y) for y in label_sets if len(y)) else "multilabel"
    if task not in TASKS:
        raise ValueError(f"task must be 'auto', 'multilabel' or 'multiclass', got {task!r}")
    if task == "multiclass" and not all(is_single_label(y) for y in label_sets if len(y)):
        raise ValueError("task='multiclass' needs exactly one positive class per image in every split")
    return task


def loss_per_example(logits: jax.Array, y: jax.Array, task: str) -> jax.Array:
    """[n] loss: mean over classes of BCE-with-logits (multi-label) or softmax CE (multiclass, y one-hot)."""
    if task == "multiclass":
        return optax.softmax_cross_entropy(logits, y)
    return optax.sigmoid_binary_cross_entropy(logits, y).mean(axis=-1)


def masked_mean(v: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(v * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class HeadFit(NamedTuple):
    """Result of :func:`fit_linear_head`."""

    params: dict[str, np.ndarray]   # {"kernel": [w, c], "bias": [c]} of the best-validation epoch
    best_epoch: int                 # 1-based
    epochs_run: int
    best_val_loss: float
    train_losses: list[float]       # per epoch (mean over minibatches)
    val_losses: list[float]


def linear_logits(params, x):
    return x @ params["kernel"] + params["bias"]


def _adamw(lr: float, weight_decay: float, b1: float, b2: float) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnames=("task", "batch", "steps", "hyper"))
def _epoch(params, opt_state, key, x, y, x_val, y_val, *, task: str, batch: int, steps: int, hyper: tuple):
    """One epoch of minibatch AdamW over a fresh permutation, then the validation loss.

    ``hyper`` = (lr, weight_decay, b1, b2), static so that the optimizer is rebuilt inside the trace.
    """
    tx = _adamw(*hyper)
    n = x.shape[0]
    perm = jax.random.permutation(key, n)
    pad = steps * batch - n
    idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(steps, batch)
    mask = jnp.concatenate([jnp.ones((n,)), jnp.zeros((pad,))]).reshape(steps, batch)

    def loss_fn(p, xb, yb, mb):
        return masked_mean(loss_per_example(linear_logits(p, xb), yb, task), mb)

    def step(carry, inp):
        p, s = carry
        ib, mb = inp
        loss, grads = jax.value_and_grad(loss_fn)(p, x[ib], y[ib], mb)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, mask))
    val = jnp.mean(loss_per_example(linear_logits(params, x_val), y_val, task))
    return params, opt_state, jnp.mean(losses), val


def fit_linear_head(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *, task: str,
                    lr: float = 5e-4, weight_decay: float = 1e-6, b1: float = 0.9, b2: float = 0.999,
                    batch_size: int = 48, max_epochs: int = 50, patience: int = 10, seed: int = 0,
                    progress: bool = True, desc: str = "linear probe") -> HeadFit:
    """Trains a linear head with early stopping on the validation loss (see module docstring).

    Args:
        x: train features [n, w]; y: {0, 1} labels [n, c] (one-hot for multiclass).
        x_val, y_val: validation features [m, w] and labels [m, c].
        task: 'multilabel' (BCE) or 'multiclass' (softmax CE).
        lr, weight_decay, b1, b2: AdamW.
        batch_size: minibatch size (<= 0 or >= n: full batch).
        max_epochs, patience: stop after ``patience`` epochs without a lower validation loss.
        seed: minibatch order (epoch e uses fold_in(PRNGKey(seed), e)).
        progress: tqdm bar over epochs.

    Returns:
        HeadFit with the best-validation parameters.
    """
    from tqdm.auto import tqdm
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    x_val, y_val = jnp.asarray(x_val, jnp.float32), jnp.asarray(y_val, jnp.float32)
    n, w = x.shape
    c = y.shape[1]
    batch = n if batch_size <= 0 or batch_size >= n else int(batch_size)
    steps = -(-n // batch)
    hyper = (float(lr), float(weight_decay), float(b1), float(b2))
    tx = _adamw(*hyper)
    params = {"kernel": jnp.zeros((w, c), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}
    opt_state = tx.init(params)
    key = jax.random.PRNGKey(seed)
    best = (float("inf"), params, 0)
    train_losses, val_losses = [], []
    bad = 0
    bar = tqdm(range(1, max_epochs + 1), desc=desc, leave=False, disable=not progress or jax.process_index() != 0)
    for epoch in bar:
        params, opt_state, tr, val = _epoch(params, opt_state, jax.random.fold_in(key, epoch), x, y, x_val, y_val,
                                            task=task, batch=batch, steps=steps, hyper=hyper)
        tr, val = float(tr), float(val)
        train_losses.append(tr)
        val_losses.append(val)
        bar.set_postfix(train=f"{tr:.4f}", val=f"{val:.4f}", refresh=False)
        if val < best[0]:
            best, bad = (val, params, epoch), 0
        else:
            bad += 1
            if bad >= patience:
                break
    bar.close()
    return HeadFit({k: np.asarray(v) for k, v in best[1].items()}, best[2], len(val_losses), best[0],
                   train_losses, val_losses)


def classification_metrics(logits: np.ndarray, y: np.ndarray, task: str,
                           class_names: Sequence[str]) -> dict[str, float]:
    """Test metrics from logits [n, c] and {0, 1} labels [n, c].

    multilabel: ``macro_auroc`` (classes with both label values) and ``auroc/<class>``;
    multiclass: ``accuracy`` (top-1), ``macro_f1``, ``macro_auroc`` (one-vs-rest of the softmax).
    """
    logits = np.asarray(logits, np.float64)
    res: dict[str, float] = {}
    if task == "multiclass":
        truth = y.argmax(axis=1)
        res["accuracy"] = metrics.multiclass_accuracy(logits, truth)
        res["macro_f1"] = metrics.macro_f1(logits, truth, num_classes=len(class_names))
    auc = metrics.macro_auroc(logits, y)
    res["macro_auroc"] = auc.macro
    for c, v in zip(class_names, auc.per_class):
        if np.isfinite(v):
            res[f"auroc/{c}"] = float(v)
    return res


def headline(task: str) -> str:
    """The metric MGCA's tables report for the task."""
    return "accuracy" if task == "multiclass" else "macro_auroc"


def extract_features(run, config, split: str) -> dict[str, np.ndarray]:
    """Frozen ``img_feat`` [n, w] (eval mode) and stored labels [n, all classes] of one split."""
    emb = embed.embed_split(config, run.model, run.variables, run.mesh, run.tokenizer, split, fields=("img_feat",))
    return {"features": emb["img_feat"].astype(np.float32), "labels": emb["labels"], "index": emb["index"],
            "class_names": list(emb["class_names"])}


def standardizer(x_train: np.ndarray):
    """x -> (x - mean) / std with the training set's statistics (std 0 -> 1)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return lambda x: (x - mean) / std


@EVALUATORS.register("linear_probe")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Linear probe at each label fraction (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    d = cfg.data
    feats = {s: extract_features(run, config, getattr(d, f"{s}_split")) for s in ("train", "val", "test")}
    class_names, cols = class_columns(feats["train"]["class_names"], d.class_names)
    ys = {s: binary_labels(f["labels"], cols, d.uncertain_as) for s, f in feats.items()}
    task = infer_task(cfg.get("task", "auto"), *ys.values())
    xs = {s: f["features"] for s, f in feats.items()}
    if cfg.get("standardize", False):
        norm = standardizer(xs["train"])
        xs = {s: norm(x) for s, x in xs.items()}
    subsets = label_fraction_subsets(len(ys["train"]), list(cfg.fractions), int(cfg.seed))
    train_index = feats["train"]["index"]
    res: dict[str, Any] = {
        "protocol/data": info.get("name", ""), "protocol/root": config.data.root, "protocol/task": task,
        "protocol/feature": "img_feat", "protocol/feature_dim": int(xs["train"].shape[1]),
        "protocol/num_classes": len(class_names), "protocol/classes": ", ".join(class_names),
        "protocol/splits": f"{d.train_split}/{d.val_split}/{d.test_split}",
        "protocol/n_train": int(len(ys["train"])), "protocol/n_val": int(len(ys["val"])),
        "protocol/n_test": int(len(ys["test"])), "protocol/seed": int(cfg.seed),
        "protocol/optimizer": (f"AdamW lr {cfg.lr} wd {cfg.weight_decay} batch {cfg.head_batch_size} "
                               f"<= {cfg.epochs} epochs, patience {cfg.patience}"),
        "protocol/standardize": bool(cfg.get("standardize", False)),
    }
    for f, subset in subsets.items():
        name = fraction_name(f)
        rows = np.flatnonzero(np.isin(train_index, subset))
        fit = fit_linear_head(xs["train"][rows], ys["train"][rows], xs["val"], ys["val"], task=task, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, batch_size=cfg.head_batch_size, max_epochs=cfg.epochs,
                              patience=cfg.patience, seed=int(cfg.seed), desc=f"linear probe {name}")
        test = classification_metrics(np.asarray(linear_logits(fit.params, xs["test"])), ys["test"], task,
                                      class_names)
        val = classification_metrics(np.asarray(linear_logits(fit.params, xs["val"])), ys["val"], task,
                                     class_names)
        res.update({f"{name}/{k}": v for k, v in test.items()})
        res[f"{name}/val_{headline(task)}"] = val[headline(task)]
        res[f"{name}/val_loss"] = fit.best_val_loss
        res[f"protocol/{name}/n_train"] = int(len(rows))
        res[f"protocol/{name}/positives"] = ", ".join(str(int(v)) for v in ys["train"][rows].sum(axis=0))
        res[f"protocol/{name}/best_epoch"] = fit.best_epoch
        res[f"protocol/{name}/epochs_run"] = fit.epochs_run
    return res
