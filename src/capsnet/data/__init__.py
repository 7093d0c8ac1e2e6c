"""Data: the IDX format, named data sets and their sources, splits and batches."""

from .idx import FILE_NAMES, ROLES, check_images_labels, parse_idx, read_idx, write_idx
from .sources import DATASETS, DatasetSpec, acquire, cache_root
from .splits import Split, Splits, batches, load_splits, num_batches, read_folder, shift_images

__all__ = [
    "DATASETS", "DatasetSpec", "FILE_NAMES", "ROLES", "Split", "Splits", "acquire", "batches",
    "cache_root", "check_images_labels", "load_splits", "num_batches", "parse_idx",
    "read_folder", "read_idx", "shift_images", "write_idx",
]
