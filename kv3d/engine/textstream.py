"""Turning a stream of token bytes into streamed text that honours stop strings.

Tokens do not align with UTF-8 characters or with stop strings, so text is released only once
it is complete: bytes wait for the rest of their character (and are dropped if the output ends
before it), and a tail that could still become a stop string waits for the next token.
"""

from __future__ import annotations

import codecs


class IncrementalText:
    """Feeds token bytes in, gives back the text that is safe to show.

    Invariant: the concatenation of everything returned by `push` and `finish` is the decoded
    output cut before the first stop string (which is never shown).
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return newly releasable text. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(piece))

    def finish(self) -> str:
        """Flush what was held back (the output ended without a stop string).

        The bytes of a character the output stopped in the middle of (a `max_tokens` cut) are
        dropped: the character was never generated, and a U+FFFD in its place would be text
        the model did not write. Bytes that can never become a character were already replaced
        by `push`.
        """
        if self.stopped:
            return ""
        text = self._held
        self._held = ""
        return self._release(text, final=True)

    def _release(self, text: str, final: bool = False) -> str:
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0 if final else self._partial_stop_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
