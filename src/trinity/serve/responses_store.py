"""Stored responses for `previous_response_id` and `GET /v1/responses/{id}`: in memory, bounded, least recently
used first out, and visible only to the API key that created them."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class StoredResponse:
    owner: str | None
    response: dict         # the response object as it was returned
    conversation: list     # every input item the model saw (earlier turns included), then nothing else

    @property
    def history(self) -> list:
        """What a response continuing this one starts from: its input, then its output."""
        return self.conversation + self.response["output"]


def owner_of(headers) -> str | None:
    """The key a request was made with (a bearer token, or x-api-key as the server also accepts), hashed so the
    store holds no secrets; None without one."""
    authorization = headers.get("authorization", "")
    key = authorization[7:] if authorization.lower().startswith("bearer ") else headers.get("x-api-key")
    return hashlib.sha256(key.encode()).hexdigest() if key else None


class ResponseStore:
    """At most `capacity` responses. A continued or retrieved response counts as used. Items are shared between
    a response and the ones continuing it (never copied, never mutated), so a long conversation costs one
    list of references per turn."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"the response store size must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity == 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """None when unknown or made with another key (the two look the same, so ids of others leak nothing)."""
        stored = self._items.get(response_id)
        if stored is None or stored.owner != owner:
            return None
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str, owner: str | None) -> bool:
        if self.get(response_id, owner) is None:
            return False
        del self._items[response_id]
        return True
