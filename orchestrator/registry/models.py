"""Checkpoints as MLflow registered model versions.

The model is logged "from code" (orchestrator/registry/pyfunc.py) with the checkpoint's serving
files as artifacts, so `mlflow.pyfunc.load_model("models:/NAME/1")` generates text and the
weights stay plain safetensors: nothing in the registry is unpickled.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workers import storage
from workers.checkpointing import REQUIRED_SERVING_FILES, SERVING_FILES

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")


def register_checkpoint(run_id: str, checkpoint_uri: str, model_name: str, tracking_uri: str) -> int:
    """Log the checkpoint's serving files under the run and register them; returns the version."""
    import mlflow

    from orchestrator.registry.lora import is_lora_checkpoint, merge_lora_checkpoint

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gptctl-register-") as staging:
        local = Path(staging, "checkpoint")  # the artifact keeps this directory's name
        local.mkdir()
        if is_lora_checkpoint(checkpoint_uri):  # the registry holds what deploys: the merged model
            merge_lora_checkpoint(checkpoint_uri, local)
        else:
            for name in SERVING_FILES:
                storage.download_file(storage.join(checkpoint_uri, name), str(local / name))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"checkpoint": str(local)},
                code_paths=None,
                pip_requirements=["torch>=2.4", "tokenizers", "safetensors", "mlflow"],
                registered_model_name=model_name,
            )
    return int(info.registered_model_version)


# --------------------------------------------------------------------------- aliases and resolution
# Additive (issue 7): aliases `latest` / `best`, `models:/…` resolution, version listing.

LATEST_ALIAS = "latest"
BEST_ALIAS = "best"
VAL_LOSS_TAG = "gptctl.val_loss"
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc's artifact name (see register_checkpoint)
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


class RegistryError(ValueError):
    """A registry URI or model that cannot be resolved; the message names it and what exists."""


def is_registry_uri(uri: str) -> bool:
    return isinstance(uri, str) and uri.startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """`models:/NAME@alias` -> (NAME, alias, None); `models:/NAME/3` -> (NAME, None, 3)."""
    match = _MODEL_URI.match(uri or "")
    if not match:
        raise RegistryError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    version = match.group("version")
    return match.group("name"), match.group("alias"), int(version) if version else None


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _all_versions(client, model_name: str, extra_filter: str = "") -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = {_quoted(model_name)}{extra_filter}", max_results=1000,
                                            page_token=token)
        versions.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return versions


def _versions_of_checkpoint(client, model_name: str, checkpoint_uri: str) -> list:
    """A tag search, not a listing: a long job registers a version per checkpoint."""
    if "'" in checkpoint_uri:  # MLflow's filter syntax has no escape for it: compare here instead
        return [v for v in _all_versions(client, model_name) if (v.tags or {}).get(CHECKPOINT_TAG) == checkpoint_uri]
    return _all_versions(client, model_name, f" AND tags.`{CHECKPOINT_TAG}` = '{checkpoint_uri}'")


def _newest_version(client, model_name: str) -> int | None:
    page = client.search_model_versions(f"name = {_quoted(model_name)}", max_results=1,
                                        order_by=["version_number DESC"])
    return int(page[0].version) if page else None


def _tag_loss(version) -> float | None:
    raw = (version.tags or {}).get(VAL_LOSS_TAG)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


CHECKPOINT_TAG = "gptctl.checkpoint"


def register_and_move_aliases(run_id: str, checkpoint_uri: str, model_name: str, tracking_uri: str,
                              val_loss: float | None) -> int:
    """The checkpoint's version (registered now unless one already carries its URI), aliases moved.

    Idempotent per checkpoint URI: the controller's end-of-job call finds the version the
    per-checkpoint callback already made."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    existing = _versions_of_checkpoint(client, model_name, checkpoint_uri)
    if existing:
        version = int(existing[0].version)
    else:
        version = register_checkpoint(run_id, checkpoint_uri, model_name, tracking_uri)
        client.set_model_version_tag(model_name, str(version), CHECKPOINT_TAG, checkpoint_uri)
    set_aliases(client, model_name, version, val_loss)
    return version


def set_aliases(client, model_name: str, version: int | str, val_loss: float | None) -> dict[str, int]:
    """Record `val_loss` on the version (tag gptctl.val_loss) and move the aliases.

    `best` -> the version with the lowest finite val loss (the earlier version on a tie, so
    an equal loss never moves it); a version with no (or a non-finite) val loss never becomes
    `best`. `latest` is MLflow's own reserved alias (it refuses to set one by that name):
    `models:/NAME@latest` always resolves to the highest version, which is what this reports
    for it. Returns {alias: version} afterwards. Call after register_checkpoint with the
    run's final val/loss.
    """
    version = int(version)
    loss = float(val_loss) if val_loss is not None and math.isfinite(float(val_loss)) else None
    current_best = _version_by_alias(client, model_name, BEST_ALIAS)  # read before re-tagging
    if loss is not None:
        client.set_model_version_tag(model_name, str(version), VAL_LOSS_TAG, repr(loss))
    latest = _newest_version(client, model_name)
    if latest is None:
        raise RegistryError(f"registered model {model_name!r} has no versions")
    moved = {LATEST_ALIAS: latest}
    best = _best_after(client, model_name, current_best, version, loss)
    if best is not None:
        moved[BEST_ALIAS] = best
        client.set_registered_model_alias(model_name, BEST_ALIAS, str(best))
    return moved


def _version_by_alias(client, model_name: str, alias: str):
    """The version `alias` points to, or None where it points nowhere.

    Only MLflow's own errors mean that (each store words a missing alias differently); an
    unreachable server is raised, not mistaken for a missing alias."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def _best_after(client, model_name: str, current, version: int, loss: float | None) -> int | None:
    """The `best` version once `version` carries `loss` (None: no finite loss); `current` is the
    `best` version as it was before.

    One lookup per checkpoint rather than a listing of every version: the new loss is compared
    with the previous `best` alone. Every version is compared only where that cannot answer: no
    `best` yet (the model's first loss, or an alias removed by hand), or the best version itself
    re-tagged with a different loss."""
    current_loss = _tag_loss(current) if current is not None else None
    if loss is None:
        return int(current.version) if current_loss is not None else None
    if current_loss is None or (int(current.version) == version and loss != current_loss):
        scored = [(tagged, int(v.version)) for v in _all_versions(client, model_name)
                  if (tagged := _tag_loss(v)) is not None]
        return min(scored)[1] if scored else None
    return min((current_loss, int(current.version)), (loss, version))[1]


@dataclass
class VersionRow:
    name: str
    version: int
    aliases: list[str]
    val_loss: float | None
    run_id: str | None
    source: str
    created: int | None  # ms since the epoch


def list_model_versions(client, model_name: str | None = None) -> list[VersionRow]:
    """Every version of one registered model (or all), newest first per model, with aliases and val loss."""
    if model_name:
        names = [client.get_registered_model(model_name).name]
    else:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
    rows: list[VersionRow] = []
    for name in names:
        by_version: dict[int, list[str]] = {}
        for alias, v in (client.get_registered_model(name).aliases or {}).items():
            by_version.setdefault(int(v), []).append(alias)
        versions = sorted(_all_versions(client, name), key=lambda v: -int(v.version))
        if versions:  # MLflow's built-in alias: @latest is always the highest version
            by_version.setdefault(int(versions[0].version), []).append(LATEST_ALIAS)
        for v in versions:
            loss = _tag_loss(v)
            if loss is None and v.run_id:  # registered before aliases existed: the run's metric
                try:
                    loss = client.get_run(v.run_id).data.metrics.get("val/loss")
                except Exception:  # a deleted run must not break the listing
                    loss = None
            rows.append(VersionRow(name=name, version=int(v.version), aliases=sorted(by_version.get(int(v.version), [])),
                                   val_loss=loss, run_id=v.run_id, source=v.source,
                                   created=getattr(v, "creation_timestamp", None)))
    return rows


def _default_cache_dir() -> Path:
    return Path(os.environ.get("GPTCTL_CACHE", Path.home() / ".cache" / "gptctl")) / "registry"


def _has_checkpoint(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_SERVING_FILES)


def resolve_model_uri(uri: str, tracking_uri: str, dst_dir: str | None = None) -> str:
    """`models:/NAME@alias` or `models:/NAME/VERSION` -> a local checkpoint directory.

    Downloads only the version's `checkpoint` artifact directory (model.safetensors,
    config.json, tokenizer.json, trainer_state.json) into dst_dir, by default
    ~/.cache/gptctl/registry/<name>/<version> (a version's artifacts never change, so a
    complete cached copy is reused). Anything else (a path, s3://) is returned unchanged.
    """
    if not is_registry_uri(uri):
        return uri
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.runs import check_tracking_reachable

    name, alias, version = parse_model_uri(uri)
    check_tracking_reachable(tracking_uri, needed_by=uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if alias is not None:
            version = int(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, str(version))
    except MlflowException as e:
        known = ""
        try:
            aliases = client.get_registered_model(name).aliases or {}
            known = f"; aliases: {', '.join(f'{a}->{v}' for a, v in sorted(aliases.items())) or 'none'}"
        except MlflowException:
            known = f"; no registered model named {name!r}"
        raise RegistryError(f"{uri}: cannot resolve at {tracking_uri} ({e.message.splitlines()[0]}){known}") from None

    dest = Path(dst_dir) if dst_dir else _default_cache_dir() / name / str(version)
    if _has_checkpoint(dest):
        return str(dest)
    with tempfile.TemporaryDirectory(prefix="gptctl-resolve-") as staging:
        base = client.get_model_version_download_uri(name, str(version)).rstrip("/")
        candidates = [f"{base}/{CHECKPOINT_ARTIFACT}", f"{base}/artifacts/{CHECKPOINT_ARTIFACT}"]
        found: Path | None = None
        for i, candidate in enumerate(candidates):
            try:
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=candidate, dst_path=str(Path(staging, str(i))), tracking_uri=tracking_uri))
            except (MlflowException, OSError):
                continue
            if _has_checkpoint(local):
                found = local
                break
        if found is None:  # unknown layout: fetch the whole model and look for the directory
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(Path(staging, "all")), tracking_uri=tracking_uri))
            found = next((p for p in [local / "artifacts" / CHECKPOINT_ARTIFACT, *local.rglob(CHECKPOINT_ARTIFACT)]
                          if _has_checkpoint(p)), None)
        if found is None:
            raise RegistryError(f"{uri} (version {version}) has no '{CHECKPOINT_ARTIFACT}' artifact with "
                                "model.safetensors, config.json and tokenizer.json")
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(found.iterdir()):
            if path.is_file():
                shutil.copyfile(path, dest / f".{path.name}.part")
        for path in sorted(found.iterdir()):  # rename after every copy: a crash leaves no half checkpoint
            if path.is_file():
                os.replace(dest / f".{path.name}.part", dest / path.name)
    return str(dest)
