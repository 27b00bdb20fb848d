"""Prompt rendering, `mlxkt generate` and the multi-turn `mlxkt chat` loop."""

import sys
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from .device import wired_limit
from .generate import print_stats, stream_generate
from .sampling import Sampling
from .speculative import SpecStats
from .thinking import ThinkingSplitter, prompt_opens_thinking

DIM, RESET = "\033[2m", "\033[0m"


def render(tokenizer, messages: List[dict], use_template: bool = True) -> str:
    """Chat template if the model has one; otherwise the plain concatenated text."""
    if use_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def encode(tokenizer, text: str) -> List[int]:
    bos = tokenizer.bos_token
    # Templates already start with BOS; a plain prompt gets it from the tokenizer.
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def model_bytes(model) -> int:
    from mlx.utils import tree_reduce

    return tree_reduce(lambda a, x: a + x.nbytes, model.parameters(), 0)


class ThinkingPrinter:
    """Writes streamed text, R1's thinking dimmed (or hidden) and the answer plain."""

    def __init__(self, in_thinking: bool, hide: bool, out=None):
        self.split = ThinkingSplitter(in_thinking)
        self.hide, self.out = hide, out or sys.stdout
        self.color = self.out.isatty()

    def write(self, text: str, final: bool = False):
        pieces = list(self.split.feed(text)) + (list(self.split.flush()) if final else [])
        for kind, piece in pieces:
            if kind == "thinking":
                if self.hide:
                    continue
                piece = f"{DIM}{piece}{RESET}" if self.color else piece
            self.out.write(piece)
        self.out.flush()


def print_mtp_stats(st: SpecStats, file=None):
    if st.cycles:
        print(f"MTP: {st.acceptance:.1%} of drafts accepted, "
              f"{st.mean_accepted_length:.2f} tokens per forward", file=file or sys.stderr)


def default_mtp(mtp):
    """None = auto: speculate on GPUs (memory-bound decode), not on CPUs (compute-bound)."""
    return mx.default_device() != mx.cpu if mtp is None else mtp


def load_for_cli(model_path: str, mtp=None, distributed=None, seed=None):
    """The model for generate/chat: one process, or this rank of `mlxkt launch`."""
    if seed is not None:
        mx.random.seed(seed)
    if distributed:
        from .distributed import setup

        return setup(model_path, distributed)  # ranks > 0 follow rank 0 and exit there
    from .loader import load

    return load(model_path, mtp=default_mtp(mtp))


def run_generate(model_path: str, prompt: str, *, system=None, use_template=True,
                 max_tokens=256, sampling=Sampling(), seed=None, hide_thinking=False,
                 mtp=None, draft_tokens=1, distributed=None):
    model, tokenizer = load_for_cli(model_path, mtp, distributed, seed)
    if prompt == "-":
        prompt = sys.stdin.read()
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    text = render(tokenizer, messages, use_template)
    stats = SpecStats()
    with wired_limit(model_bytes(model)):
        responses = stream_generate(model, tokenizer, encode(tokenizer, text), max_tokens=max_tokens,
                                    sampling=sampling, draft_tokens=draft_tokens, spec_stats=stats)
        show(responses, stats, ThinkingPrinter(prompt_opens_thinking(text), hide_thinking))


def show(responses, stats: SpecStats, printer: "ThinkingPrinter"):
    """Print streamed text as it comes, then the statistics lines."""
    last = None
    for r in responses:
        printer.write(r.text, final=r.finish_reason is not None)
        last = r
    print()
    if last is not None:
        print_stats(last)
        print_mtp_stats(stats)


class ChatSession:
    """Keeps the KV cache between turns; only the new suffix of the prompt is prefilled."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, use_template=True):
        self.model, self.tokenizer = model, tokenizer
        self.messages = [{"role": "system", "content": system}] if system else []
        self.use_template = use_template
        self.cache = model.make_cache()
        self.cached: List[int] = []  # tokens whose K/V are in the cache

    def ask(self, user_text: str, max_tokens: int, sampling: Sampling = Sampling(), **gen_kw):
        self.messages.append({"role": "user", "content": user_text})
        text = render(self.tokenizer, self.messages, self.use_template)
        tokens = encode(self.tokenizer, text)
        # Reuse the longest cached prefix; templates may re-render history differently.
        p = 0
        while p < min(len(tokens) - 1, len(self.cached)) and tokens[p] == self.cached[p]:
            p += 1
        if "mtp" in self.model:
            p = max(p - 1, 0)  # the MTP entry at p-1 depends on token p, which may change
        trim_prompt_cache(self.cache, self.cache[0].offset - p)
        self.cached = tokens[:p]  # still true if the caller stops reading the reply early
        reply = []
        try:
            for r in stream_generate(self.model, self.tokenizer, tokens[p:], max_tokens=max_tokens,
                                     sampling=sampling, prompt_cache=self.cache, **gen_kw):
                reply.append(r)
                yield r
        finally:  # also when the caller stops reading early: keep history and cache in step
            self.cached = (tokens + [r.token for r in reply])[: self.cache[0].offset]
            self.messages.append({"role": "assistant", "content": "".join(r.text for r in reply)})


def run_chat(model_path: str, *, system=None, use_template=True, max_tokens=1024,
             sampling=Sampling(), seed=None, hide_thinking=False, mtp=None, draft_tokens=1,
             distributed=None):
    model, tokenizer = load_for_cli(model_path, mtp, distributed, seed)
    session = ChatSession(model, tokenizer, system, use_template)
    print("mlxkt chat: type a message; /reset clears the history, /quit or Ctrl-D exits.",
          file=sys.stderr)
    with wired_limit(model_bytes(model)):
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if line.strip() in ("/quit", "/exit"):
                return
            if line.strip() == "/reset":
                session = ChatSession(model, tokenizer, system, use_template)
                continue
            if not line.strip():
                continue
            text = render(tokenizer, session.messages + [{"role": "user", "content": line}],
                          use_template)
            stats = SpecStats()
            responses = session.ask(line, max_tokens, sampling, draft_tokens=draft_tokens,
                                    spec_stats=stats)
            show(responses, stats, ThinkingPrinter(prompt_opens_thinking(text), hide_thinking))
