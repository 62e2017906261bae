"""notebooks/checkpoint_inference.ipynb and notebooks/colab_tpu.ipynb: clean, Colab-ready, and run top to bottom
in their small setting (MEDVLP_NB_SMALL=1; the install cell is skipped off Colab)."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("checkpoint_inference.ipynb", "colab_tpu.ipynb")


def _read(name: str):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbformat.validate(nb)
    return nb


def _execute(nb, tmp_path, monkeypatch, **env: str):
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MEDVLP_NB_SMALL", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # The kernel is started as "python": make it this interpreter (a venv that is not activated). It inherits
    # this process's XLA_FLAGS (tests/conftest.py: 8 CPU devices).
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    return nb


def _cell(nb, needle: str):
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


def _text(cell) -> str:
    out = []
    for o in cell.outputs:
        out.append(o.get("text", ""))
        out.append("".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/")))
    return "\n".join(out)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_colab_ready_and_parses(name):
    from IPython.core.inputtransformer2 import TransformerManager
    nb = _read(name)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab-badge.svg" in first.source
    assert f"colab.research.google.com/github/REPO_OWNER/medvlp_jax/blob/main/notebooks/{name}" in first.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit it without outputs"
    install = code[0].source
    assert "IN_COLAB = \"google.colab\" in sys.modules" in install and "if IN_COLAB:" in install
    assert install.index("if IN_COLAB:") < install.index("pip")          # pip runs only on Colab
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "MEDVLP_NB_SMALL" in params[0].source and "MEDVLP_NB_WORKDIR" in params[0].source
    for i, cell in enumerate(code):                   # IPython syntax (magics) -> Python that must compile
        compile(TransformerManager().transform_cell(cell.source), f"<{name} cell {i}>", "exec")
    if name == "colab_tpu.ipynb":
        assert '"jax[tpu]==0.10.2"' in install


@pytest.mark.slow
def test_checkpoint_inference_runs_small(tmp_path, monkeypatch):
    """A tiny checkpoint of ours; the example DICOM film (or a PNG when pydicom-data is absent).

    About 75 s on the 2-core host (33 s making the checkpoint, 40 s the notebook), hence slow."""
    from tests.workdir_testlib import make_tiny_workdir
    workdir = tmp_path / "run"
    make_tiny_workdir(str(workdir), str(tmp_path / "data"))
    env = {"MEDVLP_NB_WORKDIR": str(workdir)}
    try:
        from pydicom.data import get_testdata_file
        assert get_testdata_file("RG1_UNCR.dcm")
    except Exception:                                 # no pydicom-data: a PNG of our own
        from tests.data import sources_testlib as tl
        import numpy as np
        tl.write_png(str(tmp_path / "film.png"), (np.random.default_rng(0).random((80, 60)) * 255).astype(np.uint8))
        env["MEDVLP_NB_IMAGE"] = str(tmp_path / "film.png")
    nb = _execute(_read("checkpoint_inference.ipynb"), tmp_path, monkeypatch, **env)
    assert "'method': 'convirt'" in _text(_cell(nb, "inference.describe(run)"))
    table = _text(_cell(nb, "inference.score_table"))
    for c in ("normal", "opacity", "effusion", "cardiomegaly"):           # the synthetic set's classes
        assert f"| {c} |" in table
    for needle in ("ax.imshow", "inference.score_table", "inference.heatmap_figure"):
        assert any("image/png" in o.get("data", {}) for o in _cell(nb, needle).outputs), needle


@pytest.mark.slow
def test_colab_tpu_runs_small(tmp_path, monkeypatch):
    """Synthetic data, MGCA :test, 3 steps on a (data=4, fsdp=2) mesh of 8 CPU devices."""
    workdir = tmp_path / "tpu_run"
    nb = _execute(_read("colab_tpu.ipynb"), tmp_path, monkeypatch, MEDVLP_NB_WORKDIR=str(workdir))
    assert "backend              cpu" in _text(_cell(nb, "env.report()"))
    assert "mesh data=4 x fsdp=2 over 8" in _text(_cell(nb, "loop.run(config, WORKDIR, end_of_run_eval="))
    sharding = _text(_cell(nb, "biggest.sharding.spec"))
    assert "fsdp" in sharding and "on 8 devices" in sharding
    assert (workdir / "metrics.jsonl").exists() and (workdir / "config.json").exists()
    assert any("image/png" in o.get("data", {}) for o in _cell(nb, "plot_training_curves").outputs)
