"""Recent responses kept in memory, per tenant, for ``GET /v1/responses/{id}`` and
``previous_response_id``: bounded by count and by size, oldest out first."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("blockserve.server")


@dataclass(frozen=True)
class Stored:
    """A response as shown, and the items (input and output) that continue it."""

    response: dict
    items: list[dict]
    nbytes: int


class ResponseStore:
    """Per tenant, the last ``max_count`` responses within ``max_bytes`` of JSON."""

    def __init__(self, max_count: int = 256, max_bytes: int = 64 << 20):
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._tenants: dict[str, OrderedDict[str, Stored]] = {}

    def put(self, tenant: str | None, response: dict, items: list[dict]) -> bool:
        """Keep a response; False if it alone is over the size bound (then it is not)."""
        nbytes = len(json.dumps(response)) + len(json.dumps(items))
        if nbytes > self.max_bytes:
            log.warning("response %s not stored: %d bytes is over the store's %d",
                        response["id"], nbytes, self.max_bytes)
            return False
        kept = self._tenants.setdefault(tenant or "", OrderedDict())
        kept[response["id"]] = Stored(response, items, nbytes)
        total = sum(s.nbytes for s in kept.values())
        while len(kept) > self.max_count or total > self.max_bytes:
            _, old = kept.popitem(last=False)
            total -= old.nbytes
        return True

    def get(self, tenant: str | None, response_id: str) -> Stored | None:
        """A tenant's stored response (never another tenant's)."""
        kept = self._tenants.get(tenant or "")
        return kept.get(response_id) if kept else None

    def delete(self, tenant: str | None, response_id: str) -> bool:
        kept = self._tenants.get(tenant or "")
        return bool(kept) and kept.pop(response_id, None) is not None
