"""Request schemas (OpenAI and Ollama) and strict body parsing.

Types are strict (no "10" for 10, no true for 1), floats must be finite, unknown fields are
ignored (clients send many optional ones), and every failure becomes an APIError(400).
"""

import json
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import APIError

STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
MAX_STOP = 16

MaxTokens = Annotated[int, Field(ge=1, le=1 << 31)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0, le=1 << 20)]
Seed = Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


def _check_stop(v):
    stops = [v] if isinstance(v, str) else (v or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return v


# --- OpenAI ----------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = STRICT
    type: str
    text: Optional[str] = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content part of type {self.type!r} is not supported (text only)")
        return self


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _OpenAISampling(BaseModel):
    model_config = STRICT
    model: ModelName
    max_tokens: Optional[MaxTokens] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    seed: Optional[Seed] = None
    stop: Union[str, List[str], None] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    logit_bias: Optional[Dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None

    _stop = field_validator("stop")(_check_stop)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for k in v or {}:
            if not k.isdigit() or len(k) > 9:
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
        return v

    @model_validator(mode="after")
    def _options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_OpenAISampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[MaxTokens] = None


class CompletionRequest(_OpenAISampling):
    prompt: Union[str, List[TokenId]]
    suffix: Optional[str] = None
    echo: bool = False

    @model_validator(mode="after")
    def _supported(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        return self


# --- Ollama ----------------------------------------------------------------------------
class OllamaOptions(BaseModel):
    model_config = STRICT
    num_predict: Optional[Annotated[int, Field(ge=-2, le=1 << 31)]] = None  # -1: no limit, -2: fill
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    top_k: Optional[TopK] = None
    seed: Optional[Seed] = None
    stop: Optional[List[str]] = None
    repeat_penalty: Optional[Annotated[float, Field(gt=0, le=10)]] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    num_ctx: Optional[Annotated[int, Field(ge=1)]] = None  # accepted; the context is the model's

    _stop = field_validator("stop")(_check_stop)

    @field_validator("num_predict")
    @classmethod
    def _no_zero(cls, v):
        if v == 0:
            raise ValueError("num_predict must not be 0")
        return v


class _OllamaBase(BaseModel):
    model_config = STRICT
    model: ModelName
    stream: bool = True
    options: Optional[OllamaOptions] = None
    format: Union[str, dict, None] = None
    think: Union[bool, str, None] = None
    keep_alive: Union[int, float, str, None] = None
    images: Optional[List[str]] = None

    @model_validator(mode="after")
    def _supported(self):
        if self.format:
            raise ValueError("format (structured output) is not supported")
        if self.images:
            raise ValueError("images are not supported")
        return self


class OllamaMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: Optional[List[str]] = None

    @field_validator("images")
    @classmethod
    def _no_images(cls, v):
        if v:
            raise ValueError("images are not supported")
        return v


class OllamaChatRequest(_OllamaBase):
    messages: List[OllamaMessage] = []  # none: Ollama's "load the model" request


class OllamaGenerateRequest(_OllamaBase):
    prompt: str = ""
    system: Optional[str] = None
    raw: bool = False
    suffix: Optional[str] = None
    template: Optional[str] = None
    context: Optional[List[TokenId]] = None

    @model_validator(mode="after")
    def _supported_generate(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.template:
            raise ValueError("template overrides are not supported")
        return self


class OllamaShowRequest(BaseModel):
    model_config = STRICT
    model: Optional[ModelName] = None
    name: Optional[ModelName] = None  # older clients

    @model_validator(mode="after")
    def _some_name(self):
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self


# --- parsing ---------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_strings(value, depth: int = 0) -> None:
    # Lone surrogates ("\ud800") parse but cannot be tokenized.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "request contains an invalid unicode escape (lone surrogate)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def parse_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (at byte {e.start})", code="invalid_utf8")
    if not text.strip():
        raise APIError(400, "request body is empty: expected a JSON object", code="invalid_json")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"invalid JSON: {e}", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    _check_strings(data)
    return data


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc) -> str:
    # pydantic names union branches in the location ("content.list[TextPart].0"): drop them
    parts = [str(x) for x in loc if not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
    return ".".join(parts)


def validate(schema, data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # With unions, the deepest error is the one that says what is wrong inside the value.
        err = max(errors, key=lambda x: len(x["loc"]))
        loc = _field_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "field required"
        raise APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value")
