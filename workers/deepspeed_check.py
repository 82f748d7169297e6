"""What the installed DeepSpeed would reject, or silently ignore, in a config dict.

DeepSpeed checks some config sections with pydantic (unknown fields are errors there) but
reads the others key by key (`get`, `in`, `[]`) and never looks at keys it does not ask for:
`{"wall_clock_breakdwn": true}` or `{"torch_autocast": {"enabeld": true}}` trains without a
word, with the setting left at its default. This module parses a config the way
deepspeed.initialize does, through a dict that records each key DeepSpeed looks up, and names
the top-level keys it never asked for, and inside sections the near misses of keys it did ask
for. Asking the installed DeepSpeed keeps no hand-written key list that would go stale with
each release; written by hand because neither DeepSpeed nor pydantic offers such a check.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import logging
from typing import Any, Iterator

import pydantic

from workers.deepspeed_import import import_deepspeed

# Top-level keys deepspeed.initialize reads itself (to build a device mesh), not through DeepSpeedConfig
_KEYS_READ_BY_INITIALIZE = frozenset({"sequence_parallel_size", "data_parallel_size"})
_PROBE_KEY = "gptctl_schema_probe"  # added to a section to learn whether a schema checks it


class _KeyReadRecorder(dict):
    """A config dict that notes each key looked up in it; nested sections it hands out record too."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.read: set[str] = set()
        self.sections: dict[str, _KeyReadRecorder] = {}

    def __copy__(self) -> "_KeyReadRecorder":  # DeepSpeedConfig parses a shallow copy
        twin = _KeyReadRecorder(self)
        twin.read, twin.sections = self.read, self.sections
        return twin

    def _handed_out(self, key: str, value: Any) -> Any:
        if type(value) is dict:
            value = self.sections.setdefault(key, _KeyReadRecorder(value))
        return value

    def get(self, key, default=None):
        self.read.add(key)
        return self._handed_out(key, super().__getitem__(key)) if dict.__contains__(self, key) else default

    def __getitem__(self, key):
        self.read.add(key)
        return self._handed_out(key, super().__getitem__(key))

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):  # `key in config.keys()` is a lookup too
        return _RecordedKeys(self)

    def unread(self, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], list[str], set[str]]]:
        """(section path, keys never looked up, keys looked up) for this dict and each section
        read key by key."""
        unread = [key for key in dict.keys(self) if key not in self.read]
        if unread:
            yield path, unread, self.read
        for key, section in self.sections.items():
            if section.read:  # a section handed over whole (to pydantic, say) records nothing
                yield from section.unread(path + (key,))


class _RecordedKeys:
    def __init__(self, recorder: _KeyReadRecorder) -> None:
        self._recorder = recorder

    def __contains__(self, key) -> bool:
        return key in self._recorder

    def __iter__(self):
        return iter(dict.keys(self._recorder))

    def __len__(self) -> int:
        return len(self._recorder)


def deepspeed_config_problems(config: dict[str, Any]) -> list[tuple[str, str]]:
    """What the installed DeepSpeed would reject or ignore in `config`, each as (key path, why);
    the path is empty where DeepSpeed's check names no key.

    Parses without a model or process group, so the spec check runs it before a job is
    submitted and the worker before its engine starts.
    """
    recorder = _KeyReadRecorder(config)
    rejected = _parse(recorder)
    if rejected:
        return rejected
    problems = []
    for path, keys, known in recorder.unread():
        if path and _schema_checks(config, path):  # its unknown fields would have been rejected
            continue
        if not path:
            keys = [key for key in keys if key not in _KEYS_READ_BY_INITIALIZE]
            known = known | _KEYS_READ_BY_INITIALIZE
        candidates = sorted(map(str, known))
        for key in keys:
            close = difflib.get_close_matches(str(key), candidates, n=1)
            # Inside a section, only a near miss of a key DeepSpeed asked for is named: DeepSpeed
            # might read the section's other keys some way the recorder does not see, and a
            # wrong refusal would leave a valid config no way to run.
            if close or not path:
                problems.append(_ignored_key(path, key, close[0] if close else None))
    return problems


def _parse(config: dict[str, Any]) -> list[tuple[str, str]]:
    """DeepSpeed's own verdict on `config`: [] when it parses."""
    with _deepspeed_logs_quiet():
        import_deepspeed()
        from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

        try:
            DeepSpeedConfig(config)
        except pydantic.ValidationError as error:  # a section checked by a schema
            return [(_config_path(config, problem["loc"], error.title), problem["msg"]) for problem in error.errors()]
        except (AssertionError, ValueError, DeepSpeedConfigError) as error:  # its consistency checks
            return [("", str(error) or type(error).__name__)]
    return []


def _config_path(config: dict[str, Any], loc: tuple, model: str) -> str:
    """Where in the config a schema's error points: pydantic knows only the path inside its
    model, so look for the section that holds it (a missing field is named by the model)."""
    inner = tuple(map(str, loc))
    for path in _sections(config):
        if _holds(config, path + inner):
            return ".".join(path + inner)
    return f"(DeepSpeed's {model}).{'.'.join(inner)}"


def _sections(config: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every nested dict's path, outermost first."""
    yield path
    for key, value in dict.items(config):
        if isinstance(value, dict):
            yield from _sections(value, path + (key,))


def _holds(section: Any, keys: tuple[str, ...]) -> bool:
    """Whether the nested keys lead somewhere from `section`."""
    for key in keys:
        if not isinstance(section, dict) or key not in section:
            return False
        section = section[key]
    return True


def _schema_checks(config: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Whether DeepSpeed rejects an unknown field in this section: parse once more with one."""
    probed = copy.deepcopy(config)
    _section(probed, path)[_PROBE_KEY] = True
    return any(_PROBE_KEY in where for where, _ in _parse(probed))


def _section(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        config = config[key]
    return config


def _ignored_key(path: tuple[str, ...], key: str, close: str | None) -> tuple[str, str]:
    hint = f"; did you mean {close}?" if close else ""
    return (".".join((*path, key)),
            f"not a setting DeepSpeed {import_deepspeed().__version__} reads, so it would be ignored{hint}")


@contextlib.contextmanager
def _deepspeed_logs_quiet() -> Iterator[None]:
    """A spec check prints only what is wrong with the spec: not DeepSpeed's accelerator guess
    on import (the submitting machine need not be a worker) nor its config's INFO lines."""
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils configures

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    deepspeed_logger.addFilter(errors_only)
    try:
        yield
    finally:
        deepspeed_logger.removeFilter(errors_only)
