"""vitpipe: batch inference on images at scale (Ray Data -> ViT -> Parquet)."""

__version__ = "0.1.0"
