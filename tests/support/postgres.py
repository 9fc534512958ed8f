"""A throwaway PostgreSQL cluster, as pytest-postgresql makes one: ``initdb`` into a temporary
directory and the server listening on a unix socket there only (no port to race for), with a
fresh database per test. initdb refuses to run as root, so as root the cluster runs as the
``postgres`` system user (Debian's package makes it; ``nobody`` otherwise)."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

SUPERUSER = "atoll"


def bindir() -> Path | None:
    """Where PostgreSQL's server programs are: pg_config's answer, else Debian's versioned
    directories (newest first), else PATH."""
    found: list[str] = []
    if shutil.which("pg_config"):
        with contextlib.suppress(subprocess.CalledProcessError):
            found.append(subprocess.check_output(["pg_config", "--bindir"], text=True).strip())
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if initdb := shutil.which("initdb"):
        found.append(str(Path(initdb).parent))
    return next((Path(d) for d in found if (Path(d) / "initdb").exists()), None)


needed = pytest.mark.skipif(
    bindir() is None,
    reason="PostgreSQL's server programs come with Debian's postgresql (.ci/run installs it)",
)


class Cluster:
    """The cluster's directory (data, socket, log) and the commands that run it."""

    def __init__(self, bin: Path) -> None:
        self.bin = bin
        # Short, under /tmp: a unix socket's path has at most 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="atoll-pg-"))
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = next(u for u in ("postgres", "nobody") if _exists(u))
            os.chown(self.root, pwd.getpwnam(user).pw_uid, -1)
            self._as = ["runuser", "-u", user, "--"]
        self._names = itertools.count()

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv[:1])} failed:\n{done.stdout}{done.stderr}")

    def start(self) -> None:
        data = self.root / "data"
        self._run(
            str(self.bin / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.root / "log"), "-w",
            "-o", options, "start",
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
                      "stop")  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={self.root}&user={SUPERUSER}"

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def connect(self, url: str) -> psycopg.Connection[tuple[object, ...]]:
        """A plain connection of the test's own, to look at or break things."""
        return psycopg.connect(url, autocommit=True)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    found = bindir()
    assert found is not None, "no PostgreSQL server programs (initdb) found"
    started = Cluster(found)
    try:
        started.start()
        yield started
    finally:
        started.stop()
