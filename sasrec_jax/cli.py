"""The `sasrec-jax` command line: a thin layer over the Python API (train, evaluate, recommend, quickstart)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sasrec_serve.bundle import BundleError

from sasrec_jax import distributed, logs
from sasrec_jax.config import (
    AUTO_LARGE_FROM_TARGETS,
    AUTO_WIDE_FROM_ITEMS,
    FORMATS,
    PRESET_CHOICES,
    DataConfig,
    ModelConfig,
    TrainConfig,
    options,
)
from sasrec_jax.errors import DistributedError, SasrecError

TABLE_METRICS = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20")


def _csv_items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def infer_format(path: str | None) -> str:
    if path is None:
        return "synthetic"
    p = Path(path)
    if p.is_dir():
        return "ml-100k"
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name == "u.data":
        return "ml-100k"
    return "sasrec"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="file or directory of interactions (not needed for --format synthetic)")
    g.add_argument(
        "--format",
        choices=FORMATS,
        help="input format (default: inferred from --data; synthetic without --data)",
    )
    g.add_argument("--user-col", default="user_id")
    g.add_argument("--item-col", default="item_id")
    g.add_argument("--time-col", default="timestamp", help="time column; without it, row order is time order")
    _add_config_options(g, DataConfig)


def _add_config_options(group, cls) -> None:
    """One option per field of a config dataclass (`config.option`): its flag, type, choices, default and help
    come from the field, so the CLI cannot drift from the library."""
    for f in options(cls):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        text = meta["help"].replace("%", "%%")  # argparse expands % in help texts
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action="store_true", help=text)
            continue
        auto = meta["auto"]
        group.add_argument(
            flag,
            dest=f.name,
            metavar=flag.lstrip("-").replace("-", "_").upper(),
            type=type(f.default),
            choices=meta["choices"],
            default=None if auto else f.default,
            help=text + (f" (default: {auto})" if auto else ""),
        )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=PRESET_CHOICES,
        default="auto",
        help="capacity for the options marked 'from --preset': small (d=64, feed-forward d, 2 blocks, dropout 0.1, "
        "batch 128, raw weights), wide (small with d=256 and dropout 0.2), large (d=128, feed-forward 4d, 3 blocks, "
        f"batch 64, --ema-decay 0.999), or auto: large from {AUTO_LARGE_FROM_TARGETS:,} training targets on, "
        f"below that wide from {AUTO_WIDE_FROM_ITEMS:,} items on, else small (docs/defaults.md; default: "
        "%(default)s)",
    )
    _add_config_options(g, ModelConfig)
    t = p.add_argument_group("training")
    _add_config_options(t, TrainConfig)
    t.add_argument("--init-embeddings", help=".parquet (item_id, embedding), .npz (ids, embeddings) or .npy + ids")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process training (jax.distributed; every process runs the same command with its own --process-id)"
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run that jax.distributed.initialize() detects from the cluster (Slurm, Open MPI, "
        "TPU pod, Kubernetes)",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (env SASREC_COORDINATOR)")
    g.add_argument("--num-processes", type=int, help="processes in the run (env SASREC_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process, 0 to N-1 (env SASREC_PROCESS_ID)")
    g.add_argument(
        "--local-devices", type=int, help="CPU devices per process, to try it on CPU (env SASREC_LOCAL_DEVICES)"
    )
    g.add_argument(
        "--heartbeat-seconds",
        type=int,
        default=None,
        help="a process silent this long is declared dead and the run ends (default: JAX's 100)",
    )


class Parser(argparse.ArgumentParser):
    """The `sasrec-jax` parser: an ArgumentParser that also keeps its subcommand parsers by name."""

    commands: dict[str, argparse.ArgumentParser]  # set by build_parser (given_options reads the train options)


def build_parser() -> Parser:
    from sasrec_jax import __version__

    parser = Parser(prog="sasrec-jax", description="SASRec in JAX/Flax: train, evaluate, recommend.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)

    p = sub.add_parser("train", help="train a model and write a run directory")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its data and settings (options given here "
        "replace them)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _add_distributed_args(p)

    p = sub.add_parser("evaluate", help="evaluate a run directory on its data's test split")
    p.add_argument("run_dir")
    p.add_argument("--test-users", type=int, default=None, help="a seeded sample of test users (0: all; default: "
                   "what training's final evaluation used)")  # fmt: skip
    p.add_argument(
        "--valid-users", type=int, default=None, help="likewise for validation users (default: what validation used)"
    )
    p.add_argument(
        "--protocol",
        choices=["full", "sampled"],
        default="full",
        help="rank each target against every item, or against 100 sampled ones (the paper's protocol)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip the random, popular and Markov baselines")
    p.add_argument("--json", action="store_true", help="print every metric as JSON instead of the table")

    p = sub.add_parser("recommend", help="recommend for a session of raw item ids")
    p.add_argument("run_dir")
    p.add_argument("--items", type=_csv_items, required=True, help="comma-separated item ids, oldest first")
    p.add_argument("-k", type=int, default=10, help="how many items")
    p.add_argument("--keep-seen", action="store_true", help="allow items of the session in the results")
    p.add_argument("--json", action="store_true", help="print JSON (recommendations, unknown, fallback) instead")

    p = sub.add_parser("plot", help="draw a run's training curves (its history.csv) into a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="the PNG to write (default: RUN_DIR/curves.png)")

    exporter = _command("export")  # the sasrec-export distribution, when installed
    p = sub.add_parser("export", help=getattr(exporter, "HELP", "export a run to an ONNX bundle (needs sasrec-export)"))
    if exporter is None:  # cmd_export says what to install
        p.add_argument("export_args", nargs=argparse.REMAINDER)
    else:
        exporter.add_arguments(p)

    p = sub.add_parser("serve", help="serve an exported bundle over HTTP (needs sasrec-serve[http])")
    try:
        from sasrec_serve.cli import add_arguments  # the flags of `python -m sasrec_serve`, defined once there
    except ImportError:  # no serve extra: cmd_serve says what to install
        p.add_argument("serve_args", nargs=argparse.REMAINDER)
    else:
        add_arguments(p)

    p = sub.add_parser("quickstart", help="the whole job on the built-in synthetic sessions, in a few minutes")
    p.add_argument("--out", default="runs/quickstart", help="run directory to write")
    p.add_argument("--max-minutes", type=float, default=4.0, help="time budget of the whole command")
    p.add_argument("--epochs", type=int, default=8, help="at most this many epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that is not a quickstart's")
    parser.commands = sub.choices  # name -> subcommand parser (given_options reads the train options)
    for name, command in sub.choices.items():
        if name != "serve":  # sasrec_serve.cli's flags state their defaults in their own texts
            _show_defaults(command)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """`--help` names every option's default: added to each help text that does not state it already (the
    options whose default comes from --preset or is chosen from the data say so in their own text)."""
    for action in parser._actions:  # argparse has no public accessor for a parser's options
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS  # `is`: 0 == False
        if not action.option_strings or unset or action.help == argparse.SUPPRESS:
            continue
        if action.help and ("default" in action.help or "%(default)" in action.help):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def _print_table(metrics: dict, out=None) -> None:
    """The test metrics of the model and the baselines as a Markdown table, and under it, on stderr, the warning
    when the model is not above the popular baseline."""
    from sasrec_jax.evaluate import weak_model_warning

    out = out or sys.stdout
    rows = [("SASRec (test)", metrics["test"])] + list(metrics.get("baselines", {}).items())
    print("| model | " + " | ".join(TABLE_METRICS) + " |", file=out)
    print("|---|" + "---|" * len(TABLE_METRICS), file=out)
    for name, m in rows:
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in TABLE_METRICS) + " |", file=out)
    warning = weak_model_warning(metrics)
    if warning:
        out.flush()  # the table first, also when stdout is a pipe
        print(warning, file=sys.stderr)


# the `train` options that are SASRec(...) arguments: --preset and every config field (dest = argument name)
ESTIMATOR_ARGS = ("preset", *(f.name for cls in (DataConfig, ModelConfig, TrainConfig) for f in options(cls)))


def estimator(args):
    """The estimator `sasrec-jax train` fits, from its parsed arguments (flags left unset are None)."""
    from sasrec_jax import SASRec

    kwargs = {name: getattr(args, name) for name in ESTIMATOR_ARGS}
    return SASRec(progress=not args.no_progress, **kwargs)


def given_options(argv: list[str]) -> set[str]:
    """The `train` options (dests) written on the command line `argv`, whatever their values."""
    parser = build_parser()
    for action in parser.commands["train"]._actions:  # argparse has no public way to ask which options were given
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def resumed_estimator(args, out: Path):
    """For `--resume`: the estimator with the run directory's own settings (config.json), replaced only by the
    options written on this command line; the data source and columns likewise come from the run directory."""
    from sasrec_jax import SASRec, checkpoint

    saved = checkpoint.read_config(out)
    given = given_options(args.argv)
    overrides = {name: getattr(args, name) for name in ESTIMATOR_ARGS if name in given}
    data_info = saved.get("data")
    info: dict = data_info if isinstance(data_info, dict) else {}
    source = info.get("source") or {}
    if "data" not in given and "format" not in given:
        if source.get("format") in (None, "dataframe"):
            raise SasrecError(
                f"{out} was trained on an in-memory DataFrame: give its data again with --data (and --format)"
            )
        args.data, args.format = source.get("path"), source["format"]
    for col in ("user_col", "item_col", "time_col"):
        if col not in given and col in info:
            setattr(args, col, info[col])
    return SASRec.from_run_config(out, config=saved, progress=not args.no_progress, **overrides)


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Whether the run directory `out` is to be replaced; refuses what the library did not write."""
    from sasrec_jax import checkpoint

    checkpoint.refuse_foreign(out, "choose a new --out")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise SasrecError(f"--resume: {out} holds no run to continue; start it without --resume")
        return False
    if resume:
        return False
    if checkpoint.never_saved(out):
        return False  # stopped before its first checkpoint: started again in place
    if not overwrite:
        raise SasrecError(
            f"{out} already exists and holds a run: pass --resume to continue it or --overwrite to replace it"
        )
    return True


def cmd_train(args) -> int:
    from sasrec_jax import budget, data, loggers

    distributed.initialize(
        distributed.Settings.from_env(
            coordinator=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            local_devices=args.local_devices,
            auto=args.distributed,
            heartbeat_seconds=args.heartbeat_seconds,
        )
    )
    out = Path(args.out)
    replace = _check_out(out, resume=args.resume, overwrite=args.overwrite)
    model = resumed_estimator(args, out) if args.resume else estimator(args)
    loggers.check_available(model.train_config.log_targets)  # before the data is read, not after
    distributed.barrier("sasrec_out_checked")  # every process looked before process 0 removes anything
    if replace and distributed.is_main():
        shutil.rmtree(out)
    distributed.barrier("sasrec_out_ready")
    fmt = args.format or infer_format(args.data)
    if fmt in ("sasrec", "csv", "parquet") and not args.data:
        raise SasrecError(f"--data is required for --format {fmt}")
    df = data.read_table(args.data, fmt)
    source = {"format": fmt, "path": str(Path(args.data).resolve()) if args.data else None}
    with budget.budget_counted_from(args.started):  # --max-minutes is the command's wall time
        model.fit(
            df,
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=args.time_col,
            run_dir=out,
            resume=args.resume,
            init_item_embeddings=args.init_embeddings,
            source=source,
        )
    model.evaluate()
    metrics = model.metrics  # the nested dict (evaluate() returns it as a tidy DataFrame)
    model.save(out)
    if distributed.is_main():
        _print_table(metrics)
        print(f"run directory: {out}")
    return 0


def cmd_evaluate(args) -> int:
    from sasrec_jax import SASRec

    model = SASRec.load(args.run_dir)
    model.evaluate(
        protocol=args.protocol,
        baselines=not args.no_baselines,
        test_users=args.test_users,
        valid_users=args.valid_users,
    )
    metrics = model.metrics
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    _print_table(metrics)
    sample = metrics["sample"]
    print(
        f"\n{metrics['protocol']} ranking; {sample['test_users']:,} of {sample['test_of']:,} test users, validation "
        f"NDCG@10 {metrics['valid']['NDCG@10']:.4f} on {sample['valid_users']:,} users (--json for every metric)"
    )
    return 0


def cmd_recommend(args) -> int:
    from sasrec_jax import SASRec

    model = SASRec.load(args.run_dir)
    rec = model.recommend(args.items, k=args.k, exclude_seen=not args.keep_seen)
    if args.json:
        out = {
            "recommendations": [{"item": item, "score": round(score, 6)} for item, score in rec],
            "unknown": list(rec.unknown),
            "fallback": rec.fallback,  # no known item: the most popular items
        }
        print(json.dumps(out, indent=2))
        return 0
    print("| rank | item | score |\n|---|---|---|")
    for rank, (item, score) in enumerate(rec, 1):
        print(f"| {rank} | {item} | {score:.4f} |")
    if rec.unknown:
        print(f"not in the catalogue, skipped: {', '.join(map(str, rec.unknown))}")
    if rec.fallback:
        print("no item of the session is known: these are the most popular items (score log(1 + count))")
    return 0


def cmd_plot(args) -> int:
    from sasrec_jax import plot

    print(f"wrote {plot.plot_run(Path(args.run_dir), Path(args.out) if args.out else None)}")
    return 0


def cmd_export(args) -> int:
    exporter = _command("export")
    if exporter is None:
        raise SasrecError(
            "export needs the exporter: pip install sasrec-export (from this repository: pip install -e ./export)"
        )
    return exporter.run(args)


def _command(name: str):
    """The module registered for `sasrec-jax NAME` under the `sasrec_jax.commands` entry point (sasrec-export
    registers `export`), or None when no installed distribution provides it."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="sasrec_jax.commands", name=name):
        try:
            return ep.load()
        except ImportError:  # registered, but a dependency of it is missing: cmd_export names the install
            return None
    return None


def cmd_serve(args) -> int:
    try:
        from sasrec_serve.cli import run  # the same options as `python -m sasrec_serve`, which needs no training extras
    except ImportError as e:
        raise SasrecError(
            f"serve needs the HTTP extra: pip install 'sasrec-serve[http]' (from this repository: "
            f"pip install -e './serve[http]') ({e})"
        ) from None
    return run(args)


def cmd_quickstart(args) -> int:
    from sasrec_jax import SASRec, budget
    from sasrec_jax.synthetic import generate_sessions

    out = Path(args.out)
    if _check_out(out, resume=False, overwrite=True):
        if not (_is_quickstart(out) or args.overwrite):
            raise SasrecError(f"{out} holds a run that quickstart did not write: pass --overwrite to replace it")
        shutil.rmtree(out)  # an earlier quickstart's run directory
    events = generate_sessions().events
    print(
        f"synthetic sessions: {events.user_id.nunique():,} users, {events.item_id.nunique():,} items, "
        f"{len(events):,} events (sasrec_jax.synthetic, seed 0)"
    )
    model = SASRec(epochs=args.epochs, max_minutes=args.max_minutes, progress=not args.no_progress)
    with budget.budget_counted_from(args.started):  # --max-minutes is the command's wall time
        model.fit(events, run_dir=out, source={"format": "synthetic", "path": None, "quickstart": True})
    model.evaluate()
    metrics = model.metrics  # the nested dict (evaluate() returns it as a tidy DataFrame)
    model.save(out)
    print()
    _print_table(metrics)
    print(f"\n{model.data_info['stopped']}; {model.data_info['train_seconds']:.0f} s of training. Run directory: {out}")
    print(f"try: sasrec-jax recommend {out} --items 1,2,3")
    return 0


def _is_quickstart(out: Path) -> bool:
    try:
        return json.loads((out / "config.json").read_text())["data"]["source"].get("quickstart") is True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # a --max-minutes budget counts from here
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv, args.started = argv, started
    logs.console()
    handler = {
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "recommend": cmd_recommend,
        "plot": cmd_plot,
        "export": cmd_export,
        "serve": cmd_serve,
        "quickstart": cmd_quickstart,
    }[args.command]
    try:
        return handler(args)
    except SasrecError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, DistributedError) and distributed.process_count_safe() > 1:
            distributed.exit_now(2)  # a normal exit would wait for the dead peer in JAX's shutdown barrier
        return 2
    except BundleError as e:  # the serving package's error (it imports nothing of sasrec_jax)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
