"""Running a segmentation: the predictor, the block tasks, the cluster, and ``segment()``.

``predictor`` turns batches of pixels into probabilities on a device; ``tasks`` is the unit of
work (read a block's input window, predict, stitch, write whole shards); ``cluster`` lays out
and connects Dask clusters and runs a result's blocks on them; ``segment`` is the entry point
that ties them to a result store.
"""
