"""Structured logs: one line per event, ``event key=value ...`` with the component's context."""

from __future__ import annotations

import logging
import sys
from typing import Any


class EventLogger(logging.LoggerAdapter):
    """``log.info("agent.connected", url=...)`` -> ``agent.connected agent=a1 url=...``."""

    def __init__(self, name: str, **context: Any) -> None:
        super().__init__(logging.getLogger(f"atoll.{name}"), context)

    def bind(self, **more: Any) -> EventLogger:
        return EventLogger(self.logger.name.removeprefix("atoll."), **{**self.extra, **more})

    def log(self, level: int, event: object, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        if not self.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        parts = [str(event)]
        parts += [f"{k}={_fmt(v)}" for k, v in {**self.extra, **fields}.items()]
        self.logger.log(level, " ".join(parts), *args, exc_info=exc_info)

    def debug(self, event: object, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        self.log(logging.DEBUG, event, *args, **fields)

    def info(self, event: object, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        self.log(logging.INFO, event, *args, **fields)

    def warning(self, event: object, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        self.log(logging.WARNING, event, *args, **fields)

    def error(self, event: object, *args: Any, **fields: Any) -> None:  # type: ignore[override]
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
