"""A request's tokens as streamed text: whole UTF-8 characters only, stop strings cut and held back."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from jaxgpt.tokenizer import Tokenizer


class TextTracker:
    """Turns a request's new tokens into text deltas; ``stopped`` once the text holds a stop string.

    As vLLM: the stop string is not part of the text, and text that might be the start of a stop
    string is held back until it is known not to be. The end-of-text token adds no text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # all text so far (cut at a stop string)
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False

    def add(self, tokens: Sequence[int]) -> None:
        if self.stopped:
            return
        raw = self.tokenizer.decode_bytes([t for t in tokens if t != self.tokenizer.eot_id])
        searched_from = max(0, len(self.text) - self.hold)
        self.text += self._utf8.decode(raw)
        for stop in self.stop:
            at = self.text.find(stop, searched_from)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                searched_from = min(searched_from, at)

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet; unless ``final``, without a tail that a stop string could still claim."""
        if final and not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out
