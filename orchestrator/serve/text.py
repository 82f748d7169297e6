"""Token ids to streamed text: UTF-8-safe incremental decoding and stop strings.

A byte-level BPE token can end in the middle of a multi-byte character; such a tail is held
back until the character is complete. Stop strings (OpenAI's `stop`) end the completion at
their first occurrence; the stop string and anything after it are never returned, and text
that might be the beginning of a stop string is held back until it is clear that it is not.
"""
from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextAssembler:
    def __init__(self, tokenizer, stop: Sequence[str] | None = (), incremental: bool = True) -> None:
        """incremental=False (a non-streamed answer without stop strings) decodes once, at flush."""
        self._tokenizer = tokenizer
        self.stop = [s for s in stop or () if s]
        self._lazy = not incremental and not self.stop
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already taken
        self._read_offset = 0
        self._text = ""  # text decoded so far (complete characters only), possibly held back
        self._emitted = 0  # how much of _text has been handed out
        self.stopped = False  # a stop string was found: no more text will come

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    @property
    def token_ids(self) -> list[int]:
        """Every token pushed (also those after a stop string)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """Everything handed out so far."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that may be shown now ("" if none yet)."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        if self._lazy:
            return ""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset])
        full = decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self._text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._check_stop()
        return self._release(final=False)

    def flush(self) -> str:
        """The generation ended: decode any incomplete tail (lossily) and release held-back text."""
        if not self.stopped and self._read_offset < len(self._ids):
            decode = self._tokenizer.decode
            prefix = decode(self._ids[self._prefix_offset : self._read_offset])
            full = decode(self._ids[self._prefix_offset :])
            self._text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
            self._check_stop()
        return self._release(final=True)

    def _check_stop(self) -> None:
        if not self.stop:
            return
        # emitted text never ends with the start of a stop string (see _release), so a stop
        # string can only begin in the text not yet handed out
        start = self._emitted
        hits = [i for i in (self._text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if not final and not self.stopped and self.stop:
            pending = self._text[self._emitted :]
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(pending)), hold, -1):
                    if pending.endswith(s[:k]):
                        hold = k
                        break
            end -= hold
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
