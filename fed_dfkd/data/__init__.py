"""Datasets as whole tensors (offline only) and their partitioning between data owners."""

from fed_dfkd.data.datasets import (
    DATASETS,
    DatasetInfo,
    DatasetSplits,
    dataset_info,
    dataset_names,
    default_cache_dir,
    load_dataset,
)
from fed_dfkd.data.datasets import load_experiment_data
from fed_dfkd.data.partition import (
    class_histograms,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_schemes,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetSplits",
    "dataset_info",
    "dataset_names",
    "default_cache_dir",
    "load_dataset",
    "load_experiment_data",
    "class_histograms",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_schemes",
]
