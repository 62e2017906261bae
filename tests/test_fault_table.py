"""The rows of docs/faults.md that end in one line: each bad input, tried as a user would (the launcher in a
subprocess), ends with exactly one ``error:`` line naming what was wrong, exit code 2, and nothing written lost.

The slow faults (SIGTERM, Ctrl-C, corrupt checkpoints, resume) are in tests/train/test_faults.py.
"""
import json
import os
import subprocess
import sys

import pytest

from medvlp_jax import config_lib
from medvlp_jax.data.sources import synthetic
from tests import helpers

CONVIRT_TEST = f"--config={os.path.join(helpers.ROOT, 'configs', 'convirt.py')}:test"


def _launch(script: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEDVLP_COMPILATION_CACHE="off")
    return subprocess.run([sys.executable, os.path.join(helpers.ROOT, "launch", script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=helpers.ROOT)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Asserts exit 2 and a single non-empty stderr line, an ``error:`` line holding every needle."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    extra = [line for line in lines if not line.startswith(("error:", "Pass --help"))]
    assert not extra, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    synthetic.prepare_synthetic(root, num_train=16, num_test=8, num_shards=1)
    return root


def _pretrain_args(workdir, root, *extra):
    return (CONVIRT_TEST, f"--workdir={workdir}", f"--config.data.root={root}",
            f"--config.data.tokenizer_dir={root}/tokenizer", "--config.train.eval_at_end=False", *extra)


@pytest.mark.parametrize("override,field,hint", [
    ("--config.train.batchsize=8", "batchsize", 'Did you mean "batch_size"'),
    ("--config.trian.batch_size=8", "trian", 'Did you mean "train"'),
    ("--config.train.no_such_field=1", "no_such_field", "see the config file"),
])
def test_override_typo_is_one_line_with_the_suggestion(tmp_path, override, field, hint):
    proc = _launch("pretrain.py", CONVIRT_TEST, f"--workdir={tmp_path / 'w'}", override, timeout=60)
    _one_error_line(proc, f"no field '{field}'", override, hint)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("batch", ["0", "-8"])
def test_nonpositive_batch_size_is_one_line_before_any_work(tmp_path, data_root, batch):
    work = tmp_path / "w"
    proc = _launch("pretrain.py", *_pretrain_args(work, data_root, f"--config.train.batch_size={batch}"))
    _one_error_line(proc, f"config.train.batch_size={batch}", "positive")
    assert not (work / "checkpoints").exists() and not (work / "config.json").exists()


def test_workdir_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path, data_root):
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    proc = _launch("pretrain.py", *_pretrain_args(path, data_root))
    _one_error_line(proc, f"--workdir={path} is a file")
    assert path.read_text() == "my notes"


def test_unwritable_workdir_is_one_line(tmp_path, data_root):
    """A directory nobody may write to (as root, whom permissions do not stop, a path below /proc)."""
    if os.geteuid() == 0:
        work = "/proc/self/medvlp_cannot_write_here"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        work = str(ro / "w")
    proc = _launch("pretrain.py", *_pretrain_args(work, data_root))
    _one_error_line(proc, f"--workdir={work}", "not writable")


def test_check_output_dir_names_the_flag_for_a_read_only_directory(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(config_lib.ConfigError, match=r"--workdir=.* is not writable \(Read-only file system\)"):
        config_lib.check_output_dir(str(tmp_path), "--workdir")


def test_evaluate_checks_its_results_directory_before_restoring(tmp_path, monkeypatch):
    """evaluate.py wrote its results after the whole evaluation; an unwritable <checkpoint>/eval now stops it
    first (before the restore, let alone the evaluation)."""
    import tempfile

    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import common
    (tmp_path / "config.json").write_text("{}")

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    def must_not_run(*a, **k):
        raise AssertionError("restored before checking the output directory")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(common, "load_run", must_not_run)
    import ml_collections
    cfg = ml_collections.ConfigDict({"evaluators": ["zero_shot"], "zero_shot": {}})
    with pytest.raises(config_lib.ConfigError, match="eval is not writable"):
        evaluators.run_suite(cfg, str(tmp_path))


def test_evaluate_of_a_missing_workdir_is_one_line(tmp_path):
    proc = _launch("evaluate.py", f"--config={os.path.join(helpers.ROOT, 'configs', 'eval', 'zero_shot.py')}",
                   f"--checkpoint={tmp_path / 'nope'}")
    _one_error_line(proc, f"--checkpoint={tmp_path / 'nope'} is not a directory", "config.json")
    assert not (tmp_path / "nope").exists()


def test_prepare_data_empty_source_names_the_flag_and_exits_2(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    proc = _launch("prepare_data.py", "mimic_cxr", f"--source={src}", f"--out={tmp_path / 'out'}")
    _one_error_line(proc, "--reports")


def test_prepare_data_missing_source_and_bad_flag_exit_2(tmp_path):
    proc = _launch("prepare_data.py", "chexpert", f"--source={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}")
    _one_error_line(proc, f"--source={tmp_path / 'nope'} is not a directory")
    proc = _launch("prepare_data.py", "demo", "--no_such_flag=1")
    _one_error_line(proc, "--no_such_flag")
    (tmp_path / "f.txt").write_text("x")
    proc = _launch("prepare_data.py", "synthetic", f"--out={tmp_path / 'f.txt'}")
    _one_error_line(proc, "--out=", "is a file")
    assert (tmp_path / "f.txt").read_text() == "x"


def test_every_launcher_parses_flags_through_medvlp_jax_app():
    """One flag parser: the absl launchers use app.parse_flags, the argparse ones app.ArgumentParser."""
    for name in sorted(os.listdir(os.path.join(helpers.ROOT, "launch"))):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(helpers.ROOT, "launch", name)).read()
        if "__main__" not in text:
            continue
        uses_absl = "app.run(main, flags_parser=parse_flags)" in text
        uses_argparse = "from medvlp_jax.app import ArgumentParser" in text
        assert uses_absl or uses_argparse, name
        assert "argparse.ArgumentParser(" not in text, name


def test_resume_with_a_changed_config_stops_with_the_fields_and_keeps_config_json(tmp_path, data_root):
    from tests.workdir_testlib import make_tiny_workdir
    work = tmp_path / "run"
    make_tiny_workdir(str(work), data_root)
    before = (work / "config.json").read_text()
    proc = _launch("pretrain.py", *_pretrain_args(work, data_root, "--config.train.total_steps=99",
                                                  "--config.optim.lr=0.5"))
    _one_error_line(proc, "optim.lr", "train.total_steps", "--allow_config_change")
    assert (work / "config.json").read_text() == before
    assert json.loads(before)["train"]["total_steps"] != 99


def test_evaluate_of_a_corrupt_checkpoint_is_one_line(tmp_path, data_root):
    """The only checkpoint's largest array file truncated: evaluate.py names step, file and reason (exit 2),
    with --step and without, and prints nothing else (no late tensorstore callback noise)."""
    from tests.workdir_testlib import make_tiny_workdir
    work = tmp_path / "run"
    make_tiny_workdir(str(work), data_root)
    files = [p for p in (work / "checkpoints" / "1" / "state" / "d").iterdir()]
    big = max(files, key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)
    config = f"--config={os.path.join(helpers.ROOT, 'configs', 'eval', 'zero_shot.py')}"
    proc = _launch("evaluate.py", config, f"--checkpoint={work}", "--step=1")
    _one_error_line(proc, "checkpoint step 1 does not restore", big.name, "truncated")
    proc = _launch("evaluate.py", config, f"--checkpoint={work}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "does not restore" in lines[0] and lines[1].startswith("error: no checkpoint in"), lines


def test_benchmark_checks_its_output_paths_before_timing(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = _launch("benchmark.py", CONVIRT_TEST, f"--out={tmp_path / 'file' / 'result.json'}", "--scale=none")
    _one_error_line(proc, "--out=", "is a file")
    proc = _launch("benchmark.py", CONVIRT_TEST, f"--out={tmp_path}", "--scale=none")
    _one_error_line(proc, f"--out={tmp_path} is a directory")
    assert (tmp_path / "file").read_text() == "x"
