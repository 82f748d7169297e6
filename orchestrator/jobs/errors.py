"""Which exceptions mean 'your input is wrong' (exit 2) and which mean 'the job failed' (exit 1)."""
from __future__ import annotations

import httpx

from orchestrator.data.prepare import DataError
from orchestrator.jobs.controller import JobFailed, JobInputError
from orchestrator.registry.export import ConsolidationError, HFFormatError
from orchestrator.registry.models import RegistryError
from orchestrator.runs import TrackingUnreachable
from orchestrator.spec import SpecError
from workers.engine import AttentionKernelError, DeepSpeedConfigError, PrecisionError
from workers.shards import ManifestError
from workers.storage import StorageError

BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    SpecError, JobInputError, DataError, StorageError, PrecisionError, AttentionKernelError, FileNotFoundError,
    HFFormatError, ConsolidationError, RegistryError, ManifestError, DeepSpeedConfigError, TrackingUnreachable,
)
FAILED_ERRORS: tuple[type[BaseException], ...] = (JobFailed, TimeoutError, RuntimeError, httpx.HTTPError)
