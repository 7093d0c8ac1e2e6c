"""Data: the IDX format, named data sets and their sources, splits and batches."""

from .idx import FILE_NAMES, ROLES, check_images_labels, parse_idx, read_idx, write_idx
from .sources import DATASETS, DatasetSpec, acquire, cache_root
from .batching import Source, batch_positions, batches, example_shape, num_batches, shift_images
from .splits import Split, Splits, load_splits, read_folder

__all__ = [
    "DATASETS", "DatasetSpec", "FILE_NAMES", "ROLES", "Source", "Split", "Splits", "acquire",
    "batch_positions", "batches", "example_shape",
    "cache_root", "check_images_labels", "load_splits", "num_batches", "parse_idx",
    "read_folder", "read_idx", "shift_images", "write_idx",
]
