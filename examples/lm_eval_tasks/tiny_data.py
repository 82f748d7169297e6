"""Loads this folder's JSONL files for the tiny lm-eval tasks, offline.

A task YAML's `custom_dataset: !function tiny_data.NAME` is resolved next to the YAML, so the
data files are found wherever the repository lives (a `data_files:` path would be relative to
the current directory instead). Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def qa(**_kwargs) -> datasets.DatasetDict:
    return _load("tiny_qa.jsonl")


def text(**_kwargs) -> datasets.DatasetDict:
    return _load("tiny_text.jsonl")
