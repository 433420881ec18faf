"""``segpipe archive`` and ``serve``: segment a folder's new or changed images, once or on a
schedule, through the Prefect flow in :mod:`segpipe.flows.archive`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from segpipe.cli.segment import add_segment_options, config_from_args

__all__ = ["add_archive", "add_serve"]


def add_archive(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    arc = sub.add_parser("archive", help="segment the new or changed images of a folder, once")
    _archive_options(arc)
    arc.add_argument(
        "--retry-failed",
        action="store_true",
        help="retry failed images now (else after a growing delay, at most 6 hours)",
    )
    arc.add_argument("--json", action="store_true", help="print JSON instead of text")
    arc.set_defaults(run=_archive)


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    srv = sub.add_parser("serve", help="run the archive flow on a cron schedule (flow.serve)")
    _archive_options(srv)
    srv.add_argument("--cron", default="0 2 * * *", metavar="SCHEDULE", help="cron schedule")
    srv.add_argument("--timezone", default="UTC", metavar="ZONE", help="time zone of the schedule")
    srv.add_argument("--name", default="archive", metavar="NAME", help="deployment name")
    srv.add_argument("--paused", action="store_true", help="register the schedule paused")
    srv.set_defaults(run=_serve)


def _archive_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="archive folder or fsspec URL")
    p.add_argument(
        "output_root", metavar="OUTPUT", help="folder of results, reports, locks and the catalog"
    )
    add_segment_options(p, overwrite=False)
    p.add_argument(
        "--pattern",
        default="*",
        metavar="GLOB",
        help="glob over each file's path under SOURCE, or its name alone (without a /): "
        "'*.svs', 'case-1*', '2026-*/*.svs'",
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=0.0,
        dest="min_age_s",
        metavar="SECONDS",
        help="skip files modified in the last N seconds (still being written)",
    )
    p.add_argument(
        "--max-concurrent", type=int, default=1, metavar="N", help="images at once in a run"
    )
    p.add_argument(
        "--concurrency-limit",
        default=None,
        metavar="NAME",
        help="name of a Prefect global concurrency limit shared across runs",
    )
    p.add_argument(
        "--retries", type=int, default=2, metavar="N", help="retries of transient failures"
    )
    p.add_argument(
        "--retry-delay",
        type=float,
        default=10.0,
        dest="retry_delay_s",
        metavar="SECONDS",
        help="wait before a retry",
    )
    p.add_argument(
        "--lock-ttl",
        type=float,
        default=600.0,
        dest="lock_ttl_s",
        metavar="SECONDS",
        help="seconds before a silent claim may be taken over",
    )
    p.add_argument(
        "--fail-on-error", action="store_true", help="end the run failed when any image failed"
    )


# The run options the flow checks before any image, and what this command calls them.
_RUN_OPTIONS = {
    "max_concurrent": "--max-concurrent",
    "retries": "--retries",
    "retry_delay_s": "--retry-delay",
    "lock_ttl_s": "--lock-ttl",
    "min_age_s": "--min-age",
}


def _archive_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The ``process_archive`` parameters after ``source``, ``output_root`` and ``model``; the
    run options checked here first, naming this command's options, and the Prefect server
    where one is named (before Prefect starts)."""
    from segpipe.atomic import check_writable
    from segpipe.flows.limits import check_run_options, require_server
    from segpipe.io.files import URLPath, location

    check_run_options(**{name: getattr(args, name) for name in _RUN_OPTIONS}, names=_RUN_OPTIONS)
    config = config_from_args(args)
    # Before Prefect starts (its failed run logs three lines), and before `serve` waits for a
    # schedule that would fail at its first run only. A file:// URL is the local path.
    source, output_root = location(args.source), location(args.output_root)
    if not isinstance(source, URLPath) and not source.is_dir():
        what = "is a file, not a folder" if source.exists() else "no such folder"
        raise FileNotFoundError(f"archive {args.source}: {what}")
    if not isinstance(output_root, URLPath):
        if output_root.exists() and not output_root.is_dir():
            raise NotADirectoryError(f"output root {args.output_root}: is a file, not a folder")
        check_writable(output_root)
    require_server()
    return {
        "config": config,
        "pattern": args.pattern,
        "min_age_s": args.min_age_s,
        "max_concurrent": args.max_concurrent,
        "concurrency_limit": args.concurrency_limit,
        "retries": args.retries,
        "retry_delay_s": args.retry_delay_s,
        "lock_ttl_s": args.lock_ttl_s,
        "fail_on_error": args.fail_on_error,
    }


def _archive(args: argparse.Namespace) -> int:
    from segpipe.flows.archive import ArchiveFailedError, process_archive

    try:
        summary = process_archive(
            args.source,
            args.output_root,
            args.model,
            retry_failed=args.retry_failed,
            **_archive_parameters(args),
        )
    except ArchiveFailedError as failed:  # --fail-on-error: the flow run failed, as asked
        summary = failed.summary
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(summary["summary"])
        for status in ("failed", "held"):
            for image, reason in summary[status].items():
                print(f"  {status}: {image}: {reason}")
    return 1 if summary.get("failed") else 0


def _serve(args: argparse.Namespace) -> int:
    from prefect.settings import get_current_settings

    parameters = _archive_parameters(args)
    # Prefect's settings hold the profile's URL (`prefect config set`, `prefect cloud login`)
    # and the environment's as it was when Prefect was imported; a host (a notebook, a test)
    # may have set the environment's since.
    if not (os.environ.get("PREFECT_API_URL") or get_current_settings().api.url):
        print(
            "segpipe serve: error: a schedule needs a Prefect server: run `prefect server start` "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set` it)",
            file=sys.stderr,
        )
        return 2
    from segpipe.flows.archive import serve_archive

    serve_archive(
        args.source,
        args.output_root,
        args.model,
        cron=args.cron,
        timezone=args.timezone,
        name=args.name,
        paused=args.paused,
        **parameters,
    )
    return 0
