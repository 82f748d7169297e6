"""`kind: pipeline`: run pretrain → finetune → deploy stages in order, each consuming an earlier
stage's output, with resumable state.

How a stage gets its input
  * `${stages.<id>.<output>}` anywhere in a stage's fields is replaced by that earlier stage's
    output (a stage's id is its `id:` or else its kind). Training outputs: checkpoint,
    best_checkpoint (falls back to checkpoint), run_id, model_name, model_version, model_uri,
    step. Deploy outputs: url, name.
  * A finetune stage without `init_from` and a deploy stage without `checkpoint` take the final
    checkpoint of the nearest earlier training stage.
  Both are checked by `gptctl validate` (orchestrator.spec.pipeline_problems).

State
  `<storage_path>/<name>/pipeline_state.json` (local or S3, through workers.storage) records,
  per stage id: status (running / succeeded / failed), the fingerprint of its resolved spec, its
  outputs and, for a failure, the error. The pipeline's own status is running / failed /
  succeeded.

Re-submitting
  A stage is skipped when it succeeded before with the same resolved spec (same fingerprint)
  and its output is still there (a training stage's checkpoint exists; a deployment answers
  /healthz). Everything else runs: the failed stage (a training stage resumes from its latest
  checkpoint, since its name and storage_path are unchanged), a stage whose spec changed, and —
  because their resolved inputs change — the stages after a stage that ran again.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.spec import (
    STAGE_REFERENCE,
    DeploySpec,
    FinetuneSpec,
    PipelineSpec,
    PretrainSpec,
    parse_spec,
)
from workers import storage

STATE_FILE = "pipeline_state.json"
SUCCEEDED, FAILED, RUNNING, PENDING, SKIPPED = "succeeded", "failed", "running", "pending", "skipped"


class PipelineFailed(RuntimeError):
    """A stage failed; the pipeline stopped there and its state says which one."""

    def __init__(self, message: str, stage_id: str, cause: BaseException):
        super().__init__(message)
        self.stage_id = stage_id
        self.cause = cause


@dataclass
class PipelineResult:
    name: str
    state_uri: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def state_uri(spec: PipelineSpec) -> str:
    """`<storage_path>/<name>/pipeline_state.json`, a local absolute path or an s3:// URI."""
    if storage.is_s3(spec.storage_path):
        return storage.join(spec.storage_path, spec.name, STATE_FILE)
    return str(Path(spec.storage_path).expanduser().resolve() / spec.name / STATE_FILE)


def load_state(spec: PipelineSpec) -> dict[str, Any] | None:
    return read_state(state_uri(spec))


def _save_state(uri: str, state: dict[str, Any]) -> None:
    state["updated"] = _now()
    storage.write_text(uri, json.dumps(state, indent=2, sort_keys=False) + "\n")


def _substitute(value: Any, outputs: dict[str, dict[str, Any]]) -> Any:
    """Replace `${stages.<id>.<output>}` in every string of a dumped stage."""
    if isinstance(value, dict):
        return {key: _substitute(item, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, outputs) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        stage_id, output = match.group(1), match.group(2)
        produced = outputs.get(stage_id, {}).get(output)
        if produced is None:
            raise ValueError(f"{match.group(0)}: stage {stage_id!r} produced no {output!r}")
        return str(produced)

    return STAGE_REFERENCE.sub(replace, value)


def resolve_stage(spec: PipelineSpec, index: int, outputs: dict[str, dict[str, Any]],
                  ) -> PretrainSpec | FinetuneSpec | DeploySpec:
    """The stage as a plain job spec, with references and implicit inputs filled in."""
    stage = spec.stages[index]
    data = _substitute(stage.model_dump(mode="json", exclude={"id"}), outputs)
    implicit = {"finetune": "init_from", "deploy": "checkpoint"}.get(stage.kind)
    if implicit and data.get(implicit) is None:
        data[implicit] = _previous_checkpoint(spec, index, outputs)
    return parse_spec(data, source=f"{spec.name}: stages.{index} ({spec.stage_id(index)})")


def _previous_checkpoint(spec: PipelineSpec, index: int, outputs: dict[str, dict[str, Any]]) -> str:
    for earlier in range(index - 1, -1, -1):
        if spec.stages[earlier].kind in ("pretrain", "finetune"):
            return outputs[spec.stage_id(earlier)]["checkpoint"]
    raise ValueError(f"stages.{index}: no earlier training stage")  # validation prevents this


def fingerprint(job: PretrainSpec | FinetuneSpec | DeploySpec) -> str:
    text = json.dumps(job.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _output_still_there(job, outputs: dict[str, Any]) -> bool:
    if isinstance(job, DeploySpec):
        import httpx

        try:
            return httpx.get(f"{outputs['url']}/healthz", timeout=5).status_code == 200
        except (httpx.HTTPError, KeyError):
            return False
    checkpoint = outputs.get("checkpoint")
    try:
        return bool(checkpoint) and (storage.exists(storage.join(checkpoint, "model.safetensors"))
                                     or storage.exists(storage.join(checkpoint, "adapter_model.safetensors")))
    except storage.StorageError:
        return False


def _run_training_stage(job: PretrainSpec | FinetuneSpec, address: str | None, out: Callable[[str], Any],
                        pipeline: str, stage_id: str) -> dict[str, Any]:
    from orchestrator.jobs.controller import prepare_job, run_training

    result = run_training(prepare_job(job), address=address, on_run=out)
    try:  # best effort: find a stage's run from the pipeline in the MLflow UI
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run_tracking_uri(job))
        client.set_tag(result.run_id, "gptctl.pipeline", pipeline)
        client.set_tag(result.run_id, "gptctl.stage", stage_id)
    except Exception:  # noqa: BLE001
        pass
    return {
        "checkpoint": result.checkpoint,
        "best_checkpoint": result.best_checkpoint or result.checkpoint,
        "run_id": result.run_id,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "model_uri": f"models:/{result.model_name}/{result.model_version}" if result.model_version else None,
        "step": result.step,
    }


def run_tracking_uri(job: PretrainSpec | FinetuneSpec) -> str:
    from orchestrator.runs import resolve_tracking_uri

    return resolve_tracking_uri(job.tracking.uri)


def _run_deploy_stage(job: DeploySpec, address: str | None) -> dict[str, Any]:
    from orchestrator.serve.deploy import deploy

    return {"url": deploy(job, address=address), "name": job.name}


def run_pipeline(spec: PipelineSpec, address: str | None = None, out: Callable[[str], Any] = print,
                 ) -> PipelineResult:
    """Run the stages in order, skipping those completed before; raises PipelineFailed."""
    uri = state_uri(spec)
    state = load_state(spec) or {"pipeline": spec.name, "created": _now(), "stages": {}}
    state.update({"status": RUNNING, "order": [spec.stage_id(i) for i in range(len(spec.stages))]})
    state.setdefault("stages", {})
    result = PipelineResult(name=spec.name, state_uri=uri)
    total = len(spec.stages)
    _save_state(uri, state)
    for index, stage in enumerate(spec.stages):
        stage_id = spec.stage_id(index)
        label = f"[gptctl] pipeline {spec.name}: stage {index + 1}/{total} {stage_id}"
        record = state["stages"].get(stage_id) or {}
        try:
            job = resolve_stage(spec, index, result.outputs)
        except Exception as error:  # noqa: BLE001 - a bad resolved value is this stage's failure
            _fail(uri, state, stage_id, stage.kind, None, error)
            raise PipelineFailed(f"{label} failed: {error}", stage_id, error) from error
        print_fp = fingerprint(job)
        if (record.get("status") == SUCCEEDED and record.get("fingerprint") == print_fp
                and _output_still_there(job, record.get("outputs", {}))):
            out(f"{label} ({stage.kind} '{job.name}') already succeeded; skipping")
            result.outputs[stage_id] = record["outputs"]
            result.skipped.append(stage_id)
            continue
        resumed = " (resuming)" if record.get("status") in (FAILED, RUNNING) else ""
        out(f"{label} ({stage.kind} '{job.name}') starting{resumed}")
        state["stages"][stage_id] = {"kind": stage.kind, "name": job.name, "status": RUNNING, "fingerprint": print_fp,
                                     "started": _now(), "attempts": int(record.get("attempts", 0)) + 1}
        _save_state(uri, state)
        try:
            if isinstance(job, DeploySpec):
                outputs = _run_deploy_stage(job, address)
            else:
                outputs = _run_training_stage(job, address, out, spec.name, stage_id)
        except BaseException as error:
            _fail(uri, state, stage_id, stage.kind, job, error)
            message = f"{label} ({stage.kind} '{job.name}') failed: {error}"
            if isinstance(error, Exception):
                raise PipelineFailed(message, stage_id, error) from error
            raise
        state["stages"][stage_id].update({"status": SUCCEEDED, "finished": _now(), "outputs": outputs})
        state["stages"][stage_id].pop("error", None)
        _save_state(uri, state)
        result.outputs[stage_id] = outputs
        result.ran.append(stage_id)
        summary = outputs.get("url") or outputs.get("checkpoint")
        out(f"{label} ({stage.kind} '{job.name}') succeeded: {summary}")
    state["status"] = SUCCEEDED
    state.pop("failed_stage", None)
    _save_state(uri, state)
    return result


def _fail(uri: str, state: dict, stage_id: str, kind: str, job, error: BaseException) -> None:
    record = state["stages"].setdefault(stage_id, {"kind": kind})
    record.update({"status": FAILED, "finished": _now(), "error": f"{type(error).__name__}: {error}"[:2000]})
    if job is not None:
        record["name"] = job.name
    state["status"] = FAILED
    state["failed_stage"] = stage_id
    _save_state(uri, state)


def format_state(spec: PipelineSpec | None, state: dict[str, Any] | None, where: str | None = None) -> str:
    """A table: one line per stage with its status and output (or error). Without the spec, the
    stages come from the state file itself."""
    state = state or {}
    if spec is not None:
        stages = [(spec.stage_id(i), stage.kind) for i, stage in enumerate(spec.stages)]
        name, where = spec.name, where or state_uri(spec)
    else:
        records = state.get("stages", {})
        stages = [(stage_id, records.get(stage_id, {}).get("kind", "?")) for stage_id in state.get("order", records)]
        name = state.get("pipeline", "?")
    lines = [f"pipeline {name}: {state.get('status', 'not started')}" + (f"  ({where})" if where else "")]
    records = state.get("stages", {})
    for index, (stage_id, kind) in enumerate(stages):
        record = records.get(stage_id, {})
        status = record.get("status", PENDING)
        outputs = record.get("outputs") or {}
        detail = record.get("error") if status == FAILED else (outputs.get("url") or outputs.get("checkpoint") or "")
        lines.append(f"  {index + 1}. {stage_id:<12} {kind:<9} {status:<10} {detail}")
    return "\n".join(lines)


def read_state(uri: str) -> dict[str, Any] | None:
    """The state file at `uri` (what `gptctl status <pipeline job>` reads), None if absent."""
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


def exit_code_for(error: PipelineFailed) -> int:
    """2 when the stage's input was wrong (fix the spec), 1 when it started and failed."""
    from orchestrator.jobs.errors import BAD_INPUT_ERRORS

    return 2 if isinstance(error.cause, BAD_INPUT_ERRORS) else 1


def submit_pipeline(spec: PipelineSpec, address: str | None = None, serve_forever: bool | None = None) -> int:
    """What `gptctl submit pipeline.yaml` does: run, print the stage table, return the exit code.

    On embedded Ray (no address) a pipeline that deployed keeps serving until Ctrl-C, like
    `gptctl deploy`; pass serve_forever=False to return at once.
    """
    try:
        result = run_pipeline(spec, address=address)
    except PipelineFailed as error:
        import sys

        print(f"gptctl: {error}", file=sys.stderr, flush=True)
        print(format_state(spec, load_state(spec)), flush=True)
        print(f"[gptctl] fix the spec and submit it again: completed stages are skipped, "
              f"stage {error.stage_id} resumes", flush=True)
        return exit_code_for(error)
    print(format_state(spec, load_state(spec)), flush=True)
    deployed = [outputs["url"] for outputs in result.outputs.values() if "url" in outputs]
    if serve_forever is None:
        serve_forever = address is None and bool(deployed)
    if serve_forever:
        from orchestrator.serve.deploy import serve_until_interrupted

        serve_until_interrupted()
    return 0
