"""`sasrec-jax export`: the flags and the command, found by sasrec_jax's CLI through the `sasrec_jax.commands`
entry point (so the training package never imports the exporter), and `python -m sasrec_export`."""

from __future__ import annotations

import argparse
import sys

from sasrec_serve.bundle import BundleError, check_bundle

HELP = "export a run to a verified ONNX bundle, or --check a bundle"


def _windows(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers or 'none', got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"windows must be positive, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help="run directory to export")
    p.add_argument("--out", help="bundle directory to write")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=None, help="window of the exported graphs (default: the model's)")
    p.add_argument(
        "--windows",
        type=_windows,
        default=None,
        help="extra scores graphs for short sessions, e.g. 16,64 (the default below 50k items); 'none' for none",
    )
    p.add_argument(
        "--shortlist",
        type=int,
        default=None,
        help="size S of the int8 shortlist graph for large catalogues (default: 256 from 50k items on, else 0 = none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--check", metavar="BUNDLE_DIR", help="re-verify a bundle's checksums and graph signatures")


def run(args: argparse.Namespace) -> int:
    """Export (or check); errors are raised for the caller's CLI to print as one line."""
    if args.check:
        manifest = check_bundle(args.check)
        files = ", ".join(manifest["files"])
        print(f"ok: {args.check} — checksums of {files} match; graph signatures match the manifest")
        return 0
    from sasrec_export.bundle import ExportError, export_bundle

    if not args.run_dir or not args.out:
        raise ExportError("export needs RUN_DIR and --out BUNDLE_DIR (or --check BUNDLE_DIR)")
    export_bundle(
        args.run_dir,
        args.out,
        opset=args.opset,
        max_len=args.max_len,
        windows=args.windows,
        shortlist=args.shortlist,
        overwrite=args.overwrite,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from sasrec_jax import logs
    from sasrec_jax.errors import SasrecError

    logs.console()
    p = argparse.ArgumentParser(prog="python -m sasrec_export", description=HELP)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (SasrecError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
