"""The XMC data layer: raw Extreme Classification Repository reader, prepared parquet datasets, synthetic data.

Public API (layout and schemas in :mod:`vixml_ray.data.schema`)::

    prepare_dataset(source, out, cfg, overwrite=False) -> dict      raw XC folder -> dataset directory
    generate_synthetic(out, cfg, fmt="dataset"|"xc", overwrite=False) -> dict
    open_dataset(uri) -> Dataset                                     reading back
    register_features(dataset_uri, model_slug, info) -> dict         record an image feature cache
    split_validation(num_rows, fraction, max_rows, seed)             the validation rows carved from TRAIN
"""

from vixml_ray.data.dataset import Dataset, open_dataset, register_features, split_validation
from vixml_ray.data.prepare import prepare_dataset
from vixml_ray.data.synthetic import generate_synthetic

__all__ = [
    "Dataset",
    "generate_synthetic",
    "open_dataset",
    "prepare_dataset",
    "register_features",
    "split_validation",
]
