"""Helpers every evaluator uses to read its data: the ``cfg.data`` part of the evaluator interface
(``evaluators/__init__.py``), label columns, and the ``configs/eval/<task>.py:<preset>,key=value`` parser."""
from __future__ import annotations

from typing import Any, Optional

import ml_collections

from medvlp_jax import config_lib


def default_data(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``cfg.data`` block of an evaluator config: by default the checkpoint's own data and classes.

    Fields:
        root: prepared TFRecord directory ('' = the run's ``config.data.root``), e.g. ``data/chexpert``.
        train_split, val_split, test_split: split names inside ``root``.
        class_names: () = every class of the data set; else the classes to evaluate, in this order.
        uncertain_as: value a -1 (uncertain) label counts as (0 or 1).
        resize, crop: image preprocessing (0 = the pretraining config's; the encoder expects that crop).
    """
    d = ml_collections.ConfigDict(dict(root="", train_split="train", val_split="validation", test_split="test",
                                       class_names=(), uncertain_as=0, resize=0, crop=0))
    d.update(overrides)
    return d


def eval_config(run, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the run's pretraining config whose ``data`` points at ``cfg.data`` (see ``default_data``).

    ``train.batch_size`` becomes ``cfg.batch_size`` (0: the run's), rounded up to a multiple of the
    number of devices (evaluation batches are split over the whole mesh and padded).
    """
    import jax
    from medvlp_jax.data import schema
    config = ml_collections.ConfigDict(run.config.to_dict())
    data = cfg.get("data", default_data())
    if data.get("root"):
        config.data.root = data.root
    for key in ("resize", "crop"):
        if data.get(key):
            config.data[key] = int(data[key])
    if config.data.crop > config.data.resize:
        raise ValueError(f"eval data crop {config.data.crop} > resize {config.data.resize}")
    schema.read_info(config.data.root)  # a clear error when the data set was never prepared
    n_dev = jax.device_count()
    batch = int(cfg.get("batch_size", 0) or run.config.train.batch_size)
    config.train.batch_size = -(-batch // n_dev) * n_dev
    return config


def data_info(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``dataset_info.json`` of the evaluation data (name, class_names, splits)."""
    from medvlp_jax.data import schema
    return schema.read_info(config.data.root)


def class_columns(all_names, wanted) -> tuple[list[str], list[int]]:
    """(class names, label columns) of the classes to evaluate; ``wanted`` () = all of them."""
    all_names = list(all_names)
    if not wanted:
        return all_names, list(range(len(all_names)))
    missing = [c for c in wanted if c not in all_names]
    if missing:
        raise KeyError(f"classes {missing} are not in the data set; it has {all_names}")
    return list(wanted), [all_names.index(c) for c in wanted]


def binary_labels(labels, columns, uncertain_as: int = 0):
    """[n, c] {0, 1} int labels from stored labels (1 / 0 / -1 uncertain) [n, all classes]."""
    import numpy as np
    y = np.asarray(labels)[:, list(columns)]
    if uncertain_as not in (0, 1):
        raise ValueError(f"data.uncertain_as must be 0 or 1, got {uncertain_as!r}")
    return np.where(y < 0, uncertain_as, y > 0).astype(np.int64)


def is_single_label(y) -> bool:
    """True when every row has exactly one positive among >= 2 columns (a multiclass data set)."""
    import numpy as np
    y = np.asarray(y)
    return y.ndim == 2 and y.shape[1] >= 2 and y.shape[0] > 0 and bool(np.all(y.sum(axis=1) == 1))


def parse_config_arg(arg: Optional[str], presets: tuple[str, ...], **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``configs/eval/<task>.py:<preset>,key=value`` (e.g. ``chexpert,root=/data/chexpert``).

    Returns ConfigDict(preset=<preset or presets[0]>, **defaults with the key=value pairs applied).
    """
    out = dict(preset=presets[0], **defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in out or key == "preset":
                known = sorted(k for k in out if k != "preset")
                raise ValueError(f"unknown eval config argument {key!r}; known: {known}")
            out[key] = config_lib.parse_value(key, out[key], value)
        elif part in presets:
            out["preset"] = part
        else:
            raise ValueError(f"unknown eval preset {part!r}; known: {list(presets)}")
    return ml_collections.ConfigDict(out)
