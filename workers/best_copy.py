"""The copy of the best weights (by val loss) under <run>/best/, uploaded off the training thread.

Ray Train uploads the checkpoints themselves; this extra copy is ours, and a synchronous upload
would stall the step that produced it. One upload runs at a time: a newer best waits for the
previous one, so best/ never mixes files of two checkpoints. trainer_state.json goes last, so
its step is that of a complete copy. An upload error surfaces at the next submit() or wait(),
failing the job (a re-submit resumes from the last complete checkpoint).
"""
from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from workers import storage
from workers.checkpointing import serving_files  # trainer_state.json last


class BestCopy:
    def __init__(self, best_uri: str) -> None:
        self.best_uri = best_uri
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptctl-best-copy")
        self._pending: Future | None = None

    def submit(self, checkpoint_dir: str) -> None:
        """Snapshot the serving files now (Ray deletes checkpoint_dir after its own upload)."""
        self.wait()
        staged = Path(tempfile.mkdtemp(prefix="gptctl-best-"))
        names = serving_files(checkpoint_dir)  # a LoRA checkpoint's are its adapter's
        for name in names:
            shutil.copy2(Path(checkpoint_dir, name), staged / name)
        self._pending = self._executor.submit(self._upload, staged, names)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def _upload(self, staged: Path, names: tuple[str, ...]) -> None:
        try:
            for name in names:
                storage.upload_file(str(staged / name), storage.join(self.best_uri, name))
        finally:
            shutil.rmtree(staged, ignore_errors=True)
