"""Every notebook in notebooks/ runs top to bottom (quick mode: NM_QUICK=1, few steps), and is
exactly what notebooks/build_notebooks.py writes (the notebooks never drift from their source)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
BUILDER = FOLDER / "build_notebooks.py"


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILDER), "--check", *args], capture_output=True, text=True, timeout=120)


def test_the_three_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "paper_figures", "equilibrium", "transformers"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # committed without outputs: the repository holds code, not results
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"
    # The kernel inherits this process's environment: quick mode, one BLAS thread.
    monkeypatch.setenv("NM_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_committed_notebooks_are_what_the_builder_writes():
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_names_a_notebook_that_drifted(tmp_path):
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path)
    edited = tmp_path / "quickstart.ipynb"
    edited.write_text(edited.read_text(encoding="utf-8").replace("Quickstart", "Quick start", 1), encoding="utf-8")
    result = _check("--dir", str(tmp_path))
    assert result.returncode == 1
    assert "quickstart.ipynb" in result.stdout and "equilibrium.ipynb" not in result.stdout
