"""The `many` command line (docs/design.md §5).

    many run    [--config FILE] [--store URL] [--tasks N] [--json] [--repair]
    many report [--store URL] [--json] [--out DIR]
    many ls     [--store URL] [--json] [--stage S] [--task T] [--method M]
    many export [--store URL] --out DIR
    many predict IMAGE [QUESTION] [--export DIR | --store URL] [--method M] [--task T] [--json] [--interactive]
    many gc     [--config FILE] [--store URL] [--keep-last N] [--dry-run] [--json] [--min-age-seconds S]
    many serve  [--config FILE] [--store URL] [--name NAME] (--cron "…" | --interval SECONDS)

Errors: one line on stderr, exit 2 for bad input (config, store URL, a missing store for a command that only reads,
an endpoint that does not answer, task kind, data), 1 for runtime failures, 130 when interrupted; `--debug` shows the
traceback. `many --version` prints the version. From the command line, `run` and `serve` run under a supervisor
process (flows/supervise.py) that starts a local Prefect server when none is configured and turns Ctrl-C / SIGTERM
into one line and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flows.supervise import SUPERVISOR, Interrupted, supervise

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class UsageError(ValueError):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise UsageError(f"{self.prog}: {message}")


def _quiet_environment(debug: bool) -> None:
    """Defaults that keep Prefect and Ray quiet and local; set before they are imported."""
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "INFO" if debug else "CRITICAL",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING" if debug else "CRITICAL",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def version() -> str:
    """`many <version>` of the code that runs (not of whatever distribution is installed: a source tree on
    PYTHONPATH may differ); pyproject.toml's version is kept equal (tests/flows/test_cli.py). Importing the `many`
    package loads no torch: its __init__ is a docstring and the version."""
    from many import __version__

    return f"many {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="many", description="MAny continual multimodal instruction tuning by merging, cached on Prefect + Ray")
    parser.add_argument("--version", action="version", version=version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def store_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", help="store URL: a path, file://…, or s3://bucket/prefix (default ./many-store or the config's)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    run = commands.add_parser("run", help="run the continual stream (built-in mini-UCIT by default)")
    run.add_argument("--config", help="YAML run config (default: built-in mini-UCIT, all methods)")
    run.add_argument("--tasks", type=int, help="only the first N tasks of the stream")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON")
    run.add_argument("--repair", action="store_true",
                     help="re-hash every cached stage's blobs and recompute the stages whose blobs are missing or corrupt")
    store_option(run)
    report = commands.add_parser("report", help="table and plots of the latest run, from cached stages only")
    report.add_argument("--json", action="store_true")
    report.add_argument("--out", help="write report.json/.md/.html, heatmap_<method>.png, forgetting.png and losses.png "
                        "to this directory")
    store_option(report)
    ls = commands.add_parser("ls", help="list cached stages: stage, task, method, key, size, age, seconds, host")
    ls.add_argument("--json", action="store_true", help="the rows as a JSON list")
    ls.add_argument("--stage", help="only this stage (data, base, finetune, merge, eval, …)")
    ls.add_argument("--task", help="only the stages of this task")
    ls.add_argument("--method", help="only the stages of this method row")
    store_option(ls)
    export = commands.add_parser("export", help="write the latest run's artifacts as standard files")
    export.add_argument("--out", required=True)
    store_option(export)
    predict = commands.add_parser("predict", help="answer a question about an image with the continual model")
    predict.add_argument("image", help="an image file (PNG, JPEG, …)")
    predict.add_argument("question", nargs="?", help="the question (with --interactive: read from stdin, one a line)")
    predict.add_argument("--export", metavar="DIR", help="the model of an export directory (`many export --out DIR`) "
                         "instead of the store's latest run")
    predict.add_argument("--method", default="many", help="the method's model (default many: LPM + CPM); an export "
                         "serves many, many_lpm_only, individual; a store every method it ran but cram, fwd_prompt")
    predict.add_argument("--task", help="the task whose own model answers (method individual)")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--json", action="store_true", help="print the answer and the routing weights as JSON")
    predict.add_argument("--interactive", action="store_true",
                         help="one question a line from stdin; `:image PATH` switches the image, `:quit` ends")
    store_option(predict)
    gc = commands.add_parser("gc", help="delete orphan blobs, stale runs and, with --keep-last, superseded stages")
    gc.add_argument("--keep-last", type=_keep_last, metavar="N",
                    help="keep the newest N runs per config and what they need; delete stages no kept run lists "
                         "(default: the config's store.keep_last, else keep every run)")
    gc.add_argument("--config", help="YAML run config whose store section (url, S3 settings, keep_last) gc uses")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("--json", action="store_true", help="print the report as JSON")
    gc.add_argument("--min-age-seconds", type=float, default=3600.0, help="spare files younger than this")
    store_option(gc)
    serve = commands.add_parser("serve", help="a Prefect deployment running `many run` on a schedule")
    serve.add_argument("--config", help="YAML run config, re-read at every run (a task_source in it makes the stream grow)")
    schedule = serve.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--cron", help='schedule, e.g. "0 * * * *" (hourly, UTC)')
    schedule.add_argument("--interval", type=float, metavar="SECONDS", help="schedule: a run every SECONDS seconds")
    serve.add_argument("--name", default="many", help="deployment name (default many)")
    store_option(serve)
    return parser


def _config(args: argparse.Namespace):
    """The config file with --store applied and the tasks of its task_source (if any) read now."""
    from flows.config import load_config

    load_config(args.config)  # a bad file is exit 2 in about a second: flows.config imports no torch, no Prefect
    from flows.stream import run_config

    return run_config(args.config, getattr(args, "store", None)).first(getattr(args, "tasks", None))


def _store(url: str | None, *, create: bool = False, endpoint_url: str | None = None, region: str | None = None,
           profile: str | None = None):
    """The command's store, opened before the command does anything else. Only `many run` creates a store
    (`create=True`); every other command refuses one that does not exist (`StoreNotFound`, exit 2) instead of
    creating an empty store at a mistyped URL. An endpoint that does not answer now is a bad --store / endpoint
    (exit 2), not a runtime failure."""
    from tasks.store import BadStoreURL, Store, StoreUnreachable

    try:
        return Store.open(url or "./many-store", create=create, endpoint_url=endpoint_url, region=region,
                          profile=profile)
    except StoreUnreachable as error:
        raise BadStoreURL(str(error)) from None


def _latest(store) -> dict[str, Any]:
    from tasks.store import StoreError

    try:
        return store.read_run("latest")
    except StoreError:
        raise StoreError(f"no run in store {store.url} yet: run `many run --store {store.url}` first") from None


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    spec = config.store
    # a bad URL, a missing bucket or an endpoint that does not answer: exit 2 before anything runs
    _store(spec.url, create=True, endpoint_url=spec.endpoint_url, region=spec.region, profile=spec.profile)
    from flows.preflight import preflight
    from flows.supervise import await_local_server

    preflight(config)  # task data, GPUs, user adapters: exit 2 before Prefect starts (the flow checks again)
    await_local_server()
    from flows.pipeline import continual_update

    _announce(args, config)
    started = time.monotonic()
    summary = continual_update(config, progress=True, repair=args.repair)
    _print_run(args, summary, started)
    return 0


def cmd_run_cached(args: argparse.Namespace) -> int | None:
    """`many run` when every stage it needs is cached (flows/cached.py): the same output as cmd_run, without a
    Prefect server, Ray or torch; None when there is work to do (then the supervisor runs cmd_run) or with --repair."""
    if args.repair:
        return None
    config = _config(args)
    spec = config.store
    from tasks.store import StoreNotFound

    try:  # a bad URL or an endpoint that does not answer: exit 2 here; a store not there yet holds nothing cached
        _store(spec.url, endpoint_url=spec.endpoint_url, region=spec.region, profile=spec.profile)
    except StoreNotFound:
        return None  # the supervised run creates it (after its own checks, e.g. of the Prefect API)
    from flows.cached import cached_run

    started = time.monotonic()
    summary = cached_run(config)
    if summary is None:
        return None
    _announce(args, config)
    if not args.json:  # each stage's line, as the flow prints them
        from tasks.record import print_stage_line

        for s in summary["stages"]:
            print_stage_line(s["stage"], s["task"], s["method"], s["status"], f"{s['seconds']:7.1f}s  {s['node']}")
    _print_run(args, summary, started)
    return 0


def _announce(args: argparse.Namespace, config: Any) -> None:
    if not args.json:
        print(f"many: {len(config.tasks)} tasks × {len(config.methods)} methods into {config.store.url}", file=sys.stderr)


def _print_run(args: argparse.Namespace, summary: dict[str, Any], started: float) -> None:
    if args.json:
        print(json.dumps({k: summary[k] for k in ("run_id", "stages", "report", "ray_started", "tasks", "methods")}, indent=2))
    else:
        from many.report import text_table

        computed = sum(s["status"] == "computed" for s in summary["stages"])
        print(f"run {summary['run_id']}: {computed} computed, {len(summary['stages']) - computed} cached, "
              f"{time.monotonic() - started:.1f}s", file=sys.stderr)
        print(text_table(summary["report"]))


def cmd_report(args: argparse.Namespace) -> int:
    from flows.report import loss_curves, report_from_run, timeline_from_run
    from many.report import render, text_table

    store = _store(args.store)
    summary = _latest(store)
    report = report_from_run(store, summary)
    if args.out:
        losses = loss_curves(store, summary)
        for path in render(report, Path(args.out), timeline=timeline_from_run(store, summary), losses=losses).values():
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else text_table(report))
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _age(seconds: float) -> str:
    for unit, width in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= width:
            return f"{seconds / width:.0f}{unit}"
    return f"{seconds:.0f}s"


def cmd_ls(args: argparse.Namespace) -> int:
    """The completed stages, with the task and method of each (from the run summaries; `-` where none applies or
    no finished run lists the stage yet), filtered by --stage/--task/--method (exact names)."""
    store = _store(args.store)
    everything = store.ls()
    wanted = {"stage": args.stage, "task": args.task, "method": args.method}
    rows = [r for r in everything if all(v is None or getattr(r, field) == v for field, v in wanted.items())]
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        table = [(r.stage, r.task or "-", r.method or "-", r.key[:12], _size(r.size), _age(r.age_seconds),
                  f"{r.seconds:.1f}", r.host) for r in rows]
        header = ("stage", "task", "method", "key", "size", "age", "seconds", "host")
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *table, strict=True)]
        right = {4, 5, 6}  # size, age, seconds
        for line in (header, *table):
            cells = [cell.rjust(w) if i in right else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(line, widths, strict=True))]
            print("  ".join(cells).rstrip())
        shown = f"{len(rows)} of {len(everything)}" if len(rows) != len(everything) else f"{len(rows)}"
        print(f"{shown} stages, {_size(sum(r.size for r in rows))} in {store.url}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flows.export import export

    store = _store(args.store)
    for path in export(store, _latest(store), Path(args.out)):
        print(path)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from many.inference import read_image

    if args.question is None and not args.interactive:
        raise UsageError("many predict: give a QUESTION, or --interactive to read questions from stdin")
    read_image(args.image)  # a missing image is exit 2 before the model loads
    if not args.debug:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from flows.predict import answer_record, interact, load, routing_line

    predictor = load(args.export, args.store, args.method, args.task, args.device)
    if args.interactive:
        if sys.stdin.isatty():
            print(f"{predictor!r}: ask about {args.image}; `:image PATH` switches the image, `:quit` ends", file=sys.stderr)
        from itertools import chain

        questions = chain([args.question] if args.question else [], sys.stdin)  # lazily: answer as lines come
        interact(predictor, args.image, questions, sys.stdout, sys.stderr, as_json=args.json)
        return 0
    record = answer_record(predictor, args.image, args.question)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(record["answer"])
        print(routing_line(predictor, record["routing"]))
    return 0


def _keep_last(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1")
    return int(text)


def cmd_gc(args: argparse.Namespace) -> int:
    from flows.config import StoreConfig, load_config
    from tasks.catalog import recomputable_outputs

    spec = load_config(args.config).store if args.config else StoreConfig()
    keep_last = args.keep_last if args.keep_last is not None else spec.keep_last
    # never creates a store: a missing one is bad input, like an endpoint that does not answer
    store = _store(args.store or spec.url, endpoint_url=spec.endpoint_url, region=spec.region, profile=spec.profile)
    report = store.gc(delete=not args.dry_run, min_age_seconds=args.min_age_seconds, keep_last=keep_last,
                      recomputable=recomputable_outputs())
    if args.json:
        print(json.dumps({"store": store.url, **report.as_json()}, indent=2))
    else:
        for path in report.removed:
            print(path)
    verb = "deleted" if report.deleted else "would delete"
    outputs = f"{len(report.recomputable)} superseded chain outputs (merge states), " if report.recomputable else ""
    counts = (f"{len(report.superseded)} stages, {outputs}{len(report.dropped_runs) + len(report.stale_runs)} runs, "
              f"{len(report.blobs)} blobs and {len(report.partial_files)} partial files")
    kept = f", keeping the newest {keep_last} per config: {len(report.kept_runs)} runs" if keep_last is not None else ""
    print(f"{verb} {counts} ({_size(report.freed_bytes)}) in {store.url}{kept}", file=sys.stderr)
    if report.in_progress:
        print(f"deleted nothing: in progress in {store.url}: {'; '.join(report.in_progress)}; rerun gc when they finish",
              file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect import serve
    from prefect.schedules import Cron

    from flows.config import load_config
    from flows.serve import deployment
    from flows.supervise import await_local_server

    load_config(args.config)  # a bad file is exit 2 now, not at the first scheduled run; the stream is read per run
    if args.cron is not None:
        try:
            Cron(args.cron)
        except Exception as error:  # croniter's several error types
            raise UsageError(f"bad --cron {args.cron!r}: {error}") from None
    elif not args.interval > 0:
        raise UsageError(f"bad --interval {args.interval:g}: must be a positive number of seconds")
    config_path = str(Path(args.config).resolve()) if args.config else None
    await_local_server()
    every = f"cron {args.cron!r}" if args.cron is not None else f"every {args.interval:g} s"
    print(f"serving deployment 'scheduled-update/{args.name}' {every} (Ctrl-C stops)", file=sys.stderr, flush=True)
    serve(deployment(config_path, args.store, args.cron, args.name, interval=args.interval), print_starting_message=False)
    return 0


COMMANDS = {"run": cmd_run, "report": cmd_report, "ls": cmd_ls, "export": cmd_export, "gc": cmd_gc, "serve": cmd_serve}
COMMANDS["predict"] = cmd_predict


def _terminated(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """The `many` command. From the command line (`argv` None), `run` and `serve` run as a worker process under
    a supervisor (flows/supervise.py); called with an argument list, every command runs in this process."""
    supervised = argv is None
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    _quiet_environment(debug)
    try:
        args = build_parser().parse_args(argv)
        if supervised and args.command in ("run", "serve") and SUPERVISOR not in os.environ:
            if args.command == "run":
                previous = signal.signal(signal.SIGTERM, _terminated)  # as under the supervisor: one line, 143
                try:
                    code = cmd_run_cached(args)
                finally:
                    signal.signal(signal.SIGTERM, previous)
                if code is not None:
                    return code  # nothing to compute: no Prefect server, no Ray, no torch (flows/cached.py)
            return supervise(args.command, argv)
        return COMMANDS[args.command](args)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("many: interrupted", file=sys.stderr)
        return 130
    except Interrupted as stop:  # SIGTERM while `many run` checked its cache, before any worker started
        print(f"many: terminated by {signal.Signals(stop.signum).name}; stopped", file=sys.stderr)
        return 128 + stop.signum
    except BaseException as error:  # noqa: BLE001 - the one place errors become exit codes
        if debug:
            import traceback

            traceback.print_exc()
        from tasks.redact import redact

        message = redact(" ".join(str(error).split())) or type(error).__name__  # no userinfo or query of any URL
        bad_input = isinstance(error, ValueError)
        prefix = "many: error" if bad_input else f"many: failed ({type(error).__name__})"
        print(f"{prefix}: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
