"""Incremental text filters for streamed generation: stop strings and <think> splitting.

Both work on decoded text pieces (never on token ids), so a stop string or a tag that is
split across several tokens, or across several pieces, is still found. Each filter holds
back only the shortest tail that could still become a match.
"""

from typing import List, Sequence, Tuple


def _held_tail(text: str, needles: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some needle."""
    best = 0
    for needle in needles:
        for k in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Cuts the output at the first occurrence of any stop string (stop string excluded)."""

    def __init__(self, stops: Sequence[str]):
        self.stops: List[str] = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def feed(self, text: str) -> Tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
            return out, True
        keep = _held_tail(self.buf, self.stops)
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        """At the end of generation the held tail was not a stop string after all."""
        out, self.buf = self.buf, ""
        return "" if self.stopped else out


class ThinkSplitter:
    """Splits model output into (reasoning, content) the way DeepSeek's API does.

    R1-style templates end the prompt with the start tag, so the output begins inside the
    thinking part (`in_thinking=True`). Otherwise the output is content unless its first
    non-blank text is the start tag. Everything before the end tag is reasoning; the blank
    lines that follow the end tag are dropped from the content.
    """

    def __init__(self, in_thinking: bool = False, start: str = "<think>", end: str = "</think>"):
        self.start, self.end = start, end
        self.state = "thinking" if in_thinking else "opening"
        self.buf = ""

    def feed(self, text: str) -> Tuple[str, str]:
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.state == "opening":
                head = self.buf.lstrip()
                if head.startswith(self.start):
                    self.buf, self.state = head[len(self.start):], "thinking"
                    continue
                if self.start.startswith(head):  # may still become the start tag
                    return reasoning, content
                self.state = "content"
            if self.state == "after":  # drop blank lines right after </think>
                head = self.buf.lstrip()
                if not head:
                    self.buf = ""
                    return reasoning, content
                self.buf, self.state = head, "content"
            if self.state == "content":
                content += self.buf
                self.buf = ""
                return reasoning, content
            # thinking
            i = self.buf.find(self.end)
            if i >= 0:
                reasoning += self.buf[:i]
                self.buf, self.state = self.buf[i + len(self.end):], "after"
                continue
            cut = len(self.buf) - _held_tail(self.buf, [self.end])
            reasoning += self.buf[:cut]
            self.buf = self.buf[cut:]
            return reasoning, content

    def flush(self) -> Tuple[str, str]:
        out, self.buf = self.buf, ""
        if self.state == "thinking":
            return out, ""
        if self.state == "after":
            return "", out.lstrip()
        return "", out
