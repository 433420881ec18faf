"""Deployment entry point: ``flows/train_model.py:train_model`` (the flow lives in
:mod:`segpipe.flows.train_model`)."""

from segpipe.flows.train_model import train_model

__all__ = ["train_model"]
