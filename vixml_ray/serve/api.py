"""The HTTP API's schemas and request checks (versioned under ``/v1``, JSON, documented at ``/docs``).

* ``POST /v1/predict`` :class:`PredictIn` -> :class:`PredictOut`: one result per query, in order;
* ``GET /v1/health``: 200 when the encoder and every shard answer, else 503 (never needs the API key);
* ``GET /v1/version``: the index version served, the export's identity, refused versions.

Bad input gets a clear answer: malformed JSON or a wrong type -> 422 naming the field; a query without text and
images -> 422; ``k`` outside ``1..serve.max_k`` -> 422; more than ``serve.max_queries`` queries, more than
``serve.max_images`` images or a body over ``serve.max_body_bytes`` -> 413; a missing or wrong API key -> 401.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from vixml_ray.config import ServeConfig
from vixml_ray.errors import ConfigError
from vixml_ray.data.schema import MAX_IMAGES

PAGE = Path(__file__).with_name("page.html")


class QueryIn(BaseModel):
    """One query: text, images (``data:image/...;base64,...`` URIs or http(s) URLs), or both."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr = ""
    images: list[StrictStr] = Field(default_factory=list, max_length=MAX_IMAGES)

    @model_validator(mode="after")
    def _not_empty(self) -> "QueryIn":
        if not self.text.strip() and not self.images:
            raise ValueError("a query needs a non-empty 'text' or at least one image")
        return self


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[QueryIn] = Field(min_length=1)
    k: StrictInt = Field(10, ge=1)


class Label(BaseModel):
    row: int  # label row in the index version
    uid: str
    name: str
    score: float


class Result(BaseModel):
    labels: list[Label]  # best first
    image_errors: list[str | None]  # per given image: why it was masked, or null


class PredictOut(BaseModel):
    version: str  # the index version that computed every result
    results: list[Result]


def unprocessable(loc: list[Any], msg: str, kind: str = "value_error") -> HTTPException:
    return HTTPException(422, [{"type": kind, "loc": loc, "msg": msg}])


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds serve.max_body_bytes={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds serve.max_body_bytes={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_predict(body: bytes, cfg: ServeConfig) -> PredictIn:
    """The validated request, or 422 (fields) / 413 (counts)."""
    try:
        request = PredictIn.model_validate_json(body)
    except ValidationError as err:
        detail = [{**e, "loc": ["body", *e["loc"]]} for e in err.errors(include_url=False, include_input=False,
                                                                          include_context=False)]
        raise HTTPException(422, detail) from None
    if request.k > cfg.max_k:
        raise unprocessable(["body", "k"], f"k must be at most serve.max_k={cfg.max_k}, got {request.k}")
    if len(request.queries) > cfg.max_queries:
        raise HTTPException(413, f"{len(request.queries)} queries exceed serve.max_queries={cfg.max_queries}")
    images = sum(len(q.images) for q in request.queries)
    if images > cfg.max_images:
        raise HTTPException(413, f"{images} images exceed serve.max_images={cfg.max_images}")
    return request


def api_key(cfg: ServeConfig) -> str | None:
    """The API key named by ``serve.api_key_env`` (None when not configured); a configured but unset or empty
    variable is an error, never an open service."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ConfigError(f"'serve.api_key_env' names {cfg.api_key_env!r} but that environment variable is unset "
                          "or empty")
    return key


def authorize(request: Request, key: str | None) -> None:
    """401 unless ``Authorization: Bearer <key>`` (constant-time compare) when a key is configured."""
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                            headers={"WWW-Authenticate": "Bearer"})


PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": PredictIn.model_json_schema()}}}}
