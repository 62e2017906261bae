"""notebooks/quickstart.ipynb: well formed and clean, and (slow) runs top to bottom in its small setting."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _read():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_is_valid_clean_and_parses():
    from IPython.core.inputtransformer2 import TransformerManager
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit it without outputs"
    assert "google.colab" in code[0].source and "pip" in code[0].source     # Colab installs the repository first
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "MEDVLP_NB_SMALL" in params[0].source
    for i, cell in enumerate(code):                 # IPython syntax (magics) -> Python that must compile
        compile(TransformerManager().transform_cell(cell.source), f"<cell {i}>", "exec")
    text = "\n".join(c.source for c in code)
    for needed in ("loop.run(", "run_suite(", "plot_training_curves(", "save_heatmaps(", "configs/eval/suite.py"):
        assert needed in text


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_small(tmp_path, monkeypatch):
    """Synthetic data, the :test model, 4 steps, the fast suite: every cell runs and leaves its files."""
    nbclient = pytest.importorskip("nbclient")
    nb = _read()
    workdir = tmp_path / "run"
    monkeypatch.setenv("MEDVLP_NB_SMALL", "1")
    monkeypatch.setenv("MEDVLP_NB_WORKDIR", str(workdir))
    # The kernel is started as "python": make it this interpreter (a venv that is not activated).
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    names = ("zero_shot", "retrieval", "linear_probe", "finetune", "segmentation", "detection", "grounding")
    for name in names:
        with open(workdir / "eval" / f"{name}.json") as f:
            assert json.load(f)["protocol/checkpoint_step"] == 4
    assert (workdir / "eval" / "results.md").exists() and (workdir / "metrics.jsonl").exists()
    pngs = [o for o in nb.cells[-2].outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 1                             # the heatmaps are shown
    curves = [c for c in nb.cells if c.cell_type == "code" and "plot_training_curves" in c.source][0]
    assert any("image/png" in o.get("data", {}) for o in curves.outputs)
