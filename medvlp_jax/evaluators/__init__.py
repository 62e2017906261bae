"""Downstream evaluators of a pretraining run: the registry, and the package's public API.

This module owns ``EVALUATORS`` and loading it; ``suite.py`` runs a suite and writes its results
(``run_suite``, ``results_markdown``), ``protocol.py`` holds the helpers every evaluator uses to read its data
(``default_data``, ``eval_config``, ``class_columns``, ...). Both are re-exported here: config files, launchers
and notebooks use ``evaluators.run_suite``, ``evaluators.default_data`` and ``evaluators.parse_config_arg``.

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

from medvlp_jax.registry import Registry

EVALUATORS = Registry("evaluator")

# Modules of this package that register nothing: the helpers the evaluators share. Every other module registers
# into EVALUATORS and is imported on first use, so that importing this package stays cheap.
HELPER_MODULES: tuple[str, ...] = ("common", "dense", "embed", "localized", "protocol", "suite")


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


# The public API of the package (defined in the modules that own it; imported last: suite.py uses the registry).
from medvlp_jax.evaluators.protocol import (binary_labels, class_columns, data_info, default_data,  # noqa: E402
                                            eval_config, is_single_label, parse_config_arg)
from medvlp_jax.evaluators.suite import results_markdown, results_name, results_table, run_suite  # noqa: E402

__all__ = ["EVALUATORS", "HELPER_MODULES", "evaluator_modules", "get", "load_evaluators",
           "binary_labels", "class_columns", "data_info", "default_data", "eval_config", "is_single_label",
           "parse_config_arg", "results_markdown", "results_name", "results_table", "run_suite"]
