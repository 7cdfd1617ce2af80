"""Every notebooks/*.ipynb runs top to bottom, as a reader would run it, executed by nbclient (the Jupyter project's
own executor, formerly nbconvert's ExecutePreprocessor) in an ipykernel, with NOTEBOOKS_QUICK=1: each notebook's
first code cell reads it and picks small numbers (the same cells, fewer images and steps), and the trained parts it
needs come from sample.demo.trained_parts (the demo's runs/ when it has filled them, else trained at the --smoke size
in seconds into NOTEBOOKS_RUNS, one folder per test process). A cell that raises fails the test, naming the
notebook, the cell and the error. The notebooks are committed with the outputs of a full run (NOTEBOOKS_QUICK unset),
so a reader sees the figures without running them; executing here never writes them back."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="session")
def quick_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook_runs")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, quick_runs, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "arXiv" in nb.cells[0].source, \
        f"{path.name} must open with what it shows and which paper (arXiv id) and section it follows"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "NOTEBOOKS_QUICK" in first_code.source, f"{path.name}: its first code cell must read NOTEBOOKS_QUICK"
    monkeypatch.setenv("NOTEBOOKS_QUICK", "1")
    monkeypatch.setenv("NOTEBOOKS_RUNS", str(quick_runs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: {str(e).strip().splitlines()[-1]}\n{e}")


def test_the_library_leaves_a_notebooks_plotting_backend_alone(tmp_path):
    """The figures the library saves (comparison, sweep plots, FID against N, re-ranking curve) are drawn on
    matplotlib Figures, never through pyplot's global backend: a notebook that imports sample.demo and calls them
    still shows its own plots inline (matplotlib.use("Agg") at import once left families.ipynb without pictures)."""
    import subprocess
    import sys
    code = ("import matplotlib, sample.demo, sample.compare, sample.sweep, sample.demo_dalle, metrics.fid_infinity\n"
            "from metrics.fid_infinity import plot_fid_against_n\n"
            f"plot_fid_against_n({{'n': [10, 20], 'fid': [2.0, 1.5], 'fid_infinity': 1.0, 'slope': 10.0}}, "
            f"r'{tmp_path / 'fid.png'}')\n"
            "print(matplotlib.get_backend())")
    env = dict(os.environ, MPLBACKEND="svg", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "svg" and (tmp_path / "fid.png").stat().st_size > 0
