"""Datasets and the input pipeline.

Importing this package registers the embedded TFDS builders (`synthetic_roads`,
`synthetic_cells`, and the volumes of `synthetic_vessels`), so
`tfds.data_source('synthetic_roads', split='validation')` works once they are built
(`sources.prepare_embedded`, or any pipeline over them, builds them).
"""

from resunet_jax.data import builders, normalization, sources, transforms, volumes
from resunet_jax.data.pipeline import (
  BATCH_KEYS,
  DatasetInfo,
  dataset_info,
  default_config,
  make_pipeline,
  resolve_normalization,
  shard,
  to_global,
)
from resunet_jax.data.sources import open_split

__all__ = [
  'BATCH_KEYS',
  'DatasetInfo',
  'builders',
  'dataset_info',
  'default_config',
  'make_pipeline',
  'normalization',
  'open_split',
  'resolve_normalization',
  'shard',
  'sources',
  'to_global',
  'transforms',
  'volumes',
]
