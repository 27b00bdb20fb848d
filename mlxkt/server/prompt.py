"""Chat messages -> prompt tokens.

The tokenizer's own chat template is used when it has one. Otherwise (base models such as
the dsv3-code-tiny fixture) one of two documented fallbacks is used:

- DeepSeek layout, when the vocabulary has DeepSeek's role tokens:
    {bos}{system}<｜User｜>{user}<｜Assistant｜>{assistant}{eos}<｜User｜>...<｜Assistant｜>
- plain layout otherwise:
    {bos}{system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}{eos}\\n\\nUser: ...\\n\\nAssistant:

Thinking: if the rendered prompt ends with the tokenizer's think-start tag (R1's template
ends with "<think>\\n"), generation starts inside the reasoning part.
"""

from dataclasses import dataclass
from typing import Dict, List

USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"


@dataclass
class Prompt:
    tokens: List[int]
    text: str
    in_thinking: bool


class TemplateError(ValueError):
    pass


def _fallback(tokenizer, messages: List[Dict[str, str]]) -> str:
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    vocab = tokenizer.get_vocab()
    deepseek = USER_TOKEN in vocab and ASSISTANT_TOKEN in vocab
    system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    out = [bos, system]
    if system and not deepseek:
        out.append("\n\n")
    for m in messages:
        role, content = m["role"], m["content"]
        if role in ("system", "developer"):
            continue
        if role == "tool":
            role, content = "user", f"Tool result:\n{content}"
        if deepseek:
            out.append(USER_TOKEN + content if role == "user" else ASSISTANT_TOKEN + content + eos)
        else:
            out.append(f"User: {content}\n\n" if role == "user" else f"Assistant: {content}{eos}\n\n")
    out.append(ASSISTANT_TOKEN if deepseek else "Assistant:")
    return "".join(out)


def chat_prompt(tokenizer, messages: List[Dict[str, str]]) -> Prompt:
    """messages: [{"role": ..., "content": str}] (already validated)."""
    if getattr(tokenizer, "has_chat_template", False):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja templates raise on e.g. roles out of order
            raise TemplateError(f"the model's chat template rejected the messages: {e}") from e
    else:
        text = _fallback(tokenizer, messages)
    # The template already wrote the BOS token, if any: add no other special token.
    tokens = tokenizer.encode(text, add_special_tokens=False)
    start = tokenizer.think_start if getattr(tokenizer, "has_thinking", False) else None
    in_thinking = bool(start) and text.rstrip().endswith(start)
    return Prompt(tokens, text, in_thinking)


def raw_prompt(tokenizer, text: str) -> Prompt:
    """A completion prompt: the text as is, with the BOS token the tokenizer adds."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return Prompt(tokenizer.encode(text, add_special_tokens=add_special), text, False)
