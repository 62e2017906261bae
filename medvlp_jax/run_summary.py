"""One table row per pretraining run: training loss, end-of-run retrieval and zero-shot, speed and FLOPs.

    rows = [summarize(w) for w in ("runs/convirt_demo", "runs/mgca_demo")]
    print(markdown_table(rows))

Reads only what a run wrote: ``metrics.jsonl`` (losses and steps/s as logged, means over each log interval),
``eval_results.json`` (the end-of-run evaluation, medvlp_jax/evaluators/quick.py), ``eval/quick_untrained.json``
when ``launch/evaluate.py --config=configs/eval/quick.py --untrained`` was run (the same encoders at
initialisation), and a ``launch/benchmark.py`` JSON for the compiled step's FLOPs and median step time.
``suite_table`` tabulates the evaluation suite's headline metrics and ``finding_table`` the grounding pointing
game per finding, each over runs or seed groups (``launch/compare_runs.py --suite`` / ``--findings``).
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional

from medvlp_jax import logging_lib

# (column title, key in the row dict, format)
COLUMNS = (
    ("method", "method", "{}"),
    ("steps", "steps", "{:d}"),
    ("loss first -> last", "loss", "{}"),
    ("R@1 i2t", "R@1", "{:.2%}"),
    ("R@10 i2t", "R@10", "{:.1%}"),
    ("zero-shot AUROC", "auroc", "{:.3f}"),
    ("untrained R@1 / R@10 / AUROC", "untrained", "{}"),
    ("s/step (train)", "s_per_step", "{:.3f}"),
    ("s/step (bench)", "bench_s_per_step", "{:.3f}"),
    ("GFLOP/step", "gflop_per_step", "{:.1f}"),
)


def _read_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def method_name(workdir: str) -> str:
    """The method a run trained (``config.json``), or the workdir's name when that is unreadable."""
    config = _read_json(os.path.join(workdir, "config.json")) or {}
    return config.get("method", {}).get("name", os.path.basename(workdir))


def summarize(workdir: str, benchmark_json: Optional[str] = None) -> dict[str, Any]:
    """The summary row of one run (missing pieces are None).

    Returns keys: method, steps, loss ("first -> last" of the logged train/loss), loss_first, loss_last,
    R@1, R@10, chance_R@1, R@1_same_findings, auroc, untrained (formatted R@1 / R@10 / AUROC or None),
    s_per_step (median over log intervals after the first, which holds the compilation), bench_s_per_step,
    gflop_per_step.
    """
    rows = [r for r in logging_lib.read_metrics(workdir, missing_ok=True) if "train/loss" in r]
    out: dict[str, Any] = {"workdir": workdir, "method": method_name(workdir)}
    out["steps"] = int(rows[-1]["step"]) if rows else None
    out["loss_first"] = rows[0]["train/loss"] if rows else None
    out["loss_last"] = rows[-1]["train/loss"] if rows else None
    out["loss"] = f"{out['loss_first']:.3f} -> {out['loss_last']:.3f}" if rows else None
    rates = [r["perf/steps_per_s"] for r in rows[1:] if r.get("perf/steps_per_s")]
    out["s_per_step"] = 1.0 / statistics.median(rates) if rates else None
    ev = _read_json(os.path.join(workdir, "eval_results.json")) or {}
    out["R@1"] = ev.get("retrieval/i2t/R@1")
    out["R@10"] = ev.get("retrieval/i2t/R@10")
    out["chance_R@1"] = ev.get("retrieval/chance_R@1")
    out["R@1_same_findings"] = ev.get("retrieval_same_findings/i2t/R@1")
    out["auroc"] = ev.get("zero_shot/macro_auroc")
    unt = _read_json(os.path.join(workdir, "eval", "quick_untrained.json"))
    out["untrained"] = None
    if unt:
        parts = [(unt.get("retrieval/i2t/R@1"), "{:.2%}"), (unt.get("retrieval/i2t/R@10"), "{:.1%}"),
                 (unt.get("zero_shot/macro_auroc"), "{:.3f}")]
        out["untrained"] = " / ".join("-" if v is None else fmt.format(v) for v, fmt in parts)
    bench = _read_json(benchmark_json) if benchmark_json else None
    base = (bench or {}).get("base") or {}
    out["bench_s_per_step"] = base.get("step_s")
    flops = base.get("flops_per_step")
    out["gflop_per_step"] = None if flops is None else flops / 1e9
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of summary rows (``COLUMNS``); missing values print as '-'."""
    lines = ["| " + " | ".join(t for t, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    chance = {r["chance_R@1"] for r in rows if r.get("chance_R@1") is not None}
    if chance:
        lines.append("")
        lines.append("Chance R@1 (i2t, strict pairing): " + ", ".join(f"{c:.2%}" for c in sorted(chance)) + ".")
    return "\n".join(lines)


# The headline metric of each evaluation-suite protocol: (row title, eval/<file>.json, key, format).
SUITE_ROWS = (
    ("zero-shot macro AUROC", "zero_shot", "macro_auroc", "{:.3f}"),
    ("retrieval i2t R@1 (same-text duplicates count)", "retrieval", "i2t/R@1", "{:.3f}"),
    ("retrieval i2t R@10", "retrieval", "i2t/R@10", "{:.3f}"),
    ("retrieval class P@10 i2t (single-label images)", "retrieval", "class_i2t/P@10", "{:.3f}"),
    *((f"linear probe macro AUROC, {p} labels", "linear_probe", f"{p}/macro_auroc", "{:.3f}")
      for p in ("1%", "10%", "100%")),
    *((f"fine-tune macro AUROC, {p} labels", "finetune", f"{p}/macro_auroc", "{:.3f}") for p in ("1%", "10%", "100%")),
    *((f"segmentation Dice, {p}", "segmentation", f"{p}/dice", "{:.3f}") for p in ("1%", "10%", "100%")),
    *((f"detection mAP@[.40:.75], {p}", "detection", f"{p}/map", "{:.3f}") for p in ("1%", "10%", "100%")),
    ("grounding pointing game (method's own maps)", "grounding", "pointing_game", "{:.3f}"),
    ("grounding CNR (method's own maps)", "grounding", "cnr", "{:.3f}"),
    ("grounding mIoU (method's own maps)", "grounding", "miou", "{:.3f}"),
    ("grounding pointing game (phrase-patch cosine)", "grounding", "cosine/pointing_game", "{:.3f}"),
    ("grounding CNR (phrase-patch cosine)", "grounding", "cosine/cnr", "{:.3f}"),
    ("grounding mIoU (phrase-patch cosine)", "grounding", "cosine/miou", "{:.3f}"),
    ("grounding pointing game, random-peak chance", "grounding", "pointing_game_chance", "{:.3f}"),
)


def suite_headlines(workdir: str, untrained: bool = False) -> dict[str, Any]:
    """Headline figures of ``launch/evaluate.py --config=configs/eval/suite.py`` for one run.

    Reads ``<workdir>/eval/<protocol>.json`` (``<protocol>_untrained.json`` with ``untrained``). Returns
    {row title: value or None, "seconds": summed protocol/seconds or None}.
    """
    out: dict[str, Any] = {}
    seconds = []
    suffix = "_untrained" if untrained else ""
    for protocol in dict.fromkeys(name for _, name, _, _ in SUITE_ROWS):
        d = _read_json(os.path.join(workdir, "eval", f"{protocol}{suffix}.json"))
        if d is not None and d.get("protocol/seconds") is not None:
            seconds.append(float(d["protocol/seconds"]))
        for title, name, key, _ in SUITE_ROWS:
            if name == protocol:
                out[title] = None if d is None else d.get(key)
    out["seconds"] = sum(seconds) if seconds else None
    return out


def seed_summary(headlines: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over several runs (seeds) of one setting, per ``suite_headlines`` entry.

    Returns {title: (mean, sample standard deviation, number of runs with the figure) or None when no run has
    it}; "seconds" is the mean. The standard deviation is 0.0 for a single run.
    """
    out: dict[str, Any] = {}
    for title in dict.fromkeys(k for h in headlines for k in h):
        values = [float(h[title]) for h in headlines if h.get(title) is not None]
        if title == "seconds":
            out[title] = statistics.mean(values) if values else None
        elif values:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            out[title] = (statistics.mean(values), sd, len(values))
        else:
            out[title] = None
    return out


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):                      # (mean, sd, n) of seed_summary
        mean, sd, n = value
        return fmt.format(mean) if n == 1 else f"{fmt.format(mean)} ± {fmt.format(sd)}"
    return fmt.format(value)


def suite_table(columns: list[tuple[str, dict[str, Any]]]) -> str:
    """A metric x run Markdown table, one (column title, headlines) per column: a run's ``suite_headlines``, or a
    ``seed_summary`` of several (cells "mean ± sample sd")."""
    lines = ["| metric (demo test split) | " + " | ".join(t for t, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for title, _, _, fmt in SUITE_ROWS:
        if all(h.get(title) is None for _, h in columns):
            continue                                   # a protocol none of the columns ran
        cells = [_cell(h.get(title), fmt) for _, h in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    minutes = ["-" if h.get("seconds") is None else f"{h['seconds'] / 60:.1f}" for _, h in columns]
    lines.append("| evaluator minutes (sum of protocol/seconds) | " + " | ".join(minutes) + " |")
    return "\n".join(lines)


# The grounding evaluator's per-finding pointing game (eval/grounding.json): the map kinds it scores.
FINDING_MAPS = {"own": "pointing_game", "cosine": "cosine/pointing_game"}


def finding_pointing_games(workdir: str, untrained: bool = False) -> dict[str, dict[str, Any]]:
    """Per-finding pointing game of one run's ``eval/grounding.json`` (``grounding_untrained.json`` with
    ``untrained``): {finding: {"phrases", "chance", "oracle", "own", "cosine"}} (a value None when absent).

    Raises FileNotFoundError (naming the file and the command that writes it) when the run has no grounding
    results.
    """
    path = os.path.join(workdir, "eval", f"grounding{'_untrained' if untrained else ''}.json")
    d = _read_json(path)
    if d is None:
        raise FileNotFoundError(f"{path} does not exist: run launch/evaluate.py --config=configs/eval/grounding.py "
                                f"--checkpoint={workdir}{' --untrained' if untrained else ''} first")
    prefix = "protocol/num_phrases/"
    out = {}
    for key in d:
        if key.startswith(prefix):
            finding = key[len(prefix):]
            out[finding] = {"phrases": d[key], "chance": d.get(f"pointing_game_chance/{finding}"),
                            "oracle": d.get(f"oracle/pointing_game/{finding}"),
                            **{m: d.get(f"{k}/{finding}") for m, k in FINDING_MAPS.items()}}
    return out


def finding_table(columns: list[tuple[str, list[dict[str, dict[str, Any]]]]], maps=("own", "cosine")) -> str:
    """A finding x (run, map) Markdown table of pointing games, most phrases first.

    columns: (title, [finding_pointing_games of each seed]); each cell is the mean ± sample sd over the seeds.
    The phrase count and the random-peak chance are the same for every run of one evaluation split (a
    ValueError names the first run that differs); the mask oracle is shown once when every run has the same
    one (the same grid), else "varies".
    """
    runs = [(title, r) for title, rs in columns for r in rs]
    if not runs:
        raise ValueError("no runs to tabulate")
    ref_title, ref = runs[0]
    for title, r in runs[1:]:
        for finding in set(ref) | set(r):
            a, b = ref.get(finding), r.get(finding)
            if a is None or b is None or a["phrases"] != b["phrases"] or a["chance"] != b["chance"]:
                raise ValueError(f"{title!r} and {ref_title!r} were not evaluated on the same phrases "
                                 f"(finding {finding!r}): compare runs of one evaluation split")
    heads = [f"{title} {m}" if len(maps) > 1 else title for title, _ in columns for m in maps]
    lines = ["| finding | phrases | chance | mask oracle | " + " | ".join(heads) + " |",
             "|---|" + "---|" * (3 + len(heads))]
    for finding in sorted(ref, key=lambda f: (-ref[f]["phrases"], f)):
        oracles = {r[finding]["oracle"] for _, r in runs}
        oracle = "varies" if len(oracles) > 1 else _cell(ref[finding]["oracle"], "{:.2f}")
        cells = []
        for _, rs in columns:
            for m in maps:
                values = [float(r[finding][m]) for r in rs if r[finding][m] is not None]
                if not values:
                    cells.append("-")
                else:
                    sd = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells.append(_cell((statistics.mean(values), sd, len(values)), "{:.2f}"))
        lines.append(f"| {finding} | {ref[finding]['phrases']} | {_cell(ref[finding]['chance'], '{:.2f}')} | "
                     f"{oracle} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
