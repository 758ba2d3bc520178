"""Samplers and clustering helpers for batch composition. They import no Lightning."""

from lightning_select.samplers.clustering import cluster_arrays, quora_clusters
from lightning_select.samplers.cluster_reweighted import ClusterReweightedBatchSampler, apportion, cluster_weights
from lightning_select.samplers.clustered import ClusteredBatchSampler, cluster_purity, kmeans_cluster_ids
from lightning_select.samplers.composed import ComposedBatchSampler
from lightning_select.samplers.epoch import EpochSeededSampler, SelfShardingSampler, epoch_generator, shard
from lightning_select.samplers.epoch import shuffled_loader_kwargs
from lightning_select.samplers.hard_batches import HardBatchSampler
from lightning_select.samplers.infobatch import InfoBatchSampler
from lightning_select.samplers.neighbour_exclusion import NeighbourExclusionBatchSampler
from lightning_select.samplers.no_duplicates import NoDuplicatesBatchSampler
from lightning_select.samplers.resumable import ResumableDataLoader, SkipFirst
from lightning_select.samplers.rs2 import RS2Sampler
from lightning_select.samplers.search import nearest_neighbours, neighbour_pairs
from lightning_select.samplers.subset import SubsetSampler

__all__ = [
    "ClusterReweightedBatchSampler",
    "ClusteredBatchSampler",
    "ComposedBatchSampler",
    "apportion",
    "cluster_purity",
    "cluster_weights",
    "kmeans_cluster_ids",
    "EpochSeededSampler",
    "HardBatchSampler",
    "InfoBatchSampler",
    "NeighbourExclusionBatchSampler",
    "NoDuplicatesBatchSampler",
    "RS2Sampler",
    "ResumableDataLoader",
    "SelfShardingSampler",
    "SkipFirst",
    "SubsetSampler",
    "cluster_arrays",
    "epoch_generator",
    "nearest_neighbours",
    "neighbour_pairs",
    "quora_clusters",
    "shard",
    "shuffled_loader_kwargs",
]
