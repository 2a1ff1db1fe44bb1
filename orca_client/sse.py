"""A small Server-Sent Events reader (the subset the ORCA service sends: id, event, data)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched SSE event; ``event`` defaults to ``message`` as in the SSE standard."""

    event: str
    data: str
    id: str | None


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Turn a stream of decoded lines into events; comments (``: ping``) are skipped.

    An event is dispatched at each blank line; a trailing event cut off by a disconnect is
    dropped, since its data may be incomplete (the stream resumes from the last complete id).
    """
    event_type = ""
    data_lines: list[str] = []
    event_id: str | None = None
    for raw_line in lines:
        line = raw_line.rstrip("\r\n")
        if not line:
            if data_lines or event_type:
                yield ServerSentEvent(event_type or "message", "\n".join(data_lines), event_id)
            event_type, data_lines, event_id = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            event_id = value
