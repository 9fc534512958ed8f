"""Structured logs: one line per event, ``event key=value ...`` with the component's context."""

from __future__ import annotations

import logging
import sys
from typing import Any


class EventLogger:
    """``log.info("agent.connected", url=...)`` -> ``agent.connected agent=a1 url=...``.

    Not a ``logging.LoggerAdapter``: its methods take the event's fields as keywords, which an
    adapter's signature (``exc_info``, ``extra``, ...) does not allow."""

    def __init__(self, name: str, **context: Any) -> None:
        self.logger = logging.getLogger(f"atoll.{name}")
        self.context = context

    def bind(self, **more: Any) -> EventLogger:
        return EventLogger(self.logger.name.removeprefix("atoll."), **{**self.context, **more})

    def log(self, level: int, event: object, *args: Any, **fields: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        parts = [str(event)]
        parts += [f"{k}={_fmt(v)}" for k, v in {**self.context, **fields}.items()]
        self.logger.log(level, " ".join(parts), *args, exc_info=exc_info)

    def debug(self, event: object, *args: Any, **fields: Any) -> None:
        self.log(logging.DEBUG, event, *args, **fields)

    def info(self, event: object, *args: Any, **fields: Any) -> None:
        self.log(logging.INFO, event, *args, **fields)

    def warning(self, event: object, *args: Any, **fields: Any) -> None:
        self.log(logging.WARNING, event, *args, **fields)

    def error(self, event: object, *args: Any, **fields: Any) -> None:
        self.log(logging.ERROR, event, *args, **fields)


def _fmt(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def setup(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
