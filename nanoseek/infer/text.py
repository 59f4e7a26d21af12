"""Token ids in, text deltas out: incremental detokenization and stop strings.

Decoding each new token alone is wrong for byte-level BPE (a character can span tokens) and for tokenizers
whose spacing depends on the neighbour, so each step decodes a short window that starts a few tokens back
and emits only what lies past the text already emitted, holding back a trailing U+FFFD (an incomplete
character). Stop strings may span tokens too: text that could still become the start of a stop string is held
back until it cannot, and the stop string itself is never emitted (OpenAI semantics).
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.text = ""            # all text decoded so far (including the held-back tail)
        self.emitted = 0          # characters of self.text given out
        self.stopped = False      # a stop string matched; self.text ends just before it
        self._prefix = self._read = 0   # decode window: ids[_prefix:_read] produced text already in self.text

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def flush(self) -> str:
        """The generation ended without a stop match: give out everything held back."""
        if not self.stopped:
            tail = self.tokenizer.decode(self.ids[self._prefix:])[len(self.tokenizer.decode(
                self.ids[self._prefix:self._read])):]
            self.text += tail
            self._prefix = self._read = len(self.ids)
        return self._take(len(self.text))

    def _held(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out
