import random

from mlxkt.thinking import ThinkingSplitter, prompt_opens_thinking


def _run(chunks, in_thinking=False):
    s = ThinkingSplitter(in_thinking)
    out = [p for c in chunks for p in s.feed(c)] + list(s.flush())
    merged = {"thinking": "", "answer": ""}
    for kind, text in out:
        merged[kind] += text
    return merged


def test_tags_split_at_every_position():
    text = "<think>plan: add 2 and 2</think>The answer is 4. <b>bold</b>"
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        m = _run(chunks)
        assert m == {"thinking": "plan: add 2 and 2", "answer": "The answer is 4. <b>bold</b>"}


def test_prompt_already_in_thinking_and_unfinished():
    assert _run(["reason", "ing</th", "ink>done"], in_thinking=True) == {
        "thinking": "reasoning", "answer": "done"}
    assert _run(["still <", "thinking"], in_thinking=True) == {
        "thinking": "still <thinking", "answer": ""}


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<｜Assistant｜><think>\n")
    assert not prompt_opens_thinking("<think>a</think> next")
    assert not prompt_opens_thinking("plain")
