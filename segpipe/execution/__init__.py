"""Running a segmentation: the predictor, the stitcher, the block tasks, the cluster, and
``segment()``.

``predictor`` turns batches of pixels into probabilities on a device; ``pipeline`` feeds it
from I/O threads, ``gate`` sharing the CPU's cores between its passes and their work;
``stitching`` cuts a region's windows, predicts them and joins the outputs; ``tasks`` is the
unit of work (one block predicted, stitched and written as whole shards), ``lease`` a run's
writes in flight, which its end waits for and then refuses; ``foreground`` chooses the tiles
and boxes a run computes; ``schedulers`` picks the Dask scheduler a run uses; ``cluster``
lays out and connects Dask clusters and runs a result's blocks on them; ``workers`` is what
a run puts on them (its model plugin) and asks of them (amp); ``segment`` is the entry point
that ties them to a result store; ``allocator`` keeps the C heap's freed memory for the next
CPU forward pass.
"""
