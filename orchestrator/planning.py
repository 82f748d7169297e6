"""Shard planning: the controller decides which worker streams which shard.

Deciding it centrally (instead of every worker splitting by rank on its own) is what lets a
resumed run reproduce its data order: the plan is a pure function of (manifest, world size).
"""
from __future__ import annotations

from dataclasses import dataclass

from workers.shards import Manifest


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class ShardPlan:
    train: list[list[str]]  # train[rank] = shard names that rank streams
    val: list[str]  # every rank evaluates a slice of these batches

    def for_rank(self, rank: int) -> list[str]:
        return self.train[rank]


def plan_shards(manifest: Manifest, world_size: int, data_uri: str = "data") -> ShardPlan:
    """Round-robin the train shards over ranks; every rank must get at least one."""
    train = [shard.name for shard in manifest.splits.get("train", [])]
    if len(train) < world_size:
        raise PlanError(
            f"{data_uri}: {len(train)} train shard(s) cannot feed {world_size} workers; "
            f"prepare the data with a smaller --rows-per-shard or lower cluster.num_workers"
        )
    val = [shard.name for shard in manifest.splits.get("val", [])]
    return ShardPlan(train=[train[rank::world_size] for rank in range(world_size)], val=val)
