"""Prefect flows for segpipe: thin orchestration over the library's public calls."""
