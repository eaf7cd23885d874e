"""Executes the notebooks with nbclient: full parameters in place (the committed outputs), or the small ones CI uses.

    python notebooks/run.py                      # every notebook, default parameters, outputs written in place
    python notebooks/run.py --small 02           # the CI parameters, into a temporary copy (nothing rewritten)

Parameters follow papermill's convention: the first cell tagged `parameters` holds the defaults, and overrides go
into a cell inserted right after it (tagged `injected-parameters`). A cell that raises stops the run with nbclient's
CellExecutionError, which names the cell and carries its traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(p.name for p in HERE.glob("[0-9][0-9]_*.ipynb"))
KERNEL = "python3"

# The test suite's parameters: tiny models, one or two epochs, no download (CI sets SASREC_DATA_DIR).
SMALL = {
    "01_quickstart.ipynb": dict(MAX_LEN=50, DIM=16, EPOCHS=2, MAX_MINUTES=1.0, DOWNLOAD=False),
    "02_attention_and_embeddings.ipynb": dict(MAX_LEN=50, DIM=16, EPOCHS=2, MAX_MINUTES=1.0, DOWNLOAD=False),
    "03_accelerator_training.ipynb": dict(
        MAX_LEN=50,
        DIM=16,
        FIRST_MINUTES=0.05,
        EPOCHS_TOTAL=2,
        MAX_MINUTES=1.0,
        BF16_EPOCHS=1,
        BF16_USERS=200,
        DOWNLOAD=False,
    ),
}


def inject(nb: nbformat.NotebookNode, params: dict) -> None:
    """Inserts `NAME = value` lines after the `parameters` cell (which must exist) and marks the cell."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged or nb.cells[tagged[0]].cell_type != "code":
        raise ValueError("the notebook has no code cell tagged 'parameters'")
    source = "# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)


def _merge_streams(outputs: list) -> list:
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if out.output_type == "stream" and prev is not None and prev.output_type == "stream" and prev.name == out.name:
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def _terminal_text(text: str) -> str:
    """Each line's text after its last `\\r`; lines that only ever held a closed progress bar are dropped."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        shown = line.rsplit("\r", 1)[-1]
        if shown.strip() or "\r" not in line:
            lines.append(shown)
    return "\n".join(lines)


def tidy_streams(nb: nbformat.NotebookNode) -> None:
    """What a terminal would show of carriage-return progress bars, so committed outputs read well: consecutive
    outputs of one stream merged, each line reduced to its final state, emptied outputs dropped."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = _merge_streams(cell.get("outputs", []))
        for out in outputs:
            if out.output_type == "stream":
                out.text = _terminal_text(out.text)
        outputs = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
        cell.outputs = _merge_streams(outputs)


def execute(path: str | Path, params: dict | None = None, *, cwd: str | Path | None = None, timeout: int = 900):
    """Runs a notebook top to bottom in a fresh `python3` kernel (this interpreter's ipykernel) and returns
    it with its outputs; raises nbclient's CellExecutionError on the first cell that fails."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if params:
        inject(nb, params)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL,
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(cwd or path.parent)}},
    )
    client.execute()
    tidy_streams(nb)
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="notebooks, or their number prefixes (default: all)")
    parser.add_argument("--small", action="store_true", help="the CI parameters; outputs are not written back")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.names or any(n.startswith(a) or n == a for a in args.names)]
    if not names:
        parser.error(f"no notebook matches {args.names}; have {NOTEBOOKS}")
    for name in names:
        t0 = time.perf_counter()
        if args.small:
            with tempfile.TemporaryDirectory() as tmp:
                execute(HERE / name, {**SMALL[name], "RUN_ROOT": tmp}, timeout=args.timeout)
        else:
            nb = execute(HERE / name, timeout=args.timeout)
            nbformat.write(nb, HERE / name)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
