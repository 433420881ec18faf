"""Results: one Zarr v3 group per segmented image, laid out as OME-Zarr 0.5.

Layout (``"layout": 3`` in the ``segpipe`` attribute)::

    result.zarr/                 OME image (the class probabilities, axes class/y/x) + "segpipe";
                                 no arrays of its own
        0/                       level 0, as segmented:
            mask           (y, x)          uint8    argmax class, 0 where nothing was written
            probabilities  (class, y, x)   float16  softmax (float32, or uint8 with CF
                                                    scale_factor)
            y, x           (y,), (x,)      float64  pixel centres: microns, CRS units or pixels
            class          (class,)        str      class names
            spatial_ref    ()              int64    georeferenced input only: CF grid mapping
                                                    (CRS WKT), as rioxarray reads and writes it
        1/, 2/, ...              the same for pyramid level k (2**k smaller)
        labels/mask/<k>/mask (y, x) uint8   the mask as an OME label image, level k, with
                                            "image-label" colours and class names
        _segpipe/                tiles_done, class_pixels (driver-owned bookkeeping)

Each level is a group of its own, a sibling of the others, and each label level too, so no
group holds arrays of two sizes or lies below a level of another size: that is what
``xarray.open_datatree(result, engine="zarr")`` needs to open the whole result (a node per
level, ``labels/mask/<k>`` nodes for the label levels). One level is
``xarray.open_zarr(result, group="<k>")``, or ``open_result(result, level=k)`` with class names,
decoded uint8 probabilities and provenance. ``xarray.open_zarr(result)`` on the root gives no
arrays any more: level 0 there (layout 1) made a tree impossible, because xarray requires every
group to agree with the sizes of its ancestors and OME-Zarr 0.5 gives every level the same
dimension names. The groups are named ``"0"``, ``"1"``, ... as OME-Zarr names levels and as
``open_result(tree=True)`` names its children. OME readers (napari through ome-zarr-py,
ome-zarr-models) see the probability pyramid and the ``labels/mask`` pyramid; ome-zarr-models
(1.7 and its main branch) rejects the nested label paths in one check of its ``Labels`` model
(a direct-member lookup; OME-Zarr allows paths relative to the group), while the image and
each label image pass it on their own. The label arrays repeat the mask (uint8, a few percent
of the store) because OME wants labels under ``labels/`` and xarray wants a level's variables
side by side.

Results written before layout 2 (no ``layout`` key: level 0 at the root, level k in
``levels/<k>``, label levels at ``labels/mask/<k>``) still open, count as complete, and an
unfinished one is finished in its own layout: every path comes from
:func:`~segpipe.results.schema.level_path` and :func:`~segpipe.results.schema.label_path`
given the result's layout.

Arrays are chunked like the output tiles and sharded by one task's block of tiles
(``task_tiles * tile`` pixels): every task writes whole shards, which is what makes
concurrent writers safe in Zarr v3. Chunks equal to the fill value are not stored. Layout 3
(the paths of layout 2) shards levels 1..``layout.levels_in_blocks`` by the block halved
``k`` times, so each task writes its block's share of those levels from the block in memory
and only the small levels above them are built after the tasks; a layout-2 result builds
every level after its tasks, and an unfinished one resumes that way.

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

from segpipe.results.encoding import class_map, encode_probabilities
from segpipe.results.lock import ResultBusyError, result_lock
from segpipe.results.pyramid import build_pyramid
from segpipe.results.reader import (
    DamagedResultError,
    check_shards_present,
    naming_damage,
    open_result,
)
from segpipe.results.schema import (
    FOREGROUND_LABEL,
    LABEL_NAME,
    LAYOUT,
    LAYOUTS,
    PROBABILITY_DTYPES,
    STATES,
    IncompleteResultError,
    ResultMeta,
    ResultMismatchError,
    is_complete,
    is_result,
    label_path,
    layout_of,
    level_path,
    read_attrs,
    read_meta,
    result_levels,
)
from segpipe.results.store import (
    delete_result,
    finalize_result,
    prepare_result,
    write_block,
    write_tiles,
)
from segpipe.results.summary import RunSummary, class_areas_um2, class_fractions, coordinate_areas
from segpipe.results.tiles import (
    ResultReplacedError,
    TileRecord,
    class_pixels,
    mark_tiles_done,
    tiles_done,
)

__all__ = [
    "FOREGROUND_LABEL",
    "LABEL_NAME",
    "LAYOUT",
    "LAYOUTS",
    "PROBABILITY_DTYPES",
    "STATES",
    "DamagedResultError",
    "IncompleteResultError",
    "ResultBusyError",
    "ResultMeta",
    "ResultMismatchError",
    "ResultReplacedError",
    "RunSummary",
    "TileRecord",
    "build_pyramid",
    "check_shards_present",
    "class_areas_um2",
    "class_fractions",
    "class_map",
    "class_pixels",
    "coordinate_areas",
    "delete_result",
    "encode_probabilities",
    "finalize_result",
    "is_complete",
    "is_result",
    "label_path",
    "layout_of",
    "level_path",
    "mark_tiles_done",
    "naming_damage",
    "open_result",
    "prepare_result",
    "read_attrs",
    "read_meta",
    "result_levels",
    "result_lock",
    "tiles_done",
    "write_block",
    "write_tiles",
]
