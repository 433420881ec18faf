"""``segpipe`` command line: a thin shell over the public API.

Every command is an ``add_*`` function (its options) and a handler (one library call, then
printing). :func:`main` is the one place where errors become exit codes: a user error (bad
input, a refused output, a bad setting) is one line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

# The command modules import Prefect, dask and torch only inside their handlers.
from segpipe import progress
from segpipe.cli import archive, results, segment, training
from segpipe.execution.allocator import keep_freed_memory
from segpipe.version import __version__

__all__ = ["HelpFormatter", "build_parser", "command", "main", "user_errors"]

DESCRIPTION = "Segment gigapixel images with U-Net models; results are OME-Zarr stores."
EPILOG = "Run 'segpipe COMMAND --help' for a command's options and their defaults."

# In the order `segpipe --help` lists them.
_COMMANDS = (
    segment.add_demo,
    segment.add_ingest,
    segment.add_segment,
    archive.add_archive,
    archive.add_serve,
    results.add_query,
    results.add_export,
    training.add_train,
    training.add_evaluate,
    segment.add_info,
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the help already says what its default
    is, or there is nothing to say (a flag, a positional, no default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            # `is`: a default of 0 is worth showing, and 0 == False
            or any(action.default is x for x in (None, False, argparse.SUPPRESS))
        ):
            return text
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never at a hyphen: `scheduler-address` and `--no-amp` stay whole, searchable.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions :func:`main` reports as one line and exit code 2.

    segpipe's own refusals (each names the file and what to do), the validation errors of
    ``SegmentConfig`` (ValueError naming the setting), and the operating system's (a missing or
    unreadable file, a full disk): all are about the input or the machine, not about segpipe's
    code. Anything else is a bug and keeps its traceback: TypeError too, which is what a call
    with the wrong arguments raises (segpipe raises ValueError for a user's bad value).
    """
    # Imported here: `segpipe --help` must not pay for torch or zarr.
    from segpipe.execution.schedulers import WorkersDiedError
    from segpipe.execution.stitching import PredictionError
    from segpipe.io.locks import StoreBusyError
    from segpipe.io.readers import ImageReadError
    from segpipe.models import CheckpointError
    from segpipe.results import (
        IncompleteResultError,
        ResultMismatchError,
        ResultReplacedError,
    )

    return (
        ImageReadError,
        CheckpointError,
        ResultMismatchError,
        IncompleteResultError,
        StoreBusyError,  # ResultBusyError and an ingest's
        ResultReplacedError,
        # The model's failure or NaN output at named windows of a named image (its own
        # traceback with --verbose): the model is the user's input as much as the image.
        PredictionError,
        WorkersDiedError,  # the machine's doing (memory), and the run resumes
        ValueError,
        OSError,
        *object_store_errors(),
    )


def object_store_errors() -> tuple[type[Exception], ...]:
    """An object store client's own errors, which are no OSError: S3's (botocore: no
    credentials, an endpoint not reached), where it is installed."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return ()
    return (BotoCoreError,)


def _add_global_options(p: argparse.ArgumentParser, *, default: object) -> None:
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=default,
        help="debug logging, and a traceback with every error",
    )
    loudness.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        default=default,
        help="print only errors and the final result line (no progress)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        default=default,
        help="no progress display (bars on a terminal, else a line every few seconds, on stderr)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `segpipe` parser: every command, its options and their defaults."""
    parser = argparse.ArgumentParser(
        prog="segpipe", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"segpipe {__version__}")
    _add_global_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        # Also after the command (`segpipe segment ... -v`); SUPPRESS keeps a value given
        # before it.
        _add_global_options(command, default=argparse.SUPPRESS)
    return parser


_OWN_HANDLERS: list[logging.Handler] = []  # the stderr handler main() added, if it added one


def _configure_logging(*, verbose: bool, quiet: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:  # a host that set up logging (a notebook, pytest) keeps its own
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _OWN_HANDLERS[:] = root.handlers[-1:]
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    root.setLevel(level)
    # DEBUG for segpipe only: other libraries' debug output (fsspec, numba) would drown it.
    logging.getLogger("segpipe").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # A logger with a level of its own (Prefect's run loggers: INFO, which its server gets
    # anyway) propagates past the root's level to its handlers: ours filters too, so a
    # person sees the stages' progress and warnings, and every line with -v.
    for handler in _OWN_HANDLERS:
        handler.setLevel(logging.NOTSET if verbose else level)


def _one_line(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"  # the file first, as segpipe's own errors do
    return " ".join(text.split()) or type(err).__name__


# Where Prefect logs a run's failure ("Task run failed with exception: ...", "Encountered
# exception during execution: ..."), each with its traceback: a flow's failed task, twice.
_PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class _NoUserErrorTraceback(logging.Filter):
    """Keeps a record of a user error (:func:`user_errors`) but drops its traceback: the error
    is said again in one line (:func:`main`'s last, or an archive run's list of failed
    images). A bug's record keeps its traceback: an archive run records a failed image and
    goes on, so Prefect's log is the only place it shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], user_errors()):
            record.exc_info = record.exc_text = record.stack_info = None
        return True


@contextlib.contextmanager
def _quiet_libraries(*, verbose: bool, quiet: bool) -> Iterator[None]:
    """Environment for the libraries a command imports (the handlers import Prefect and
    distributed lazily, so they read it): no telemetry from a machine that may be offline, time
    for Prefect's temporary server to start, no cluster start/stop chatter unless ``-v``,
    Prefect errors only with ``-q``, no traceback of a user error in Prefect's run logs
    unless ``-v`` (:class:`_NoUserErrorTraceback`), and tifffile's parse errors only with
    ``-v``. Variables the user set win; the caller's
    environment and loggers are given back afterwards (``main`` may run in a notebook or a
    test, not only as the ``segpipe`` process)."""
    wanted = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # Prefect's temporary server takes ~20 s to start on a busy small machine: its own
        # 20 s limit fails a demo that would have run.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    if not verbose:
        wanted["DASK_LOGGING__DISTRIBUTED"] = "warning"
        # Prefect's console only (its server still gets every line): the flow runs `serve`
        # starts are processes of their own, which log through Prefect's console handler.
        wanted["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    if quiet:
        wanted["PREFECT_LOGGING_LEVEL"] = "ERROR"
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    # On the loggers, not a handler: Prefect's console handler or the host's print them too.
    # Prefect's logging setup, run when a handler imports it, keeps a logger's filters.
    short = [] if verbose else [logging.getLogger(name) for name in _PREFECT_RUN_LOGGERS]
    no_traceback = _NoUserErrorTraceback()
    for logger in short:
        logger.addFilter(no_traceback)
    # tifffile logs what it cannot parse ("invalid value offset") above the one line a user
    # error is: segpipe's readers say what is wrong with the file themselves
    tifffile_log = logging.getLogger("tifffile")
    tifffile_level = tifffile_log.level
    if not verbose:
        tifffile_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
        for logger in short:
            logger.removeFilter(no_traceback)
        tifffile_log.setLevel(tifffile_level)


# Commands that run forward passes: on the CPU they gain from malloc keeping freed memory;
# the others (info, query, export, ingest) keep glibc's defaults.
_RUNS_MODELS = frozenset({"demo", "segment", "archive", "serve", "train", "evaluate"})


def _freeze_imports() -> None:
    """Import what running a model takes (torch, Dask, Zarr), then keep every object alive now
    out of the cyclic collector's full passes: each pass over them held the GIL, and so the
    model thread, 0.4-0.9 s (a first run at 4096^2 on 2 cores, frozen after these imports:
    0.45 s of full passes instead of 0.88 s). Frozen objects that become garbage in a cycle
    are not collected until :func:`main` unfreezes them as it returns (the ``segpipe``
    executable, :func:`command`, keeps them to its exit)."""
    import segpipe.execution.segment  # noqa: F401  (torch, dask, distributed, zarr)

    gc.freeze()


def command() -> NoReturn:
    """The ``segpipe`` executable and ``python -m segpipe.cli``: run the command line's command
    in a process of its own, and exit with the code :func:`main` would return; SIGTERM ends
    it as Ctrl-C would (:func:`_terminated`), with exit code 143."""
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(_run(sys.argv[1:], own_process=True))


def _terminated(signum: int, frame: object) -> NoReturn:
    # A service manager's stop (systemd, Kubernetes, a Prefect worker cancelling its run)
    # sends SIGTERM: leave through every cleanup on the way out (a run's end waits for its
    # writes; an archive records the image "interrupted", not killed), not mid-write.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``segpipe`` command in this process, which lives on after it (a notebook, a
    script, a test); the exit code: 0 done, 1 done with failures, 2 user error. A model
    command's frozen collector (:func:`_freeze_imports`) is unfrozen as it returns; nothing
    is frozen where the caller had frozen objects of its own."""
    return _run(argv, own_process=False)


def _run(argv: Sequence[str] | None, *, own_process: bool) -> int:
    args = build_parser().parse_args(argv)
    models = args.command in _RUNS_MODELS
    # The caller's own freeze is left alone; a process of the command's own keeps its freeze
    # to the end (unfrozen, its exit would walk every frozen object once more).
    freeze = models and (own_process or not gc.get_freeze_count())
    if models:
        keep_freed_memory()  # before any thread allocates: it binds threads yet to come
    try:
        if freeze:
            _freeze_imports()
        _configure_logging(verbose=args.verbose, quiet=args.quiet)
        run: Callable[[argparse.Namespace], int] = args.run  # set by the command's add_* function
        # One progress display for every stage the command runs (library code never prints):
        # bars on a terminal, plain lines in a log or a pipe, nothing with -q or --no-progress.
        shown = None if args.quiet or args.no_progress else progress.console(sys.stderr)
        try:
            with (
                _quiet_libraries(verbose=args.verbose, quiet=args.quiet),
                progress.reporting(shown),
            ):
                return run(args)
        except user_errors() as err:
            if args.verbose:
                traceback.print_exc()
            message = _one_line(err)
            if isinstance(err, object_store_errors()):  # it names no URL: the command line's
                urls = [a for a in argv or sys.argv[1:] if "://" in a]
                message = f"{', '.join(urls) or 'an object store'}: {type(err).__name__}: {message}"
            print(f"segpipe {args.command}: error: {message}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # Ctrl-C, in the imports too: the shell's code, no traceback
        if not own_process:
            raise
        print(f"segpipe {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if freeze and not own_process:
            gc.unfreeze()
