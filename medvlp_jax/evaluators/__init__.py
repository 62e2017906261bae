"""Downstream evaluators of a pretraining run, and the suite runner that writes their results.

Evaluator interface (every evaluator module follows it)::

    from medvlp_jax.evaluators import EVALUATORS
    from medvlp_jax.evaluators.common import Run

    @EVALUATORS.register("zero_shot")          # name == module name == key of its sub-config
    def evaluate(run: Run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
        ...

* ``run`` is ``common.load_run(checkpoint_workdir, untrained=...)``: pretraining config, model,
  encoder variables, mesh, tokenizer.
* ``cfg`` is the evaluator's own sub-config, ``eval_cfg[<name>]`` (see configs/eval/<name>.py). Shared
  fields (``default_data`` gives the data part): ``cfg.data.root`` ('' = the run's own prepared data),
  ``cfg.data.{train,val,test}_split``, ``cfg.data.class_names`` (() = all of the data set's classes, else a
  subset in that order), ``cfg.data.uncertain_as`` (what a -1 label counts as), ``cfg.data.resize`` /
  ``crop`` (0 = as in pretraining), ``cfg.batch_size`` (0 = the run's) and ``cfg.seed``.
  ``eval_config(run, cfg)`` turns them into a pretraining-style config whose ``data`` points at the
  evaluation data (what ``embed.embed_split`` and ``pipeline.build_eval_dataset`` take); ``class_columns``
  maps ``cfg.data.class_names`` to label columns.
* It returns a flat dict, keys ``"<metric>"`` or ``"<group>/<metric>"`` (e.g. ``"macro_auroc"``,
  ``"auroc/Edema"``, ``"1%/macro_auroc"``), values float (metrics) or int/str (protocol facts under
  ``"protocol/..."``: sizes, fractions, seeds, splits). Everything must be JSON-serialisable.
  ``run_suite`` writes it unchanged to ``<workdir>/eval/<name>.json`` and tabulates the floats.

Adding an evaluator: write ``medvlp_jax/evaluators/<name>.py`` with the decorated ``evaluate``. Every module of
this package except the shared helpers (``HELPER_MODULES``) is an evaluator and is imported on first use of the
registry, so nothing else needs an edit.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import time
from typing import Any, Optional

import ml_collections

from medvlp_jax import config_lib
from medvlp_jax.registry import Registry

EVALUATORS = Registry("evaluator")

# Modules of this package that register nothing: the helpers the evaluators share. Every other module registers
# into EVALUATORS and is imported on first use, so that importing this package stays cheap.
HELPER_MODULES: tuple[str, ...] = ("common", "dense", "embed", "localized")


def evaluator_modules() -> list[str]:
    """The names of this package's evaluator modules (every module but ``HELPER_MODULES``), sorted."""
    import pkgutil
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in HELPER_MODULES)

_loaded = False


def load_evaluators() -> Registry:
    """Imports every evaluator module (once) and returns the filled registry."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in evaluator_modules():
            importlib.import_module(f"{__name__}.{name}")
    return EVALUATORS


def get(name: str):
    """The ``evaluate`` function registered as ``name``."""
    return load_evaluators().get(name)


def results_name(name: str, untrained: bool) -> str:
    return f"{name}_untrained" if untrained else name


def run_suite(eval_cfg: ml_collections.ConfigDict, workdir: str, untrained: bool = False,
              run: Optional[Any] = None, step: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """Runs ``eval_cfg.evaluators`` on the checkpoint in ``workdir``; writes eval/<name>.json + eval/results.md.

    Args:
        eval_cfg: an eval config (configs/eval/*.py): ``evaluators`` (names) and one sub-config per name.
        workdir: the pretraining workdir (its latest checkpoint is evaluated).
        untrained: evaluate the same architecture at initialisation (baseline); results go to
            ``eval/<name>_untrained.json``.
        run: an already loaded ``Run`` (tests, notebooks); loaded from ``workdir`` when None.
        step: the checkpoint step to evaluate (None: the newest that restores).

    Returns:
        {evaluator name: its results dict}.
    """
    import jax
    from medvlp_jax.evaluators import common

    load_evaluators()
    names = list(eval_cfg.evaluators)
    for name in names:
        EVALUATORS.get(name)  # fail on a typo before the (slow) checkpoint restore
        if name not in eval_cfg:
            raise KeyError(f"eval config has no sub-config for evaluator {name!r}")
    out_dir = os.path.join(workdir, "eval")
    is_main = jax.process_index() == 0
    if is_main:                  # before the (slow) restore and evaluation: results are never computed in vain
        from medvlp_jax.config_lib import check_output_dir
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"--checkpoint={workdir} is not a directory; pass the --workdir of a pretraining "
                                    f"run (the directory holding its config.json and checkpoints/)")
        check_output_dir(out_dir, "the results directory <--checkpoint>/eval")
    if run is None:
        run = common.load_run(workdir, untrained=untrained, step=step)
    all_results: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.time()
        res = dict(EVALUATORS.get(name)(run, eval_cfg[name]))
        res["protocol/checkpoint_step"] = -1 if run.step is None else int(run.step)
        res["protocol/untrained"] = bool(untrained)
        res["protocol/seconds"] = round(time.time() - t0, 2)
        all_results[name] = res
        if is_main:
            path = os.path.join(out_dir, results_name(name, untrained) + ".json")
            with open(path, "w") as f:
                json.dump(_jsonable(res), f, indent=2, sort_keys=True)
    if is_main:
        table = results_table(out_dir)   # every result file in eval/, so separate runs add up to one table
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(table)
        print(table)
    return all_results


_SUMMARY_FACTS = ("data", "root", "split", "splits", "task", "num_images", "n_train", "n_val", "n_test", "seed",
                  "checkpoint_step")


def _is_metric(key: str, value: Any) -> bool:
    return not key.startswith("protocol/") and isinstance(value, (int, float)) and not isinstance(value, bool)


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one section per evaluator with a ``| metric | checkpoint | untrained |`` table.

    Args:
        results: {results name: results dict}; a name ``<evaluator>_untrained`` becomes the untrained
            column of ``<evaluator>``. Protocol facts (``protocol/...``) are summarised on one line.
    """
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for name, res in results.items():
        base, col = (name[:-len("_untrained")], "untrained") if name.endswith("_untrained") else (name, "checkpoint")
        groups.setdefault(base, {})[col] = res
    lines = []
    for base in sorted(groups):
        cols = [c for c in ("checkpoint", "untrained") if c in groups[base]]
        first = groups[base][cols[0]]
        facts = [f"{k}={first['protocol/' + k]}" for k in _SUMMARY_FACTS if f"protocol/{k}" in first]
        lines += [f"### {base}", "", f"_{', '.join(facts)}_" if facts else "", "",
                  "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        keys = sorted({k for c in cols for k, v in groups[base][c].items() if _is_metric(k, v)})
        for k in keys:
            vals = [groups[base][c].get(k) for c in cols]
            lines.append(f"| {k} | " + " | ".join("" if v is None else _fmt(v) for v in vals) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def results_table(out_dir: str) -> str:
    """Markdown of every eval/<name>.json in ``out_dir`` (separate runs add up to one document)."""
    results = {}
    for fname in sorted(os.listdir(out_dir)):
        if fname.endswith(".json"):
            with open(os.path.join(out_dir, fname)) as f:
                results[fname[:-len(".json")]] = json.load(f)
    return results_markdown(results)


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _jsonable(obj):
    """numpy scalars -> Python, NaN kept (json writes NaN, which json.load reads back)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------------------
# Helpers every evaluator uses to read its data (the ``cfg.data`` part of the interface).

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
