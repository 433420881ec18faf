"""Deployment entry point: ``flows/archive.py:process_archive`` (the flow lives in
:mod:`segpipe.flows.archive`)."""

from segpipe.flows.archive import process_archive, serve_archive

__all__ = ["process_archive", "serve_archive"]
