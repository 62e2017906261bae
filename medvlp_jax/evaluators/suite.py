"""The suite runner: runs the evaluators an eval config names on one checkpoint and writes
``<workdir>/eval/<name>.json`` and ``eval/results.md`` (a ``| metric | checkpoint | untrained |`` table per
evaluator)."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import ml_collections

from medvlp_jax.evaluators import EVALUATORS, load_evaluators


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
