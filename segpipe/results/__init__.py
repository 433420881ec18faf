"""Results: one Zarr v3 group per segmented image, laid out as OME-Zarr 0.5.

Layout::

    result.zarr/                 OME image (the class probabilities, axes class/y/x) + "segpipe"
        mask           (y, x)          uint8    argmax class, 0 where nothing was written
        probabilities  (class, y, x)   float16  softmax (float32, or uint8 with CF scale_factor)
        y, x           (y,), (x,)      float64  pixel centres: microns, CRS units or pixels
        class          (class,)        str      class names
        spatial_ref    ()              int64    georeferenced input only: CF grid mapping
                                                (CRS WKT), as rioxarray reads and writes it
        levels/<k>/    the same for pyramid level k = 1, 2, ... (2**k smaller)
        labels/mask/<k> (y, x) uint8   the mask as an OME label image, one array per level,
                                       with "image-label" colours and class names
        _segpipe/      tiles_done, class_pixels (driver-owned bookkeeping)

Level 0 at the root keeps ``xarray.open_zarr(result)`` a plain Dataset, and
``xarray.open_zarr(result, group="levels/<k>")`` one level; OME readers (napari through
ome-zarr-py, ome-zarr-models) see the probability pyramid and the ``labels/mask`` pyramid.
The label arrays repeat the mask (uint8, a few percent of the store) because OME wants labels
under ``labels/`` and xarray wants a level's variables side by side.

Arrays are chunked like the output tiles and sharded by one task's block of tiles
(``task_tiles * tile`` pixels): every task writes whole shards, which is what makes
concurrent writers safe in Zarr v3. Chunks equal to the fill value are not stored.

The root attribute ``segpipe`` holds provenance and the result's ``state``, its life as an
explicit state machine in which every transition is one atomic write or an idempotent step::

    (creating)  the skeleton is built beside the path and renamed into place whole
    computing   blocks are written (whole shards) and recorded in _segpipe/tiles_done
    finalising  every tile done: the pyramid is built and the metadata consolidated
    complete    written last, with the run's summary; ``open_result`` opens only this

A run killed in any state is finished by the next run with the same inputs (only blocks not
recorded are computed again) or, with other inputs and ``overwrite``, cleanly replaced.
"""

from __future__ import annotations

from segpipe.results.pyramid import build_pyramid
from segpipe.results.reader import open_result
from segpipe.results.schema import (
    LABEL_NAME,
    PROBABILITY_DTYPES,
    STATES,
    IncompleteResultError,
    ResultMeta,
    ResultMismatchError,
    RunSummary,
    class_areas_um2,
    class_fractions,
    is_complete,
    is_result,
    level_path,
    read_attrs,
    read_meta,
    result_levels,
)
from segpipe.results.store import (
    class_pixels,
    encode_probabilities,
    finalize_result,
    mark_tiles_done,
    prepare_result,
    tiles_done,
    write_block,
    write_tiles,
)

__all__ = [
    "LABEL_NAME",
    "PROBABILITY_DTYPES",
    "STATES",
    "IncompleteResultError",
    "ResultMeta",
    "ResultMismatchError",
    "RunSummary",
    "build_pyramid",
    "class_areas_um2",
    "class_fractions",
    "class_pixels",
    "encode_probabilities",
    "finalize_result",
    "is_complete",
    "is_result",
    "level_path",
    "mark_tiles_done",
    "open_result",
    "prepare_result",
    "read_attrs",
    "read_meta",
    "result_levels",
    "tiles_done",
    "write_block",
    "write_tiles",
]
