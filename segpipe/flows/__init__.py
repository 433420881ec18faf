"""Prefect flows: thin orchestration over library calls (``segment_slide``, ``process_archive``,
``train_model``). The repository's top-level ``flows/`` files are the entry points that
deployments name; they import from here."""
