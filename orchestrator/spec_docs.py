"""docs/job-spec.md, generated from the spec models so the reference cannot drift from the code.

    python -m orchestrator.spec_docs > docs/job-spec.md

Every field's row comes from its pydantic `description=`, type, constraints and default;
tests/orchestrator/test_docs.py fails when the committed page differs from this output.
"""
from __future__ import annotations

import re
import sys
import types
import typing
from typing import Any, Iterator

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator import spec

COMMAND = "python -m orchestrator.spec_docs > docs/job-spec.md"


def _kinds(union: Any) -> tuple[tuple[str, type[BaseModel]], ...]:
    """(kind, model) of each member of a discriminated union, so a new kind is documented too."""
    members = typing.get_args(typing.get_args(union)[0])
    return tuple((typing.get_args(m.model_fields["kind"].annotation)[0], m) for m in members)


# the kinds a spec file may have; pipeline stages with the kind each extends
KINDS = _kinds(spec.JobSpec)
STAGES = tuple((kind, stage, stage.__mro__[1]) for kind, stage in _kinds(spec.PipelineStage))

HEADER = f"""# Job spec reference

A job spec is one YAML file with a `kind`. `gptctl validate` checks it before anything runs and
names a wrong field with what was expected; `gptctl resolve` prints it as it will run.

```bash test
gptctl validate examples/pretrain.yaml
gptctl resolve examples/finetune.yaml
gptctl schema --kind deploy > deploy.schema.json
```

Values may reference environment variables as `${{VAR}}` or `${{VAR:-default}}`; fields that
look like secrets are printed and logged as `***`. Unknown fields are errors.

<!-- Generated from orchestrator/spec.py and workers/train_spec.py by
     `{COMMAND}`; edit the models' descriptions, not this page. -->
"""


def _section_models() -> list[type[BaseModel]]:
    """Every nested section reachable from the kinds, in first-seen order."""
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        for field in model.model_fields.values():
            for inner in _models_in(field.annotation):
                if inner not in seen and inner not in {m for _, m in KINDS} | {m for _, m, _ in STAGES}:
                    seen.append(inner)
                    visit(inner)

    for _, model in KINDS:
        visit(model)
    return seen


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def anchor(model: type[BaseModel]) -> str:
    """The id GitHub gives the section's heading: lower case, punctuation dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", _section_name(model).lower()).replace(" ", "-")


def _section_name(model: type[BaseModel]) -> str:
    """The YAML key a section sits under (`train`, `cluster`, …), found from its parents."""
    for _, parent in KINDS:
        for name, field in parent.model_fields.items():
            if model in set(_models_in(field.annotation)):
                return name
    for parent in _section_models():
        for name, field in parent.model_fields.items():
            if model in set(_models_in(field.annotation)):
                return f"{_section_name(parent)}.{name}"
    return model.__name__


def type_text(annotation: Any) -> str:
    """A field's type as a YAML writer reads it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is typing.Literal:
        return " / ".join(f"`{value}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        models = [m for i in inner for m in _models_in(i)]
        if len(models) > 1:  # the pipeline's stage union: documented under "Pipeline stages"
            return "stage"
        text = " or ".join(type_text(a) for a in inner)
        return f"{text} or null" if len(inner) < len(args) else text
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{_section_name(annotation)}](#{anchor(annotation)})"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((annotated_types.Ge, "≥", "ge"), (annotated_types.Gt, ">", "gt"),
           (annotated_types.Le, "≤", "le"), (annotated_types.Lt, "<", "lt"),
           (annotated_types.MinLen, "length ≥", "min_length"))


def constraint_text(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for kind, symbol, attr in _BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{symbol} {getattr(item, attr)}")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):  # a section: name only what differs from the section's own defaults
        changed = {k: v for k, v in value.model_dump().items() if v != type(value)().model_dump()[k]}
        return ", ".join(f"{k}: {_yaml(v)}" for k, v in changed.items()) or "(section defaults)"
    return "unset" if value is None else f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _cell(text: str) -> str:
    """Table-cell text: `|` would end the cell and `<name>` would be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def field_table(model: type[BaseModel], only: list[str] | None = None) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "kind")  # kind first
    for name, field in fields:
        if only is not None and name not in only:
            continue
        kind = type_text(field.annotation)
        bounds = constraint_text(field)
        kind = f"{kind} ({bounds})" if bounds else kind
        lines.append(f"| `{name}` | {_cell(kind)} | {_cell(default_text(field))} | {_cell(field.description or '')} |")
    return lines


def undescribed_fields() -> list[str]:
    """Dotted names of fields that have no description (each should have one)."""
    missing = []
    for model in [m for _, m in KINDS] + [m for _, m, _ in STAGES] + _section_models():
        missing += [f"{model.__name__}.{name}" for name, field in model.model_fields.items() if not field.description]
    return missing


def render() -> str:
    out = [HEADER]
    for kind, model in KINDS:
        out += [f"## kind: {kind}", "", _first_line(model.__doc__) or "", *field_table(model), ""]
    out += ["## Pipeline stages", "",
            "Each entry of `stages` is a pretrain, finetune or deploy spec with these fields added or changed; "
            "a stage refers to an earlier one's output as `${stages.<id>.<output>}` "
            f"(training outputs: {', '.join(spec.TRAINING_OUTPUTS)}; deploy outputs: {', '.join(spec.DEPLOY_OUTPUTS)}). "
            "Training stages inherit the pipeline's `storage_path` and `tracking` unless they set their own.", ""]
    for kind, stage, base in STAGES:
        changed = [n for n, f in stage.model_fields.items()
                   if n not in base.model_fields or repr(f) != repr(base.model_fields[n])]
        out += [f"### stage kind: {kind}", "", *field_table(stage, only=changed), ""]
    for model in _section_models():
        out += [f"## {_section_name(model)}", "", _first_line(model.__doc__) or "", *field_table(model), ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


def _first_line(doc: str | None) -> str | None:
    """A model's docstring as a sentence for the page (None for pydantic's inherited default)."""
    if not doc:
        return None
    return " ".join(doc.strip().split("\n\n")[0].split()) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
