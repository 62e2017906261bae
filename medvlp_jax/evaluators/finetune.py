"""Full fine-tuning: the whole image encoder plus a linear head, trained end to end.

Same data, label fractions (nested subsets of the training split's example indices drawn with
``cfg.seed``: ``linear_probe.label_fraction_subsets``, so both evaluators see the same labelled examples),
tasks and metrics as the linear probe (``linear_probe`` module docstring). Differences:

* The image tower (``config.model.image``, pretrained weights from the checkpoint) is trained in train mode
  (BatchNorm statistics updated for ResNets) with the head on its pre-projection feature ``img_feat``;
  the text tower and projection heads are not used.
* Images stream from the TFRecords with the pretraining augmentation (random crop of the resized image,
  optional flip, seeded per (seed, epoch, example)); the training stream repeats the subset, so a subset
  smaller than one batch fills the batch with repeats. One epoch = ceil(subset / batch) steps.
* AdamW (``cfg.lr``, ``cfg.weight_decay``), constant learning rate, jitted data-parallel step over the run's
  mesh; validation loss after each epoch, early stopping with ``cfg.patience``, the best-validation weights
  are tested.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.data.fields import read_split_fields
from medvlp_jax.evaluators import EVALUATORS
from medvlp_jax.evaluators.protocol import binary_labels, class_columns, data_info, eval_config
from medvlp_jax.evaluators import linear_probe as lp


def train_stream(data_cfg, split: str, keep_index: np.ndarray, *, local_batch: int, seed: int):
    """Infinite tf.data stream of augmented training batches over the examples whose ``index`` is kept.

    Every host reads all shards and keeps the kept examples whose rank in ``keep_index`` is its
    process index modulo the process count (all of them when the subset is smaller than the process
    count), so no host is left without examples. Records are filtered on their index before decoding.

    Returns:
        dataset of {"image" [b, crop, crop, ch], "labels" [b, classes], "index" [b]}.
    """
    import os
    from medvlp_jax.data import decode, pipeline, schema
    tf = pipeline.import_tf()
    info = schema.read_info(data_cfg.root)
    n_split = int(info["splits"][split]["num_examples"])
    pc, pi = jax.process_count(), jax.process_index()
    keep = np.zeros(n_split, bool)
    keep_index = np.sort(np.asarray(keep_index, np.int64))
    mine = keep_index if len(keep_index) < pc else keep_index[pi::pc]
    keep[mine] = True
    keep_t = tf.constant(keep)
    files = [os.path.join(data_cfg.root, s["file"]) for s in info["splits"][split]["shards"]]
    spec = schema.feature_spec(len(info["class_names"]))
    index_spec = {"index": spec["index"]}
    full_spec = {k: spec[k] for k in ("index", "image", "labels")}
    buffer = max(1, min(len(mine), int(data_cfg.get("shuffle_buffer", 1024))))
    base = tf.data.TFRecordDataset(files).filter(
        lambda r: tf.gather(keep_t, tf.io.parse_single_example(r, index_spec)["index"]))

    def epoch_ds(epoch):
        def parse(r):
            ex = tf.io.parse_single_example(r, full_spec)
            s = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + epoch, ex["index"]])
            img = decode.decode_image(tf, ex["image"], resize=data_cfg.resize, crop=data_cfg.crop,
                                        channels=data_cfg.channels, train=True, seed=s,
                                        random_flip=data_cfg.get("random_flip", False))
            return {"image": img, "labels": ex["labels"], "index": tf.cast(ex["index"], tf.int32)}
        return base.shuffle(buffer, seed=seed * 7919 + epoch, reshuffle_each_iteration=False).map(parse)

    ds = tf.data.Dataset.range(0, 2 ** 40).flat_map(epoch_ds)
    return ds.batch(local_batch, drop_remainder=True).prefetch(-1)


def image_variables(run) -> dict[str, Any]:
    """The image tower's variables from the run's encoder variables: {"params": ..., other collections}."""
    out = {"params": run.variables["params"]["image"]}
    for col, tree in run.variables.items():
        if col != "params" and isinstance(tree, dict) and "image" in tree:
            out[col] = tree["image"]
    return out


def make_steps(tower, task: str, tx: optax.GradientTransformation, mesh):
    """(train_step, eval_logits) jitted functions for tower + linear head."""
    rep = sharding_lib.replicated(mesh)

    def forward(params, extra, images, train):
        variables = {"params": params["image"], **extra}
        if train and extra:
            out, new_extra = tower.apply(variables, images, True, mutable=list(extra))
        else:
            out, new_extra = tower.apply(variables, images, train), extra
        feat = out["cls"].astype(jnp.float32)
        return lp.linear_logits(params["head"], feat), new_extra

    def train_step(params, extra, opt_state, batch):
        def loss_fn(p):
            logits, new_extra = forward(p, extra, batch["image"], True)
            loss = lp.masked_mean(lp.loss_per_example(logits, batch["labels"], task), batch["valid"])
            return loss, new_extra
        (loss, new_extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_extra, opt_state, loss

    def eval_logits(params, extra, images):
        return forward(params, extra, images, False)[0]

    return jax.jit(train_step), jax.jit(eval_logits, out_shardings=rep)


def predict_split(eval_logits, params, extra, config, split: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, c], stored labels [n, classes]) over a split's valid rows (eval preprocessing)."""
    from medvlp_jax.data import pipeline
    from medvlp_jax.evaluators.embed import _gather
    pc, pi = jax.process_count(), jax.process_index()
    source, _, _ = pipeline.build_eval_dataset(config.data, split, local_batch=config.train.batch_size // pc,
                                               process_index=pi, process_count=pc)
    logits, labels = [], []
    for raw in source.dataset.as_numpy_iterator():
        batch = sharding_lib.to_global({"image": raw["image"].astype(np.float32),
                                        "labels": raw["labels"].astype(np.float32),
                                        "valid": np.asarray(raw["valid"], bool)}, mesh)
        out = np.asarray(jax.device_get(eval_logits(params, extra, batch["image"])))
        valid = np.asarray(jax.device_get(_gather(batch["valid"])))
        logits.append(out[valid])
        labels.append(np.asarray(jax.device_get(_gather(batch["labels"])))[valid])
    return np.concatenate(logits), np.concatenate(labels)


def finetune_fraction(run, config, cfg, subset: np.ndarray, cols, task: str, num_classes: int, tower, tx, steps,
                      desc: str) -> dict[str, Any]:
    """Fine-tunes a fresh copy of the pretrained image tower + zero head on ``subset``.

    Returns:
        {"best_epoch", "epochs_run", "val_loss", "steps_per_epoch", "train_losses", "val_losses" (per epoch),
         "val": (logits [n, c], labels [n, c]), "test": (logits, labels)}.
    """
    from tqdm.auto import tqdm
    mesh = run.mesh
    d = cfg.data
    iv = image_variables(run)
    extra = {k: v for k, v in iv.items() if k != "params"}
    # The head reads img_feat; its width comes from one abstract forward.
    feat_dim = jax.eval_shape(lambda v, x: tower.apply(v, x, False)["cls"], iv,
                              jax.ShapeDtypeStruct((1, config.data.crop, config.data.crop, config.data.channels),
                                                   jnp.float32)).shape[-1]
    rep = sharding_lib.replicated(mesh)
    head = jax.device_put({"kernel": jnp.zeros((feat_dim, num_classes), jnp.float32),
                           "bias": jnp.zeros((num_classes,), jnp.float32)}, rep)
    params = {"image": iv["params"], "head": head}
    opt_state = jax.jit(tx.init)(params)
    train_step, eval_logits = steps

    global_batch = config.train.batch_size
    steps_per_epoch = max(1, -(-len(subset) // global_batch))
    ds = train_stream(config.data, d.train_split, subset, local_batch=global_batch // jax.process_count(),
                      seed=int(cfg.seed))
    it = ds.as_numpy_iterator()

    def val_loss(p, e):
        logits, labels = predict_split(eval_logits, p, e, config, d.val_split, mesh)
        y = binary_labels(labels, cols, d.uncertain_as)
        return float(jnp.mean(lp.loss_per_example(jnp.asarray(logits), jnp.asarray(y, jnp.float32), task)))

    best = (float("inf"), params, extra, 0)
    bad, epochs_run = 0, 0
    train_losses, val_losses = [], []
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, leave=False, disable=jax.process_index() != 0)
    for epoch in range(1, cfg.epochs + 1):
        losses = []
        for _ in range(steps_per_epoch):
            raw = next(it)
            y = binary_labels(raw["labels"], cols, d.uncertain_as).astype(np.float32)
            batch = sharding_lib.to_global({"image": raw["image"].astype(np.float32), "labels": y,
                                            "valid": np.ones(len(y), bool)}, mesh)
            params, extra, opt_state, loss = train_step(params, extra, opt_state, batch)
            losses.append(loss)
            bar.update(1)
        epochs_run = epoch
        v = val_loss(params, extra)
        train_losses.append(float(np.mean(jax.device_get(losses))))
        val_losses.append(v)
        bar.set_postfix(train=f"{train_losses[-1]:.4f}", val=f"{v:.4f}", refresh=False)
        if v < best[0]:
            best, bad = (v, params, extra, epoch), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    bar.close()
    _, params, extra, best_epoch = best
    out: dict[str, Any] = {"best_epoch": best_epoch, "epochs_run": epochs_run, "val_loss": best[0],
                           "steps_per_epoch": steps_per_epoch, "train_losses": train_losses,
                           "val_losses": val_losses}
    for split_name, split in (("val", d.val_split), ("test", d.test_split)):
        logits, labels = predict_split(eval_logits, params, extra, config, split, mesh)
        out[split_name] = (logits, binary_labels(labels, cols, d.uncertain_as))
    return out


@EVALUATORS.register("finetune")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """End-to-end fine-tuning at each label fraction (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    d = cfg.data
    stored = {s: read_split_fields(config.data.root, getattr(d, f"{s}_split"), ("index", "labels"))
              for s in ("train", "val", "test")}
    class_names, cols = class_columns(info["class_names"], d.class_names)
    ys = {s: binary_labels(f["labels"], cols, d.uncertain_as) for s, f in stored.items()}
    task = lp.infer_task(cfg.get("task", "auto"), *ys.values())
    n_train = len(ys["train"])
    subsets = lp.label_fraction_subsets(n_train, list(cfg.fractions), int(cfg.seed))
    res: dict[str, Any] = {
        "protocol/data": info.get("name", ""), "protocol/root": config.data.root, "protocol/task": task,
        "protocol/num_classes": len(class_names), "protocol/classes": ", ".join(class_names),
        "protocol/splits": f"{d.train_split}/{d.val_split}/{d.test_split}",
        "protocol/n_train": n_train, "protocol/n_val": int(len(ys["val"])), "protocol/n_test": int(len(ys["test"])),
        "protocol/seed": int(cfg.seed), "protocol/batch_size": int(config.train.batch_size),
        "protocol/optimizer": (f"AdamW lr {cfg.lr} wd {cfg.weight_decay} (constant), <= {cfg.epochs} epochs, "
                               f"patience {cfg.patience}"),
        "protocol/image_size": f"resize {config.data.resize}, crop {config.data.crop}",
    }
    from medvlp_jax.models.dual_encoder import build_image_tower
    tower = build_image_tower(run.config.model)
    tx = optax.adamw(cfg.lr, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay)
    steps = make_steps(tower, task, tx, run.mesh)   # compiled once, shared by the fractions
    by_index = {s: dict(zip(f["index"].tolist(), range(len(f["index"])))) for s, f in stored.items()}
    for f, subset in subsets.items():
        name = lp.fraction_name(f)
        out = finetune_fraction(run, config, cfg, subset, cols, task, len(class_names), tower, tx, steps,
                                desc=f"fine-tune {name}")
        test = lp.classification_metrics(*out["test"], task, class_names)
        val = lp.classification_metrics(*out["val"], task, class_names)
        res.update({f"{name}/{k}": v for k, v in test.items()})
        res[f"{name}/val_{lp.headline(task)}"] = val[lp.headline(task)]
        res[f"{name}/val_loss"] = out["val_loss"]
        rows = [by_index["train"][int(i)] for i in subset]
        res[f"protocol/{name}/n_train"] = int(len(subset))
        res[f"protocol/{name}/positives"] = ", ".join(str(int(v)) for v in ys["train"][rows].sum(axis=0))
        res[f"protocol/{name}/best_epoch"] = out["best_epoch"]
        res[f"protocol/{name}/epochs_run"] = out["epochs_run"]
        res[f"protocol/{name}/steps_per_epoch"] = out["steps_per_epoch"]
        res[f"protocol/{name}/train_losses"] = ", ".join(f"{v:.4f}" for v in out["train_losses"])
        res[f"protocol/{name}/val_losses"] = ", ".join(f"{v:.4f}" for v in out["val_losses"])
    return res
