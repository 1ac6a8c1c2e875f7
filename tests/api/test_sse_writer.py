"""The SSE writer's framing: every event is one ``data:`` line whatever the text holds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from serving.api.streaming import SSEWriter


class _Sink:
    """Stands in for Sanic's streaming response: collects what is sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, data: str) -> None:
        self.sent.append(data)


def test_line_separators_inside_json_strings_are_escaped() -> None:
    """U+2028, U+2029 and U+0085 are legal raw in a JSON string, but readers that split lines
    with ``str.splitlines`` (httpx's ``aiter_lines``) break the event there: the writer escapes
    them, so the event stays one line and decodes to the same text. (A 30-minute soak lost its
    report to one of them.)"""
    text = "a\u2028b\u2029c\x85d\ne"
    w = SSEWriter(request=None)  # type: ignore[arg-type]
    w.response = sink = _Sink()
    asyncio.run(w.send(json.dumps({"text": text}, ensure_ascii=False)))
    (event,) = sink.sent
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    payload: Any = json.loads(event.removeprefix("data: "))
    assert payload["text"] == text
