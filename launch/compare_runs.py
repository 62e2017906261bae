"""A Markdown table comparing pretraining runs: loss, end-of-run R@1 / zero-shot AUROC, untrained baseline, speed.

  python launch/compare_runs.py runs/convirt_demo runs/gloria_demo runs/mgca_demo
  python launch/compare_runs.py runs/*_demo --benchmarks=runs/benchmarks --out=docs/demo_results.md
  python launch/compare_runs.py runs/convirt_demo runs/mgca_demo --suite --untrained=runs/convirt_demo

With --suite, the table is the evaluation suite's headline metrics (one column per run, from
``launch/evaluate.py --config=configs/eval/suite.py:demo --checkpoint=<run>``); --untrained=<run> adds the column
of that run's ``--untrained`` suite (the same architecture at initialisation); repeat it for several.
--group=LABEL=<run>,<run>,... makes one column of several runs of one setting (seeds): "mean ± sample sd" per
metric (repeatable; --untrained_group likewise for their untrained suites); protocols no column ran are left out:

  python launch/compare_runs.py --suite --group=convirt=runs/convirt_s0,runs/convirt_s1,runs/convirt_s2 \
      --group=gloria=runs/gloria_s0,runs/gloria_s1,runs/gloria_s2 --untrained_group=untrained=runs/convirt_s0

With --findings=own|cosine|both, the table is the grounding evaluator's pointing game per finding instead (rows:
findings, most phrases first, with the random-peak chance and the mask oracle; columns: the runs and groups, the
method's own maps, the phrase-patch cosine maps or both), from ``eval/grounding.json`` (``--untrained_group``:
``grounding_untrained.json``):

  python launch/compare_runs.py --findings=both --group=plan=runs/plan_s0,runs/plan_s1,runs/plan_s2 \
      --group=convirt=runs/convirt_s0,runs/convirt_s1,runs/convirt_s2 --untrained_group=untrained=runs/plan_s0

For the untrained column, first run ``python launch/evaluate.py --config=configs/eval/quick.py
--checkpoint=<run> --untrained``; for FLOPs, ``python launch/benchmark.py --config=configs/<method>.py:demo``
(its JSON, runs/benchmarks/<method>_<variant>_<platform>.json, is found with --benchmarks). See
medvlp_jax/run_summary.py for what each column is.
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medvlp_jax import run_summary  # noqa: E402


def _benchmark_for(workdir: str, bench_dir: str | None) -> str | None:
    if not bench_dir:
        return None
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    hits = sorted(glob.glob(os.path.join(bench_dir, f"{config['method']['name']}_{config.get('variant', '')}_*.json")))
    return hits[0] if hits else None


def _parse_groups(specs: list[str]):
    """[(label, [workdir, ...])] from "LABEL=<run>,<run>" strings, or None after printing an error line."""
    out = []
    for spec in specs:
        label, sep, runs = spec.partition("=")
        workdirs = [w for w in runs.split(",") if w]
        if not sep or not label or not workdirs:
            print(f"error: --group/--untrained_group wants LABEL=<run>,<run>,..., got {spec!r}", file=sys.stderr)
            return None
        out.append((label, workdirs))
    return out


def main(argv=None) -> int:
    from medvlp_jax.app import ArgumentParser
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="*", help="pretraining workdirs")
    p.add_argument("--benchmarks", default=None, help="directory of launch/benchmark.py JSON files")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--suite", action="store_true", help="tabulate the evaluation suite's headline metrics")
    p.add_argument("--untrained", action="append", default=[],
                   help="with --suite: add this run's untrained-suite column (repeatable)")
    p.add_argument("--group", action="append", default=[],
                   help="with --suite: LABEL=<run>,<run>,... one column, mean ± sd over the runs (repeatable)")
    p.add_argument("--untrained_group", action="append", default=[],
                   help="with --suite: LABEL=<run>,... one column over those runs' untrained suites (repeatable)")
    p.add_argument("--findings", default=None, choices=("own", "cosine", "both"),
                   help="tabulate the grounding pointing game per finding: the own maps, cosine maps or both")
    a = p.parse_args(argv)
    groups, untrained_groups = _parse_groups(a.group), _parse_groups(a.untrained_group)
    if groups is None or untrained_groups is None:
        return 2
    grouped = [w for _, ws in groups + untrained_groups for w in ws]
    if not a.workdirs and not grouped:
        print("error: name at least one workdir or --group", file=sys.stderr)
        return 2
    if grouped and not (a.suite or a.findings):
        print("error: --group and --untrained_group need --suite or --findings", file=sys.stderr)
        return 2
    if a.suite and a.findings:
        print("error: --suite and --findings are two different tables: pick one", file=sys.stderr)
        return 2
    for w in a.workdirs + a.untrained + grouped:
        if not os.path.exists(os.path.join(w, "config.json")):
            print(f"error: {w!r} is not a pretraining workdir (no config.json)", file=sys.stderr)
            return 2
    if a.untrained and not (a.suite or a.findings):
        print("error: --untrained needs --suite or --findings", file=sys.stderr)
        return 2
    if a.findings:
        maps = ("own", "cosine") if a.findings == "both" else (a.findings,)
        try:
            columns = [(run_summary.method_name(w), [run_summary.finding_pointing_games(w)]) for w in a.workdirs]
            columns += [(f"untrained ({run_summary.method_name(w)} arch.)",
                         [run_summary.finding_pointing_games(w, untrained=True)]) for w in a.untrained]
            columns += [(f"{label} (n={len(ws)})", [run_summary.finding_pointing_games(w) for w in ws])
                        for label, ws in groups]
            columns += [(f"{label} (n={len(ws)})", [run_summary.finding_pointing_games(w, untrained=True) for w in ws])
                        for label, ws in untrained_groups]
            md = run_summary.finding_table(columns, maps)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif a.suite:
        columns = [(run_summary.method_name(w), run_summary.suite_headlines(w)) for w in a.workdirs]
        columns += [(f"untrained ({run_summary.method_name(w)} arch.)", run_summary.suite_headlines(w, untrained=True))
                    for w in a.untrained]
        columns += [(f"{label} (n={len(ws)})", run_summary.seed_summary([run_summary.suite_headlines(w) for w in ws]))
                    for label, ws in groups]
        columns += [(f"{label} (n={len(ws)})",
                     run_summary.seed_summary([run_summary.suite_headlines(w, untrained=True) for w in ws]))
                    for label, ws in untrained_groups]
        empty = [t for t, h in columns if h["seconds"] is None]
        if empty:
            print(f"error: no evaluation-suite results (eval/*.json) for: {', '.join(empty)}; run launch/evaluate.py "
                  "--config=configs/eval/suite.py:demo --checkpoint=<run> first", file=sys.stderr)
            return 2
        md = run_summary.suite_table(columns)
    else:
        rows = [run_summary.summarize(w, _benchmark_for(w, a.benchmarks)) for w in a.workdirs]
        md = run_summary.markdown_table(rows)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
