"""``segpipe`` command line: a thin shell over the public API.

segpipe demo [--size 8192]           synthetic slide -> Prefect flow -> areas and Dice
segpipe ingest IN OUT.zarr           any supported image -> OME-Zarr 0.5 pyramid
segpipe segment IN OUT.zarr          segment (library code, no Prefect)
segpipe info PATH                    what a result (or an image) holds
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

# Before Prefect and distributed are imported anywhere: no telemetry from a machine that may be
# offline, and no cluster start/stop chatter (dask reads its logging config at import; the
# workers inherit the environment). `-v` or these variables set by the user bring them back.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if "-v" not in sys.argv and "--verbose" not in sys.argv:
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

# The command modules import Prefect, dask and torch only inside their handlers.
from segpipe.cli import archive, results, segment, training

__all__ = ["main"]

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


def _user_errors() -> tuple[type[Exception], ...]:
    # Bad input and refusals get one line naming the file; anything else is a bug: traceback.
    from segpipe.results import IncompleteResultError

    return (ValueError, OSError, IncompleteResultError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in _COMMANDS:
        add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[argparse.Namespace], int] = args.run  # set by the command's add_* function
    try:
        return run(args)
    except _user_errors() as err:
        print(f"segpipe {args.command}: error: {err}", file=sys.stderr)
        if args.verbose:
            raise
        return 2
