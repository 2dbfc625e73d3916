"""What the service's API takes in: the request bodies (typed, strict: unknown fields, booleans for numbers, NaN and
blank or control-character ids are 422s naming the field) and the body-size limit, counted on the bytes received."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator, Field

from pinnerformer.config import StrictModel

MAX_TIME = 253_402_300_799  # 9999-12-31 23:59:59 UTC: Unix seconds beyond it are refused (422), not overflowed
NOT_IN_IDS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # control characters; lone surrogates (not UTF-8)


def as_id(value: object) -> str:
    """A user or item id: a string, or a JSON integer taken as its decimal form (clients send numeric ids as numbers).
    true, 1.0 and null are refused, not read as "True" or "1.0"; so are blank ids and control characters, which
    would name a user no one can tell apart in a log, and lone surrogates, which no store can encode."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError("an id is a string or an integer")
    if not value.strip():
        raise ValueError("an id may not be blank")
    if NOT_IN_IDS.search(value):
        raise ValueError("an id may not hold control characters or lone surrogates")
    if value != value.strip():  # the dataset's readers strip ids: " u3" would become "u3", another user
        raise ValueError("an id may not begin or end with whitespace")
    return value


def as_name(value: object) -> str:
    """A client or batch id: a string without control characters (they are joined into one store key)."""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if NOT_IN_IDS.search(value):
        raise ValueError("may not hold control characters or lone surrogates")
    return value


Name = Annotated[str, BeforeValidator(as_name)]
Id = Annotated[str, BeforeValidator(as_id)]  # every user and item id, in bodies and paths
Time = Annotated[int, Field(ge=0, le=MAX_TIME, strict=True)]  # Unix seconds; strict: true, 1.0 and "1" are refused


class EventIn(StrictModel):
    user: Id = Field(max_length=128)
    item: Id = Field(max_length=128)
    action: str = Field(min_length=1, max_length=64)
    time: Time = Field(description="Unix seconds")
    surface: str | None = Field(None, max_length=64)
    duration: float | None = Field(None, ge=0, le=86400, strict=True, allow_inf_nan=False, description="Seconds")


class EventsIn(StrictModel):
    events: list[EventIn] = Field(min_length=1)
    batch_id: Name | None = Field(None, min_length=1, max_length=128,
                                 description="A retried batch with the same (client, id) and the same events is "
                                 "applied once; the same id with other events is a 409. Ids are kept for 7 days.")
    client: Name | None = Field(None, min_length=1, max_length=128,
                               description="Who sends the batch: scopes batch_id (default: 'default')")


class RankIn(StrictModel):
    user: Id = Field(max_length=128)
    items: list[Id] = Field(min_length=1)
    time: Time | None = Field(None, description="Unix seconds (default: now)")
    surface: str | None = Field(None, max_length=64)


class RecommendIn(StrictModel):
    user: Id = Field(max_length=128)
    k: int = Field(10, ge=1, strict=True)
    n: int | None = Field(None, ge=1, strict=True,
                          description="Candidates retrieved (default: the service's retrieve_n)")
    time: Time | None = Field(None, description="Unix seconds (default: now)")
    surface: str | None = Field(None, max_length=64)


class BodyLimit:
    """413 once a request body passes `limit` bytes. The bytes received are counted, so a chunked body (no
    Content-Length) or an understated Content-Length is stopped at the limit instead of read whole into memory; an
    overstated one is refused before anything is read. The error raised from `receive` inside a route is an
    HTTPException: FastAPI answers it (413) instead of its generic 400 for a body it could not read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = HTTPException(413, f"request body over {self.limit:,} bytes")
        size = dict(scope["headers"]).get(b"content-length", b"0")
        if not size.isdigit() or int(size) > self.limit:
            return await JSONResponse({"detail": too_large.detail}, 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        await self.app(scope, counted, send)
