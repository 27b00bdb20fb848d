"""Split a streamed completion into thinking (R1's <think>...</think>) and answer text."""

from typing import Iterator, Tuple

OPEN, CLOSE = "<think>", "</think>"


class ThinkingSplitter:
    """Feed text segments; get (kind, text) pieces, kind in {"thinking", "answer"}.

    Tags may arrive split across segments, so a possible partial tag is held back until
    the next segment decides it. `in_thinking=True` for prompts that already opened
    <think> (R1's chat template ends the generation prompt with it).
    """

    def __init__(self, in_thinking: bool = False):
        self.in_thinking = in_thinking
        self.pending = ""

    def feed(self, text: str) -> Iterator[Tuple[str, str]]:
        buf = self.pending + text
        self.pending = ""
        while buf:
            tag = CLOSE if self.in_thinking else OPEN
            kind = "thinking" if self.in_thinking else "answer"
            i = buf.find(tag)
            if i >= 0:
                if buf[:i]:
                    yield kind, buf[:i]
                buf = buf[i + len(tag) :]
                self.in_thinking = not self.in_thinking
                continue
            keep = _partial_suffix(buf, tag)
            if len(buf) > keep:
                yield kind, buf[: len(buf) - keep]
            self.pending = buf[len(buf) - keep :]
            break

    def flush(self) -> Iterator[Tuple[str, str]]:
        if self.pending:
            yield ("thinking" if self.in_thinking else "answer"), self.pending
            self.pending = ""


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:n]):
            return n
    return 0


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True if the rendered prompt leaves a <think> block open (R1 templates do)."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)
