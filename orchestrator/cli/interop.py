"""`gptctl export` and `gptctl models`: checkpoint interoperability commands.

Registered in orchestrator/cli/__init__.py: `register(subparsers)` gives each
parser `set_defaults(handler=fn)`, fn(args) -> exit code (0 ok, 2 bad input, 1 failed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="convert a checkpoint: Hugging Face GPT-2 directory, or consolidated safetensors",
        description="Write a checkpoint (dir, s3:// or models:/NAME@ALIAS) in another format. "
                    "--format hf: a GPT2LMHeadModel directory transformers loads offline; "
                    "--format safetensors: consolidate DeepSpeed ZeRO engine state (any stage) into "
                    "model.safetensors beside config.json/tokenizer.json; "
                    "--format gptctl: read a Hugging Face GPT-2 directory into a gptctl checkpoint "
                    "(then `gptctl data prepare --tokenizer OUT`, `init_from: OUT`). "
                    "--merge: a LoRA checkpoint's adapter merged into its base, written as a full gptctl "
                    "checkpoint (or, with --format hf, a Hugging Face directory).")
    export.add_argument("checkpoint", help="checkpoint dir, s3:// URI, or models:/NAME@ALIAS | models:/NAME/VERSION")
    export.add_argument("--format", choices=("hf", "safetensors", "gptctl"), default=None,
                        help="default: hf (gptctl with --merge)")
    export.add_argument("--merge", action="store_true",
                        help="merge a LoRA adapter checkpoint into its base (trainer_state.json's base_checkpoint)")
    export.add_argument("--base", help="--merge: the base checkpoint, where it has moved since training")
    export.add_argument("--no-resize", action="store_true",
                        help="--format gptctl: refuse instead of growing the embedding for a missing <|pad|> token")
    export.add_argument("--out", required=True, help="output dir or s3:// prefix")
    export.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ sources "
                                                "(default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    export.set_defaults(handler=cmd_export)

    models = subparsers.add_parser("models", help="registered checkpoints in the MLflow model registry")
    models.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="versions with val loss, aliases and source run")
    listing.add_argument("--name", help="one registered model (default: all)")
    listing.add_argument("--json", action="store_true", help="one JSON object per version")
    listing.add_argument("--tracking-uri", dest="tracking_uri_sub", help=argparse.SUPPRESS)
    listing.set_defaults(handler=cmd_models_list)
    get = models_sub.add_parser("get", help="download a registered checkpoint (models:/NAME@ALIAS) to a directory")
    get.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    get.add_argument("--out", help="directory (default: ~/.cache/gptctl/registry/NAME/VERSION)")
    get.add_argument("--tracking-uri", dest="tracking_uri_sub", help=argparse.SUPPRESS)
    get.set_defaults(handler=cmd_models_get)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from model.hf import HFFormatError
    from orchestrator.registry.export import ConsolidationError
    from orchestrator.registry.lora import LoraCheckpointError
    from orchestrator.registry.models import RegistryError
    from workers.storage import StorageError

    return (HFFormatError, ConsolidationError, RegistryError, StorageError, FileNotFoundError, LoraCheckpointError)


def _tracking_uri(args: argparse.Namespace) -> str:
    from orchestrator.runs import resolve_tracking_uri

    return resolve_tracking_uri(getattr(args, "tracking_uri_sub", None) or getattr(args, "tracking_uri", None))


def _run(fn, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except _bad_input_errors() as error:
        print(f"gptctl: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_export(args: argparse.Namespace) -> int:
    return _run(_export, args)


def _export(args: argparse.Namespace) -> int:
    from orchestrator.registry.export import consolidate_deepspeed, copy_checkpoint_sidecars, export_hf
    from orchestrator.registry.models import is_registry_uri, resolve_model_uri

    source = args.checkpoint
    if is_registry_uri(source):
        source = resolve_model_uri(source, _tracking_uri(args))
    if args.merge:
        return _export_merged(source, args)
    started = time.monotonic()
    if (args.format or "hf") == "hf":
        export_hf(source, args.out)
        print(f"[gptctl] wrote a Hugging Face GPT-2 directory to {args.out} "
              f"({time.monotonic() - started:.1f} s); load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")
    elif args.format == "gptctl":
        _import(source, args.out, resize_embeddings=not args.no_resize)
        print(f"[gptctl] wrote a gptctl checkpoint to {args.out} ({time.monotonic() - started:.1f} s)")
    else:
        consolidate_deepspeed(source, args.out)
        copy_checkpoint_sidecars(source, args.out)
        print(f"[gptctl] consolidated {source} into {args.out}/model.safetensors "
              f"({time.monotonic() - started:.1f} s)")
    return EXIT_OK


def _export_merged(source: str, args: argparse.Namespace) -> int:
    """--merge: base + adapter → a full checkpoint that deploys like a full fine-tune's."""
    import tempfile
    from pathlib import Path

    from orchestrator.registry.export import export_hf
    from orchestrator.registry.lora import is_lora_checkpoint, merge_lora_checkpoint
    from workers import storage

    if args.format not in (None, "gptctl", "hf"):
        print(f"gptctl: error: --merge writes --format gptctl or hf, not {args.format}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not is_lora_checkpoint(source):
        print(f"gptctl: error: --merge: {source} is not a LoRA checkpoint (no adapter_config.json)", file=sys.stderr)
        return EXIT_BAD_INPUT
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gptctl-merge-") as tmp:
        merged = merge_lora_checkpoint(source, tmp, base=args.base)
        if args.format == "hf":
            export_hf(str(merged), args.out)
        elif storage.is_s3(args.out):
            storage.upload_dir(str(merged), args.out)
        else:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for path in sorted(merged.iterdir()):
                storage.upload_file(str(path), str(Path(args.out, path.name)))
    print(f"[gptctl] merged the adapter {source} into its base: {args.out} "
          f"({'Hugging Face' if args.format == 'hf' else 'gptctl'} checkpoint, {time.monotonic() - started:.1f} s)")
    return EXIT_OK


def _import(source: str, out: str, resize_embeddings: bool) -> None:
    import tempfile

    from orchestrator.registry.export import import_hf
    from workers import storage

    if not storage.is_s3(out):
        import_hf(source, out, resize_embeddings=resize_embeddings)
        return
    with tempfile.TemporaryDirectory(prefix="gptctl-import-") as tmp:
        import_hf(source, tmp, resize_embeddings=resize_embeddings)
        storage.upload_dir(tmp, out)


def cmd_models_list(args: argparse.Namespace) -> int:
    return _run(_models_list, args)


def _models_list(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.registry.models import RegistryError, list_model_versions

    uri = _tracking_uri(args)
    try:
        rows = list_model_versions(MlflowClient(tracking_uri=uri), args.name)
    except MlflowException as e:
        raise RegistryError(f"{uri}: {e.message.splitlines()[0]}") from None
    if args.json:
        for r in rows:
            print(json.dumps({"name": r.name, "version": r.version, "aliases": r.aliases, "val_loss": r.val_loss,
                              "run_id": r.run_id, "source": r.source, "created": r.created}))
        return EXIT_OK
    if not rows:
        print(f"[gptctl] no registered models at {uri}" + (f" named {args.name!r}" if args.name else ""))
        return EXIT_OK
    table = [("NAME", "VERSION", "ALIASES", "VAL_LOSS", "RUN", "CREATED")]
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created / 1000)) if r.created else "-"
        table.append((r.name, str(r.version), ",".join(r.aliases) or "-",
                      f"{r.val_loss:.4f}" if r.val_loss is not None else "-", r.run_id or "-", created))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return EXIT_OK


def cmd_models_get(args: argparse.Namespace) -> int:
    return _run(_models_get, args)


def _models_get(args: argparse.Namespace) -> int:
    from orchestrator.registry.models import RegistryError, is_registry_uri, resolve_model_uri

    if not is_registry_uri(args.uri):
        raise RegistryError(f"{args.uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    print(resolve_model_uri(args.uri, _tracking_uri(args), args.out))
    return EXIT_OK
