"""segpipe: segment gigapixel images with U-Net/FCN models on Dask, stored as Zarr."""

__version__ = "0.1.0"
