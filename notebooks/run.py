"""Executes the notebooks with papermill: default parameters with the outputs written back (the committed run), or the
small parameters the test suite uses.

    python notebooks/run.py                      # every notebook, default parameters, outputs written in place
    python notebooks/run.py --small 02           # the CI parameters, into a temporary copy (nothing rewritten)

Each notebook's cell tagged `parameters` holds the defaults; papermill puts overrides in a cell right after it (tagged
`injected-parameters`). Other values: papermill's own command line, e.g.
`papermill notebooks/01_quickstart.ipynb /tmp/out.ipynb --cwd notebooks -p EPOCHS 5`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import papermill

from sasrec_jax import files

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(p.name for p in HERE.glob("[0-9][0-9]_*.ipynb"))
KERNEL = "python3"  # this interpreter's ipykernel, whatever the notebook's metadata says

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
    """What a terminal would show of carriage-return progress bars, so committed outputs read well on a code host
    (which, unlike Jupyter, does not interpret `\\r`): consecutive outputs of one stream merged, each line reduced
    to its final state, emptied outputs dropped."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = _merge_streams(cell.get("outputs", []))
        for out in outputs:
            if out.output_type == "stream":
                out.text = _terminal_text(out.text)
        outputs = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
        cell.outputs = _merge_streams(outputs)


def drop_papermill_metadata(nb: nbformat.NotebookNode) -> None:
    """Removes papermill's bookkeeping (timestamps, absolute paths, an empty `tags` on every cell): it would change
    the committed files on every run, to no reader's gain."""
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]


def execute(
    path: str | Path,
    params: dict | None = None,
    *,
    cwd: str | Path | None = None,
    timeout: int = 900,
    progress: bool = False,
) -> nbformat.NotebookNode:
    """Runs a notebook top to bottom in a fresh `python3` kernel, in `cwd` (default: the notebook's folder, so the
    default RUN_ROOT lands in notebooks/_runs), and returns it with its outputs. `timeout` is per cell. Raises
    papermill's PapermillExecutionError (the cell and its traceback) on the first cell that fails, and ValueError for
    a parameter the notebook does not declare (papermill would only log a warning and run without it)."""
    path = Path(path)
    params = params or {}
    unknown = sorted(set(params) - set(papermill.inspect_notebook(str(path))))
    if unknown:
        raise ValueError(f"{path.name} has no parameters {unknown} in its cell tagged 'parameters'")
    nb = papermill.execute_notebook(
        str(path),
        None,  # nothing written while it runs: the caller decides what to keep
        parameters=params,
        cwd=str(cwd or path.parent),
        kernel_name=KERNEL,
        execution_timeout=timeout,
        progress_bar=progress,
        record_timing=False,
    )
    tidy_streams(nb)
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
        try:
            if args.small:
                with tempfile.TemporaryDirectory() as tmp:
                    execute(HERE / name, {**SMALL[name], "RUN_ROOT": tmp}, timeout=args.timeout, progress=True)
            else:
                nb = execute(HERE / name, timeout=args.timeout, progress=True)
                drop_papermill_metadata(nb)
                nbformat.validate(nb)
                # a run that fails, or is interrupted, leaves the committed notebook as it was
                files.atomic_write_text(HERE / name, nbformat.writes(nb) + "\n")
        except papermill.PapermillExecutionError as err:
            print(f"{name}: a cell failed, nothing written back{err}", file=sys.stderr)
            return 1
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
