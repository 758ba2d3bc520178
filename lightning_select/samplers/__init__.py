"""Samplers and clustering helpers for batch composition. They import no Lightning."""

from lightning_select.samplers.clustering import cluster_arrays, quora_clusters
from lightning_select.samplers.epoch import EpochSeededSampler, SelfShardingSampler, epoch_generator, shard
from lightning_select.samplers.epoch import shuffled_loader_kwargs
from lightning_select.samplers.hard_batches import HardBatchSampler
from lightning_select.samplers.infobatch import InfoBatchSampler
from lightning_select.samplers.no_duplicates import NoDuplicatesBatchSampler
from lightning_select.samplers.resumable import ResumableDataLoader, SkipFirst
from lightning_select.samplers.rs2 import RS2Sampler
from lightning_select.samplers.subset import SubsetSampler

__all__ = [
    "EpochSeededSampler",
    "HardBatchSampler",
    "InfoBatchSampler",
    "NoDuplicatesBatchSampler",
    "RS2Sampler",
    "ResumableDataLoader",
    "SelfShardingSampler",
    "SkipFirst",
    "SubsetSampler",
    "cluster_arrays",
    "epoch_generator",
    "quora_clusters",
    "shard",
    "shuffled_loader_kwargs",
]
