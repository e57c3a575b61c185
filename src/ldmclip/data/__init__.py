"""Image–text data for ldmclip: the embedded synthetic dataset, webdataset shards, CSV/TSV/parquet
tables and the shard writer.

Every real-data dataset yields ``Sample(image, caption, key)`` or ``None`` (a bad sample, counted by
reason); ``ImageTextCollator(tokenizer)`` turns a list of them into a ``Batch``. See
``ldmclip.data.samples``.
"""

# The embedded synthetic dataset (ldmclip.data.synthetic).
from .synthetic import (ALL_PAIRS, COLOUR_RGB, COLOURS, HELD_OUT_PAIRS, POSITIONS, RELATIONS, SEEN_PAIRS, SHAPES,
                        SIZES, SPLITS, Background, Scene, SceneObject, SyntheticScenes, SyntheticZeroShot,
                        render_scene, synthetic_retrieval_pairs, zero_shot_templates)

# Real data: samples/collation, shards, tables, the shard writer.
from .samples import (REASONS, SHARD_REASONS, BadSample, Batch, ImageTextCollator, Sample, SampleStats, decode_caption,
                      decode_image, make_dataloader)
from .shards import ShardDataset, dataset_size, expand_urls, make_shard_pipeline
from .table import CaptionTable, ImageList, read_split_file, read_table
from .writer import write_shards

__all__ = [
    # synthetic
    "ALL_PAIRS", "COLOUR_RGB", "COLOURS", "HELD_OUT_PAIRS", "POSITIONS", "RELATIONS", "SEEN_PAIRS", "SHAPES",
    "SIZES", "SPLITS", "Background", "Scene", "SceneObject", "SyntheticScenes", "SyntheticZeroShot",
    "render_scene", "synthetic_retrieval_pairs", "zero_shot_templates",
    # real data
    "REASONS", "SHARD_REASONS", "BadSample", "Batch", "CaptionTable", "ImageList", "ImageTextCollator", "Sample",
    "SampleStats", "ShardDataset", "dataset_size", "decode_caption", "decode_image",
    "expand_urls", "make_dataloader", "make_shard_pipeline", "read_split_file", "read_table",
    "write_shards",
]
