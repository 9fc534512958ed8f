"""Options several commands share, and the parsers of their values."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from atoll.eventloop import MAX_IDLE_SPIN_US
from atoll.protocol.trust import ROLES

ROLE_NAMES = ", ".join(sorted(ROLES))
LABEL_HELP = "Policy label KEY=VALUE (repeatable), e.g. phi=true: signed, so routing trusts it."


def default_data_dir() -> Path:
    return Path(os.environ.get("ATOLL_DATA_DIR", "~/.atoll")).expanduser()


DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        "-d",
        help="Operator data dir (env ATOLL_DATA_DIR).",
        default_factory=default_data_dir,
    ),
]

IdleSpin = Annotated[
    int,
    typer.Option(
        min=0,
        max=MAX_IDLE_SPIN_US,
        help="Microseconds to busy-poll after network I/O before sleeping (0: never).",
    ),
]


def parse_duration(text: str) -> int:
    """'90s', '30m', '1h', '7d' -> seconds."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h, 7d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r} is not HOST:PORT")
    return host, int(port)


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; ValueError for an item without ``=``."""
    labels = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels
