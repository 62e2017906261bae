"""run_summary / launch/compare_runs.py on a hand-written workdir: every column read from the right file."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _workdir(tmp_path, with_untrained=True):
    w = tmp_path / "convirt_demo"
    (w / "eval").mkdir(parents=True)
    (w / "config.json").write_text(json.dumps({"method": {"name": "convirt"}, "variant": "demo"}))
    rows = [{"step": 25, "train/loss": 4.1, "perf/steps_per_s": 0.5},      # first interval: compilation
            {"step": 50, "train/loss": 3.5, "perf/steps_per_s": 2.0},
            {"step": 75, "train/loss": 3.0, "perf/steps_per_s": 4.0},
            {"step": 75, "eval/other": 1.0}]                                  # rows without train/loss ignored
    (w / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (w / "eval_results.json").write_text(json.dumps({
        "retrieval/i2t/R@1": 0.05, "retrieval/i2t/R@10": 0.3, "retrieval/chance_R@1": 0.0025,
        "retrieval_same_findings/i2t/R@1": 0.4, "zero_shot/macro_auroc": 0.8}))
    if with_untrained:
        (w / "eval" / "quick_untrained.json").write_text(json.dumps({
            "retrieval/i2t/R@1": 0.0025, "retrieval/i2t/R@10": 0.2, "zero_shot/macro_auroc": 0.5}))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "convirt_demo_cpu.json").write_text(json.dumps({"base": {"step_s": 0.4, "flops_per_step": 2.5e10}}))
    return str(w), str(bench)


def test_summarize_reads_every_column(tmp_path):
    from medvlp_jax import run_summary
    w, bench = _workdir(tmp_path)
    r = run_summary.summarize(w, os.path.join(bench, "convirt_demo_cpu.json"))
    assert r["method"] == "convirt" and r["steps"] == 75
    assert r["loss"] == "4.100 -> 3.000"
    assert r["s_per_step"] == pytest.approx(1 / 3.0)          # median of 2 and 4 steps/s, first interval left out
    assert (r["R@1"], r["R@10"], r["R@1_same_findings"], r["auroc"]) == (0.05, 0.3, 0.4, 0.8)
    assert r["untrained"] == "0.25% / 20.0% / 0.500"
    assert r["bench_s_per_step"] == 0.4 and r["gflop_per_step"] == pytest.approx(25.0)
    md = run_summary.markdown_table([r])
    assert "| convirt | 75 | 4.100 -> 3.000 | 5.00% | 30.0% | 0.800 | 0.25% / 20.0% / 0.500 |" in md
    assert "Chance R@1 (i2t, strict pairing): 0.25%." in md


def test_missing_pieces_print_as_dashes(tmp_path):
    from medvlp_jax import run_summary
    w, _ = _workdir(tmp_path, with_untrained=False)
    r = run_summary.summarize(w)
    assert r["untrained"] is None and r["gflop_per_step"] is None
    assert "| - | 0.333 | - | - |" in run_summary.markdown_table([r])


def test_cli(tmp_path):
    w, bench = _workdir(tmp_path)
    out = tmp_path / "table.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "compare_runs.py"), w, f"--benchmarks={bench}",
                        f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| convirt |" in r.stdout and "| 25.0 |" in r.stdout and out.read_text().strip() == r.stdout.strip()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "compare_runs.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no config.json" in r.stderr


def _suite_files(w, suffix="", scale=1.0):
    """Hand-written eval/<protocol><suffix>.json files: each headline value and 60 s per protocol."""
    files = {
        "zero_shot": {"macro_auroc": 0.7 * scale, "auroc/nodule": 0.1},
        "retrieval": {"i2t/R@1": 0.04 * scale, "i2t/R@10": 0.2, "class_i2t/P@10": 0.5, "t2i/R@1": 0.9},
        "linear_probe": {"1%/macro_auroc": 0.45, "10%/macro_auroc": 0.75, "100%/macro_auroc": 0.85},
        "finetune": {"1%/macro_auroc": 0.4, "10%/macro_auroc": 0.6},                    # 100% missing
        "segmentation": {"1%/dice": 0.5, "10%/dice": 0.6, "100%/dice": 0.7, "1%/val_dice": 0.99},
        "detection": {"1%/map": 0.0, "10%/map": 0.08, "100%/map": 0.3, "100%/ap50": 0.99},
        "grounding": {"pointing_game": 0.125, "cnr": 0.5, "miou": 0.13},
    }
    for name, d in files.items():
        d["protocol/seconds"] = 60.0
        (w / "eval" / f"{name}{suffix}.json").write_text(json.dumps(d))


def test_suite_headlines_and_table(tmp_path):
    from medvlp_jax import run_summary
    w, _ = _workdir(tmp_path)
    _suite_files(tmp_path / "convirt_demo")
    _suite_files(tmp_path / "convirt_demo", suffix="_untrained", scale=0.5)
    h = run_summary.suite_headlines(w)
    assert h["zero-shot macro AUROC"] == 0.7 and h["retrieval i2t R@1 (same-text duplicates count)"] == 0.04
    assert h["detection mAP@[.40:.75], 100%"] == 0.3 and h["grounding pointing game (method's own maps)"] == 0.125
    assert h["fine-tune macro AUROC, 100% labels"] is None
    assert h["seconds"] == pytest.approx(7 * 60.0)
    u = run_summary.suite_headlines(w, untrained=True)
    assert u["zero-shot macro AUROC"] == pytest.approx(0.35)
    md = run_summary.suite_table([("convirt", h), ("untrained", u)])
    assert "| zero-shot macro AUROC | 0.700 | 0.350 |" in md
    assert "fine-tune macro AUROC, 100% labels" not in md          # no column has it: the row is left out
    assert "| evaluator minutes (sum of protocol/seconds) | 7.0 | 7.0 |" in md
    present = [t for t, _, _, _ in run_summary.SUITE_ROWS if h.get(t) is not None or u.get(t) is not None]
    assert len(md.splitlines()) == 2 + len(present) + 1 and len(present) == 18  # all but fine-tune 100%, cosine x 3, chance


def test_seed_summary_mean_and_sample_sd(tmp_path):
    """Three seeds of one setting: each cell is the mean ± the sample standard deviation, by hand."""
    from medvlp_jax import run_summary
    runs = []
    for k, scale in enumerate((1.0, 0.8, 0.9)):
        w = tmp_path / f"s{k}"
        (w / "eval").mkdir(parents=True)
        _suite_files(w, scale=scale)
        runs.append(run_summary.suite_headlines(str(w)))
    g = run_summary.seed_summary(runs)
    mean, sd, n = g["zero-shot macro AUROC"]
    assert n == 3 and mean == pytest.approx(0.7 * 0.9) and sd == pytest.approx(0.07)   # 0.7 x (1, .8, .9)
    assert g["grounding CNR (method's own maps)"] == (0.5, 0.0, 3)
    assert g["fine-tune macro AUROC, 100% labels"] is None and g["seconds"] == pytest.approx(420.0)
    single = run_summary.seed_summary(runs[:1])
    md = run_summary.suite_table([("three seeds", g), ("one", single)])
    assert "| zero-shot macro AUROC | 0.630 ± 0.070 | 0.700 |" in md


def test_cli_suite(tmp_path):
    w, _ = _workdir(tmp_path)
    cli = [sys.executable, os.path.join(ROOT, "launch", "compare_runs.py")]
    r = subprocess.run(cli + [w, "--suite"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no evaluation-suite results" in r.stderr and "convirt" in r.stderr
    _suite_files(tmp_path / "convirt_demo")
    _suite_files(tmp_path / "convirt_demo", suffix="_untrained", scale=0.5)
    r = subprocess.run(cli + [w, "--suite", f"--untrained={w}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| metric (demo test split) | convirt | untrained (convirt arch.) |" in r.stdout
    assert "| retrieval i2t R@1 (same-text duplicates count) | 0.040 | 0.020 |" in r.stdout
    r = subprocess.run(cli + [w, f"--untrained={w}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--untrained needs --suite" in r.stderr
    r = subprocess.run(cli + ["--suite", f"--group=convirt={w},{w}", f"--untrained_group=untrained={w}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| metric (demo test split) | convirt (n=2) | untrained (n=1) |" in r.stdout
    assert "| zero-shot macro AUROC | 0.700 ± 0.000 | 0.350 |" in r.stdout
    r = subprocess.run(cli + ["--suite", "--group=convirt"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --group") and len(r.stderr.splitlines()) == 1


def _grounding_file(w, own, cosine, phrases=(4, 10), chance=(0.25, 0.1), oracle=(1.0, 0.9), suffix=""):
    """eval/grounding<suffix>.json with two findings, "nodule" and "effusion", as the evaluator writes them."""
    (w / "eval").mkdir(parents=True, exist_ok=True)
    if not (w / "config.json").exists():
        (w / "config.json").write_text(json.dumps({"method": {"name": "plan"}, "variant": "demo"}))
    d = {"pointing_game": 0.5, "protocol/num_phrases": sum(phrases)}
    for k, f in enumerate(("nodule", "effusion")):
        d.update({f"protocol/num_phrases/{f}": phrases[k], f"pointing_game_chance/{f}": chance[k],
                  f"oracle/pointing_game/{f}": oracle[k], f"pointing_game/{f}": own[k],
                  f"cosine/pointing_game/{f}": cosine[k]})
    (w / "eval" / f"grounding{suffix}.json").write_text(json.dumps(d))
    return str(w)


def test_finding_table_mean_sd_order_and_split_check(tmp_path):
    """Per-finding pointing game over seeds, by hand: most phrases first, mean ± sample sd, chance and oracle once."""
    from medvlp_jax import run_summary
    a = _grounding_file(tmp_path / "s0", own=(0.5, 0.2), cosine=(0.25, 0.1))
    b = _grounding_file(tmp_path / "s1", own=(0.75, 0.4), cosine=(0.25, 0.3))
    ra, rb = run_summary.finding_pointing_games(a), run_summary.finding_pointing_games(b)
    assert ra["nodule"] == {"phrases": 4, "chance": 0.25, "oracle": 1.0, "own": 0.5, "cosine": 0.25}
    md = run_summary.finding_table([("plan", [ra, rb]), ("one", [ra])], maps=("own", "cosine"))
    lines = md.splitlines()
    assert lines[0] == "| finding | phrases | chance | mask oracle | plan own | plan cosine | one own | one cosine |"
    # effusion (10 phrases) before nodule (4); sd of (0.2, 0.4) = 0.1414, of (0.5, 0.75) = 0.1768
    assert lines[2] == "| effusion | 10 | 0.10 | 0.90 | 0.30 ± 0.14 | 0.20 ± 0.14 | 0.20 | 0.10 |"
    assert lines[3] == "| nodule | 4 | 0.25 | 1.00 | 0.62 ± 0.18 | 0.25 ± 0.00 | 0.50 | 0.25 |"
    finer = run_summary.finding_pointing_games(_grounding_file(tmp_path / "vit", own=(0.5, 0.2), cosine=(0, 0),
                                                               oracle=(1.0, 0.95)))
    assert "| effusion | 10 | 0.10 | varies |" in run_summary.finding_table([("a", [ra]), ("vit", [finer])], ("own",))
    other_split = run_summary.finding_pointing_games(_grounding_file(tmp_path / "x", own=(0, 0), cosine=(0, 0),
                                                                     phrases=(5, 10)))
    with pytest.raises(ValueError, match="same phrases"):
        run_summary.finding_table([("a", [ra]), ("x", [other_split])])
    with pytest.raises(FileNotFoundError, match="configs/eval/grounding.py .*--untrained"):
        run_summary.finding_pointing_games(a, untrained=True)


def test_cli_findings(tmp_path):
    cli = [sys.executable, os.path.join(ROOT, "launch", "compare_runs.py")]
    a = _grounding_file(tmp_path / "s0", own=(0.5, 0.2), cosine=(0.25, 0.1))
    b = _grounding_file(tmp_path / "s1", own=(0.75, 0.4), cosine=(0.25, 0.3))
    _grounding_file(tmp_path / "s0", own=(0.0, 0.1), cosine=(0.0, 0.0), suffix="_untrained")
    r = subprocess.run(cli + ["--findings=own", f"--group=plan={a},{b}", f"--untrained_group=untrained={a}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| finding | phrases | chance | mask oracle | plan (n=2) | untrained (n=1) |" in r.stdout
    assert "| effusion | 10 | 0.10 | 0.90 | 0.30 ± 0.14 | 0.10 |" in r.stdout
    r = subprocess.run(cli + ["--findings=both", f"--untrained_group=untrained={b}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "grounding_untrained.json does not exist" in r.stderr
    r = subprocess.run(cli + ["--findings=own", "--suite", a], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "pick one" in r.stderr
