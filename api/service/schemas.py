"""Request and response models (the OpenAPI spec is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from store.records import MAX_ID_CHARS, MAX_TIMESTAMP

class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    item_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    timestamp: int = Field(ge=0, lt=MAX_TIMESTAMP, description="UTC seconds")
    fields: dict[str, Any] = Field(default_factory=dict, description="rating, genres, text, ... as the spec declares")


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1)


class EventsOut(BaseModel):
    received: int
    inserted: int
    duplicates: int = Field(description="already stored (a retry) or repeated in the request")
    refused_erased: int = Field(description="events of erased users: never stored")


class EmbeddingOut(BaseModel):
    encoder_version: str
    dim: int
    embedding: list[float]


class Recommendation(BaseModel):
    item_id: str
    score: float


class RecommendationsOut(BaseModel):
    items: list[Recommendation]
    # "encoder", or "popularity": the cold-start fallback for a user with no events
    source: Literal["encoder", "popularity"] = "encoder"


class SimilarUser(BaseModel):
    user_id: str
    score: float


class SimilarOut(BaseModel):
    users: list[SimilarUser]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI fields are accepted and ignored
    model: str = Field(default="userllm", max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=64)
    user: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS,
                             description="the external user id whose history personalizes the answer")
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class GenerateOut(BaseModel):
    text: str
    finish_reason: str | None
    personalized: bool
    prompt_tokens: int
    completion_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ErasureAccepted(BaseModel):
    request_id: int
    status: str


class ErasureStatus(BaseModel):
    request_id: int
    status: str
    steps: dict[str, str]
    keyed_id_prefix: str
    created_at: int
    finished_at: int | None


class RotationOut(BaseModel):
    to_version: int
    minted: bool
    resumed: bool
    data_keys: int
    secrets: int
    removed_versions: list[int]


class ApiKeyIn(BaseModel):
    scopes: list[Literal["events:write", "generate", "embeddings:read", "admin"]] = Field(
        min_length=1, max_length=4)
    label: str = Field(default="", max_length=100)


class ApiKeyCreated(BaseModel):
    id: int
    key: str  # shown once: only its hash is kept
    scopes: list[str]


class ApiKeyOut(BaseModel):
    id: int
    label: str
    scopes: list[str]
    created_at: int
    revoked_at: int | None


class ApiKeysOut(BaseModel):
    keys: list[ApiKeyOut]


class AuditEntryOut(BaseModel):
    seq: int
    at: int
    action: str
    details: dict[str, Any]
    entry_hash: str


class AuditOut(BaseModel):
    entries: list[AuditEntryOut]
    verified: bool
    problems: list[str]
    total: int


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
