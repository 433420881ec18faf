"""Image I/O, knowing nothing of models: lazy readers per format, OME-Zarr ingest, the OME
metadata and pyramidal TIFF writers, physical units, atomic file writes, the locks of local
stores."""
