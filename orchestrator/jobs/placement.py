"""Where a job's training workers run, and what a cluster of several nodes asks of the job.

On one node every process sees the same disk; on several, a worker writes its checkpoint
shards and reads its data on the node it landed on. gptctl keeps all job state in S3 and
MLflow, so a local `storage_path`, `data`, `init_from` or sqlite tracking store is refused on a
multi-node cluster before anything starts, unless the spec declares the disk shared
(`cluster.shared_storage: true`, e.g. an NFS mount at the same path on every node).
"""
from __future__ import annotations

from orchestrator.spec import ClusterSpec
from workers import storage


def scaling_config(cluster: ClusterSpec):
    """Ray Train's ScalingConfig for the spec's `cluster:` section."""
    from ray.train import ScalingConfig

    # elastic: Ray Train asks for num_workers and (re)starts the group on as many as it can get, ≥ min
    workers = (cluster.elastic.min_workers, cluster.num_workers) if cluster.elastic else cluster.num_workers
    return ScalingConfig(
        num_workers=workers, use_gpu=cluster.use_gpu,
        resources_per_worker={"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker},
        placement_strategy=cluster.placement.upper(),  # Ray's names: PACK, SPREAD
    )


def alive_node_count() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _node_local(value: str | None) -> bool:
    if not value or "${stages." in value:  # another stage's output: checked once it is known
        return False
    if "://" in value:
        return value.startswith(("file:", "sqlite:"))
    return not value.startswith("models:/")  # a bare path; a registry URI is fetched by the driver


def node_local_paths(spec, tracking_uri: str) -> list[str]:
    """The spec's fields that name a path on one node's disk, as 'field (value)'."""
    fields = {"storage_path": spec.storage_path, "data": spec.data, "init_from": getattr(spec, "init_from", None),
              "tracking.uri": tracking_uri}
    return [f"{name} ({value})" for name, value in fields.items()
            if _node_local(value) and not storage.is_s3(value)]


def multi_node_problem(spec, tracking_uri: str, nodes: int) -> str | None:
    """Why this job cannot run on a cluster of `nodes` nodes as written, or None."""
    if nodes < 2 or spec.cluster.shared_storage:
        return None
    local = node_local_paths(spec, tracking_uri)
    if not local:
        return None
    return (f"this Ray cluster has {nodes} nodes, and {', '.join(local)} "
            f"{'is a path' if len(local) == 1 else 'are paths'} on one node's disk that workers on other nodes "
            "cannot see: use s3://bucket/prefix for storage_path / data / init_from and an MLflow server "
            "(http://…) for tracking.uri, or, if every node mounts that path, set cluster.shared_storage: true")
