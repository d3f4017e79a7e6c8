"""OpenAI's wire shapes, for the server: request bodies, the error body, and the answers of
``/v1/completions`` and ``/v1/chat/completions``, whole or as server-sent-event chunks."""

import json
import time
from typing import Any, Literal

DONE = "data: [DONE]\n\n"  # the last event of a stream


class HTTPFail(Exception):
    """An error the server answers in OpenAI's shape (``error_body``), with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def schemas() -> dict[str, Any]:
    """Request bodies as pydantic models (built on first use: pydantic comes with fastapi)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = 1
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        return_token_ids: bool = False  # deltatune's (and vLLM's) extra: the generated token ids
        ignore_eos: bool = False        # vLLM's extra: generate max_tokens tokens whatever comes

    class Completion(Sampling):
        prompt: str | list[str] | list[int]
        max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant", "developer", "tool"]
        content: str | list[dict[str, Any]] | None = None

    class Chat(Sampling):
        messages: list[Message] = Field(min_length=1)

    class Classify(BaseModel):
        model: str
        input: str | list[str]

    class LoadAdapter(BaseModel):
        lora_name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_\-.]*$")
        lora_path: str

    class UnloadAdapter(BaseModel):
        model_config = ConfigDict(extra="allow")
        lora_name: str

    return {"completion": Completion, "chat": Chat, "classify": Classify, "load": LoadAdapter, "unload": UnloadAdapter}


def completion(rid: str, model: str, chat: bool, text: str, ids: list[int] | None, finish: str | None,
               usage: dict[str, Any] | None) -> dict[str, Any]:
    """A whole answer: ``chat.completion`` or ``text_completion`` (``ids``: the token ids, when asked for)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


class Chunks:
    """The server-sent events of one streamed answer, all with the same id and creation time."""

    def __init__(self, rid: str, model: str, chat: bool) -> None:
        self.rid, self.model, self.chat, self.created = rid, model, chat, int(time.time())

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}
        return f"data: {json.dumps(data)}\n\n"

    def role(self) -> str:
        """A chat stream's first event: the assistant's role, no content yet."""
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}])

    def delta(self, text: str | None, finish: str | None, ids: list[int] | None = None) -> str:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {} if text is None else {"content": text},
                                      "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if ids is not None:
            choice["token_ids"] = ids
        return self._event([choice])

    def usage(self, usage: dict[str, Any]) -> str:
        """``stream_options.include_usage``: an event with no choices and the token counts."""
        return self._event([], usage=usage)

    def error(self, message: str) -> str:
        return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
