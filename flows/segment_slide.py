"""Deployment entry point: ``flows/segment_slide.py:segment_slide`` (the flow lives in
:mod:`segpipe.flows.segment_slide`)."""

from segpipe.flows.segment_slide import segment_slide

__all__ = ["segment_slide"]
