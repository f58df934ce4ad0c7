"""Preference pairs from files to training: ``records`` (read and write pair files), ``encode`` (images to
latents, once), ``latent_pairs`` (``LatentPairs``, the currency between stages) and ``sources`` (a config's
list of pair files to one cached ``LatentPairs``)."""

from .latent_pairs import LatentPairs, PairBatch
from .records import (
    PairRecord,
    read_pairs_jsonl,
    read_pickapic_parquet,
    write_pairs_jsonl,
)

__all__ = ["LatentPairs", "PairBatch", "PairRecord", "read_pairs_jsonl", "read_pickapic_parquet", "write_pairs_jsonl"]
