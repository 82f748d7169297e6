"""Registry: val-loss tags, `latest`/`best` aliases, models:/ resolution, `gptctl models list`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from interop_testutil import tensors_equal

from orchestrator.cli import interop as cli_interop
from orchestrator.registry.models import (
    VAL_LOSS_TAG,
    RegistryError,
    list_model_versions,
    parse_model_uri,
    register_and_move_aliases,
    register_checkpoint,
    resolve_model_uri,
    set_aliases,
)

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> tuple[str, str]:
    """A sqlite tracking store with artifacts in a temp dir, and one run to hang versions on."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("interop", artifact_location=str(root / "artifacts"))
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "val/loss", 3.25)
    return uri, run.info.run_id


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gptctl")
    cli_interop.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_parse_model_uri():
    assert parse_model_uri("models:/gpt@best") == ("gpt", "best", None)
    assert parse_model_uri("models:/gpt/12") == ("gpt", None, 12)
    for bad in ("models:/gpt", "models:/gpt/x", "s3://b/k", "models:/a@b/1"):
        with pytest.raises(RegistryError):
            parse_model_uri(bad)


def test_aliases_move_as_versions_are_registered(tracking):
    uri, run_id = tracking
    client = MlflowClient(uri)
    client.create_registered_model("aliases")
    history = []
    for loss in (2.0, 1.5, 1.7, None, 1.5, float("nan"), 1.2):
        version = client.create_model_version("aliases", source="file:///nowhere", run_id=run_id).version
        history.append(set_aliases(client, "aliases", version, loss))
    assert [h["latest"] for h in history] == [1, 2, 3, 4, 5, 6, 7]
    assert [h["best"] for h in history] == [1, 2, 2, 2, 2, 2, 7], "ties and missing/NaN losses never move best"
    assert client.get_model_version("aliases", "2").tags[VAL_LOSS_TAG] == "1.5"
    assert VAL_LOSS_TAG not in client.get_model_version("aliases", "4").tags
    assert client.get_registered_model("aliases").aliases == {"best": 7}
    assert int(client.get_model_version_by_alias("aliases", "latest").version) == 7, "MLflow's built-in @latest"
    rows = {r.version: r for r in list_model_versions(client, "aliases")}
    assert rows[7].aliases == ["best", "latest"] and rows[7].val_loss == 1.2
    assert rows[4].val_loss == 3.25, "untagged version falls back to its run's val/loss"


def test_best_is_rescored_when_the_best_version_gets_another_loss(tracking):
    """`best` is kept by comparing with the current best alone; re-tagging that version compares all."""
    uri, run_id = tracking
    client = MlflowClient(uri)
    client.create_registered_model("rescored")
    first, second = (client.create_model_version("rescored", source="file:///nowhere", run_id=run_id).version
                     for _ in range(2))
    assert set_aliases(client, "rescored", first, 1.0)["best"] == 1
    assert set_aliases(client, "rescored", second, 2.0)["best"] == 1
    assert set_aliases(client, "rescored", second, None)["best"] == 1, "no loss: best stays"
    assert set_aliases(client, "rescored", first, 3.0)["best"] == 2, "the best version got worse: rescored"
    assert client.get_registered_model("rescored").aliases == {"best": 2}


def test_register_and_move_aliases_finds_the_checkpoints_version(tracking, checkpoint, tmp_path):
    """Idempotent per checkpoint URI: found by a tag search (by a listing where the URI has a quote)."""
    uri, run_id = tracking
    versions = []
    for directory in ("step-2", "it's-step-4"):
        source = tmp_path / directory
        source.mkdir()
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            (source / name).write_bytes((checkpoint / name).read_bytes())
        (source / "trainer_state.json").write_text(json.dumps({"job_name": "t", "kind": "pretrain", "step": 2}))
        versions.append(register_and_move_aliases(run_id, str(source), "idempotent-gpt", uri, 2.0))
        assert register_and_move_aliases(run_id, str(source), "idempotent-gpt", uri, 2.0) == versions[-1]
    assert versions == [1, 2]
    assert len(MlflowClient(uri).search_model_versions("name = 'idempotent-gpt'")) == 2


@pytest.fixture(scope="module")
def registered(tracking, tmp_path_factory, checkpoint) -> tuple[str, Path]:
    """Two real versions of a tiny checkpoint, registered the way the controller does it."""
    uri, run_id = tracking
    source = tmp_path_factory.mktemp("registered")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (source / name).write_bytes((checkpoint / name).read_bytes())
    (source / "trainer_state.json").write_text(json.dumps({"job_name": "t", "kind": "pretrain", "step": 2}))
    client = MlflowClient(uri)
    first = register_checkpoint(run_id, str(source), "tiny-gpt", uri)
    set_aliases(client, "tiny-gpt", first, 2.5)
    # a second version of the same logged model: what a re-registration gives, at no logging cost
    source_uri = client.get_model_version("tiny-gpt", str(first)).source
    second = client.create_model_version("tiny-gpt", source=source_uri, run_id=run_id).version
    set_aliases(client, "tiny-gpt", second, 2.0)
    return uri, source


def test_resolve_alias_and_version_to_a_checkpoint_dir(registered, tmp_path):
    uri, source = registered
    local = Path(resolve_model_uri("models:/tiny-gpt@best", uri, str(tmp_path / "best")))
    assert tensors_equal(local / "model.safetensors", source / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "trainer_state.json"):
        assert (local / name).read_bytes() == (source / name).read_bytes()
    assert Path(resolve_model_uri("models:/tiny-gpt/1", uri, str(tmp_path / "v1"))).joinpath("model.safetensors").is_file()
    assert resolve_model_uri(str(source), uri) == str(source), "non-registry URIs pass through"


def test_resolve_default_cache_is_reused(registered, tmp_path, monkeypatch):
    uri, _ = registered
    monkeypatch.setenv("GPTCTL_CACHE", str(tmp_path))
    first = resolve_model_uri("models:/tiny-gpt@latest", uri)
    assert first == str(tmp_path / "registry" / "tiny-gpt" / "2")
    Path(first, "config.json").write_text(Path(first, "config.json").read_text())  # still complete
    assert resolve_model_uri("models:/tiny-gpt/2", uri) == first


def test_resolve_unknown_alias_names_what_exists(registered):
    uri, _ = registered
    with pytest.raises(RegistryError, match=r"aliases: best->2"):
        resolve_model_uri("models:/tiny-gpt@nope", uri)
    with pytest.raises(RegistryError, match="no registered model"):
        resolve_model_uri("models:/missing-model@best", uri)


def test_cli_models_list(registered, capsys):
    uri, _ = registered
    assert _cli(["models", "--tracking-uri", uri, "list", "--name", "tiny-gpt"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "ALIASES", "VAL_LOSS", "RUN", "CREATED"]
    newest = lines[1].split()
    assert newest[:4] == ["tiny-gpt", "2", "best,latest", "2.0000"]
    assert _cli(["models", "list", "--tracking-uri", uri, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["name"], r["version"]) for r in rows} >= {("tiny-gpt", 1), ("tiny-gpt", 2)}
    assert _cli(["models", "--tracking-uri", uri, "list", "--name", "no-such-model"]) == 2


def test_cli_export_from_registry(registered, tmp_path):
    uri, source = registered
    assert _cli(["export", "models:/tiny-gpt@best", "--format", "hf", "--out", str(tmp_path / "hf"),
                 "--tracking-uri", uri]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert _cli(["models", "--tracking-uri", uri, "get", "models:/tiny-gpt/1", "--out", str(tmp_path / "v1")]) == 0
    assert tensors_equal(tmp_path / "v1" / "model.safetensors", source / "model.safetensors")


def test_resolve_through_mlflow_server_with_s3_artifacts(mlflow_server, registered, tmp_path):
    """Proxied artifacts (mlflow-artifacts:/ URIs backed by the S3 endpoint) resolve the same way."""
    _, source = registered
    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("interop-server"))
    version = register_checkpoint(run.info.run_id, str(source), "served-gpt", mlflow_server)
    assert set_aliases(client, "served-gpt", version, 1.0) == {"latest": version, "best": version}
    local = Path(resolve_model_uri("models:/served-gpt@best", mlflow_server, str(tmp_path / "dl")))
    assert tensors_equal(local / "model.safetensors", source / "model.safetensors")
