"""Notebooks: each runs top to bottom with the CI parameters in a fresh kernel, and any cell error fails the test."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

pytest.importorskip("nbclient", reason="the dev extra (nbclient, nbformat, ipykernel, matplotlib) is not installed")
pytest.importorskip("ipykernel", reason="the dev extra is not installed: no python3 kernel")
pytest.importorskip("matplotlib", reason="the dev extra is not installed")

import nbformat  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

from notebooks.run import HERE, NOTEBOOKS, SMALL, execute, inject, tidy_streams  # noqa: E402

pytestmark = pytest.mark.notebooks


def _assigned(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets}


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_notebooks_and_their_ci_parameters():
    expected = ["01_quickstart.ipynb", "02_attention_and_embeddings.ipynb", "03_accelerator_training.ipynb"]
    assert NOTEBOOKS == sorted(SMALL) == expected
    for name in NOTEBOOKS:
        nb = nbformat.read(HERE / name, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{name}: exactly one cell must be tagged 'parameters'"
        # an override of a name the notebook no longer defines would silently do nothing
        missing = {*SMALL[name], "RUN_ROOT"} - _assigned(tagged[0].source)
        assert not missing, f"{name}: the CI parameters {sorted(missing)} are not in its parameters cell"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    t0 = time.perf_counter()
    nb = execute(HERE / name, {**SMALL[name], "RUN_ROOT": str(tmp_path)}, timeout=300)
    print(f"{name}: {time.perf_counter() - t0:.1f} s with the CI parameters")
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a cell was skipped"


def test_a_failing_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("X = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("assert X == 1, 'X was not injected'\nraise ValueError('boom')")]
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(CellExecutionError, match="boom"):
        execute(path, {"X": 1}, timeout=60)


def test_committed_notebooks_hold_a_full_run():
    """The outputs of a real run with the default parameters are committed, so the notebooks read on a code host."""
    for name in NOTEBOOKS:
        nb = nbformat.read(HERE / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{name}: not executed top to bottom"
        assert not any("injected-parameters" in c.metadata.get("tags", []) for c in code), f"{name}: not a default run"
        outputs = _outputs(nb)
        assert not [o for o in outputs if o.output_type == "error"], f"{name}: committed with an error"
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figures committed"
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        assert "\r" not in text, f"{name}: raw progress-bar output; execute it with notebooks/run.py"


def test_injected_parameters_follow_the_parameters_cell():
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("EPOCHS = 200")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, nbformat.v4.new_code_cell("print(EPOCHS)")]
    inject(nb, {"EPOCHS": 2, "RUN_ROOT": "/tmp/x"})
    assert nb.cells[2].source == "# Injected parameters\nEPOCHS = 2\nRUN_ROOT = '/tmp/x'\n"
    assert nb.cells[2].metadata["tags"] == ["injected-parameters"]
    with pytest.raises(ValueError, match="parameters"):
        inject(nbformat.v4.new_notebook(), {"EPOCHS": 2})


def test_progress_bars_are_tidied_to_what_a_terminal_shows():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("")
    stream = nbformat.v4.new_output
    cell.outputs = [
        stream("stream", name="stdout", text="data: 943 users\n"),
        stream("stream", name="stderr", text="\repoch 1:  50%|#   | 4/8"),
        stream("stream", name="stderr", text="\repoch 1: 100%|####| 8/8\r            \r"),
        stream("stream", name="stdout", text="epoch   1  loss 7.4\n"),
        stream("stream", name="stderr", text="\revaluate: 10%\revaluate: 100%|####| 2/2\n"),
        stream("stream", name="stdout", text="\ndone\n"),
    ]
    nb.cells = [cell]
    tidy_streams(nb)
    assert [(o.name, o.text) for o in cell.outputs] == [
        ("stdout", "data: 943 users\nepoch   1  loss 7.4\n"),
        ("stderr", "evaluate: 100%|####| 2/2\n"),
        ("stdout", "\ndone\n"),
    ]


def test_notebooks_import_only_the_package():
    """No model code copied into a notebook: no class or jitted function of its own."""
    for name in NOTEBOOKS:
        nb = nbformat.read(Path(HERE) / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert "class " not in cell.source and "@jax.jit" not in cell.source, f"{name}: {cell.source[:60]}"
                assert "nnx.Module" not in cell.source, name
