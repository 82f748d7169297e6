"""Data preparation: corpus -> tokenizer + WebDataset shards + manifest (see ``prepare``)."""

from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import PROMPT_TEMPLATE, DataError, format_prompt, prepare_dataset

__all__ = ["PROMPT_TEMPLATE", "DataError", "format_prompt", "prepare_dataset", "write_demo_corpus"]
