"""Readers per source, `prepare`, the prepared-file schema and Dataset, and the demo-data generator."""

from .prepared import PreparedDataset, PreparedWriter, open_prepared, read_metadata
from .records import SliceRecord, preprocess_image, preprocess_pair

__all__ = ["PreparedDataset", "PreparedWriter", "SliceRecord", "open_prepared", "preprocess_image",
           "preprocess_pair", "read_metadata"]
