"""Notebooks: each runs top to bottom with the CI parameters in a fresh kernel (papermill injects them), and any
cell error fails the test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("papermill", reason="the dev extra (papermill, nbformat, ipykernel, matplotlib) is not installed")
pytest.importorskip("ipykernel", reason="the dev extra is not installed: no python3 kernel")
pytest.importorskip("matplotlib", reason="the dev extra is not installed")

import nbformat  # noqa: E402
import papermill  # noqa: E402

from notebooks.run import HERE, NOTEBOOKS, SMALL, drop_papermill_metadata, execute, tidy_streams  # noqa: E402

pytestmark = pytest.mark.notebooks


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_notebooks_and_their_ci_parameters():
    expected = ["01_quickstart.ipynb", "02_attention_and_embeddings.ipynb", "03_accelerator_training.ipynb"]
    assert NOTEBOOKS == sorted(SMALL) == expected
    for name in NOTEBOOKS:
        nb = nbformat.read(HERE / name, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{name}: exactly one cell must be tagged 'parameters'"
        # papermill reads the defaults from that cell: an override of a name it no longer defines would do nothing
        missing = {*SMALL[name], "RUN_ROOT"} - set(papermill.inspect_notebook(str(HERE / name)))
        assert not missing, f"{name}: the CI parameters {sorted(missing)} are not in its parameters cell"


@pytest.mark.slow  # a fresh kernel trains and plots: 20-40 s each
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    nb = execute(HERE / name, {**SMALL[name], "RUN_ROOT": str(tmp_path)}, timeout=300)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a cell was skipped"


def _tiny_notebook(path: Path, *code: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("X = 1  # a number\nNAME = 'default'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, *map(nbformat.v4.new_code_cell, code)]
    nbformat.write(nb, path)
    return path


def test_parameters_are_injected_after_the_parameters_cell(tmp_path):
    path = _tiny_notebook(tmp_path / "tiny.ipynb", "import os\nprint(X * 10, NAME, os.getcwd())")
    nb = execute(path, {"X": 2, "NAME": "it's small"}, timeout=60)
    assert nb.cells[2].metadata["tags"] == ["injected-parameters"]
    assert nb.cells[3].outputs[0].text == f"20 it's small {tmp_path}\n"  # the override, run in the notebook's folder
    drop_papermill_metadata(nb)
    assert "papermill" not in nb.metadata
    assert [c.metadata for c in nb.cells] == [{}, {"tags": ["parameters"]}, {"tags": ["injected-parameters"]}, {}]
    nbformat.validate(nb)


def test_unknown_parameter_is_refused(tmp_path):
    path = _tiny_notebook(tmp_path / "tiny.ipynb", "print(X)")
    with pytest.raises(ValueError, match=r"tiny\.ipynb has no parameters \['EPOCHS'\]"):
        execute(path, {"X": 2, "EPOCHS": 2}, timeout=60)


def test_a_failing_cell_fails_the_run(tmp_path):
    path = _tiny_notebook(tmp_path / "failing.ipynb", "assert X == 2, 'X was not injected'\nraise ValueError('boom')")
    with pytest.raises(papermill.PapermillExecutionError, match="boom") as excinfo:
        execute(path, {"X": 2}, timeout=60)
    assert excinfo.value.ename == "ValueError"


def test_committed_notebooks_hold_a_full_run():
    """The outputs of a real run with the default parameters are committed, so the notebooks read on a code host."""
    for name in NOTEBOOKS:
        nb = nbformat.read(HERE / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{name}: not executed top to bottom"
        assert not any("injected-parameters" in c.metadata.get("tags", []) for c in code), f"{name}: not a default run"
        assert "papermill" not in nb.metadata, f"{name}: papermill's run metadata committed; use notebooks/run.py"
        outputs = _outputs(nb)
        assert not [o for o in outputs if o.output_type == "error"], f"{name}: committed with an error"
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figures committed"
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        assert "\r" not in text, f"{name}: raw progress-bar output; execute it with notebooks/run.py"


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
    """No model code copied into a notebook (no class or jitted function of its own), and only public API: a private
    attribute (`model._params`) or module (`sasrec_jax._x`) can change under the reader without notice."""
    for name in NOTEBOOKS:
        nb = nbformat.read(Path(HERE) / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert "class " not in cell.source and "@jax.jit" not in cell.source, f"{name}: {cell.source[:60]}"
                assert "nnx.Module" not in cell.source, name
                private = re.findall(r"\w+\._[a-z]\w*", cell.source)
                assert not private, f"{name}: private API {private}"
