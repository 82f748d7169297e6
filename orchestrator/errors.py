"""Which exceptions mean 'your input is wrong' (exit 2) and which mean 'the job failed' (exit 1)."""
from __future__ import annotations

import httpx

from orchestrator.controller import JobFailed, JobInputError
from orchestrator.data.prepare import DataError
from orchestrator.export import ConsolidationError, HFFormatError
from orchestrator.planning import PlanError
from orchestrator.registry import RegistryError
from orchestrator.spec import SpecError
from workers.engine import PrecisionError
from workers.storage import StorageError

BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    SpecError, JobInputError, PlanError, DataError, StorageError, PrecisionError, FileNotFoundError,
    HFFormatError, ConsolidationError, RegistryError,
)
FAILED_ERRORS: tuple[type[BaseException], ...] = (JobFailed, TimeoutError, RuntimeError, httpx.HTTPError)
