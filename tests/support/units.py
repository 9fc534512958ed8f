"""systemd units as the tests read and run them: a unit's directives, its specifiers expanded
under a temporary root, ``systemd-analyze`` on it, and a command run under the part of its sandbox
that needs no service manager (``Sandbox``: no new privileges, and the seccomp filters of
``SystemCallFilter=``, ``RestrictAddressFamilies=`` and ``MemoryDenyWriteExecute=``, built as
systemd builds them; the mount and user namespaces need PID 1 and are not reproduced).

Run as a script (``Sandbox.command``), this file applies a sandbox and executes the command; it
then imports nothing beyond the standard library."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import mmap
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

INSTALL_ATOLL = "/opt/atoll/venv/bin/atoll"
"""The ``atoll`` the shipped units run: the venv ``make setup`` builds, installed there."""

Section = dict[str, list[str]]
"""A unit section's directives: each key's values, in order (a key may repeat)."""


def parse_unit(text: str) -> dict[str, Section]:
    """A unit file's sections; ValueError for a line that is neither a section, a directive nor
    a comment (no continuation lines: the shipped units have none)."""
    sections: dict[str, Section] = {}
    current: Section | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep or line.endswith("\\"):
            raise ValueError(f"not a unit line: {raw!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def expand(value: str, root: Path, instance: str = "") -> str:
    """``value`` with the specifiers the shipped units use resolved as a system manager would,
    under ``root`` (KeyError for any other specifier)."""
    table = {
        "S": str(root / "var/lib"),
        "E": str(root / "etc"),
        "C": str(root / "var/cache"),
        "i": instance,
        "%": "%",
    }
    return re.sub(r"%(.)", lambda m: table[m.group(1)], value)


def unit_environment(service: Section, root: Path, instance: str = "") -> dict[str, str]:
    """What a service's ``Environment=`` lines set, specifiers expanded."""
    env = {}
    for line in service.get("Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = expand(value, root, instance)
    return env


def analyze_verify(units: list[Path]) -> list[str]:
    """What ``systemd-analyze verify`` says about ``units`` (files in one directory, drop-ins
    beside them). It exits 0 after warnings and also speaks of units it loads as dependencies:
    the lines kept are those naming a file or unit of that directory, and its exit status if
    not 0."""
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    folder = units[0].parent
    ours = {str(folder), *(p.name for p in folder.iterdir())}
    ours |= {u.name for u in units}
    lines = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(name in line for name in ours)
    ]
    return lines + ([f"exit status {result.returncode}"] if result.returncode else [])


def exposure(unit: Path) -> float:
    """``systemd-analyze security --offline=yes``'s overall exposure of ``unit`` (0 to 10)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if found is None:
        raise AssertionError(f"no exposure level:\n{result.stdout}{result.stderr}")
    return float(found.group(1))


def syscall_groups() -> dict[str, list[str]]:
    """Every ``@group`` ``systemd-analyze syscall-filter`` knows, with its members (system
    calls and nested groups)."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def _names(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for item in items:
        found |= _names(groups[item], groups) if item.startswith("@") else {item}
    return found


@dataclass(frozen=True)
class Sandbox:
    """The seccomp part of a service's sandbox, and ``NoNewPrivileges=``."""

    no_new_privileges: bool
    syscalls: list[str] | None  # the allowed system calls; None: any
    syscall_errno: str  # what a refused system call returns (SystemCallErrorNumber=)
    address_families: list[str] | None  # the socket families allowed; None: any
    deny_write_execute: bool

    @classmethod
    def of(cls, service: Section) -> Sandbox:
        """The sandbox ``service``'s directives ask for. Filters are an allow list as systemd
        reads them: the first ``SystemCallFilter=`` allows (with ``@default``, as systemd adds
        it), later ``~`` lines take away."""
        allowed: set[str] | None = None
        groups = syscall_groups() if "SystemCallFilter" in service else {}
        for line in service.get("SystemCallFilter", []):
            names = _names(line.removeprefix("~").split(), groups)
            if allowed is None:
                assert not line.startswith("~"), "only allow lists are reproduced"
                allowed = names | _names(["@default"], groups)
            elif line.startswith("~"):
                allowed -= names
            else:
                allowed |= names
        families = service.get("RestrictAddressFamilies")
        return cls(
            no_new_privileges=service.get("NoNewPrivileges") == ["yes"],
            syscalls=sorted(allowed) if allowed is not None else None,
            syscall_errno=service.get("SystemCallErrorNumber", ["EPERM"])[-1],
            address_families=" ".join(families).split() if families else None,
            deny_write_execute=service.get("MemoryDenyWriteExecute") == ["yes"],
        )

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run under this sandbox (by this file as a script)."""
        return [sys.executable, __file__, json.dumps(asdict(self)), *argv]


# --- applying a sandbox: this file as a script ------------------------------------------------

PR_SET_NO_NEW_PRIVS = 38
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000
AF_LIMIT = 64  # above every family the kernel knows (AF_MAX is 46)


class _ArgCmp(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def _libseccomp() -> ctypes.CDLL:
    """systemd's own library for these filters (loaded only where a sandbox is applied)."""
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


class _Filter:
    """One seccomp filter: a default action, and rules for system calls."""

    def __init__(self, default: int) -> None:
        self.lib = _libseccomp()
        self.ctx = self.lib.seccomp_init(default)

    def rule(self, action: int, syscall: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr < 0:  # not a system call of this architecture
            return
        array = (_ArgCmp * len(cmps))(*(_ArgCmp(*c) for c in cmps))
        if self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), array) != 0:
            raise OSError(f"seccomp rule for {syscall} refused")

    def load(self) -> None:
        if self.lib.seccomp_load(self.ctx) != 0:
            raise OSError("seccomp_load failed")


def _errno_action(code: int) -> int:
    return 0x00050000 | code  # SCMP_ACT_ERRNO(code)


def apply(box: Sandbox) -> None:
    """Put this process under ``box`` (before it executes the service)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if box.no_new_privileges and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    # As systemd: refused socket families say EAFNOSUPPORT, and memory that is or was writable
    # never becomes executable.
    rest = _Filter(SCMP_ACT_ALLOW)
    if box.address_families is not None:
        allowed = {getattr(socket, name) for name in box.address_families}
        for family in set(range(AF_LIMIT)) - allowed:
            rest.rule(_errno_action(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_EQ, family, 0))
    if box.deny_write_execute:
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        refuse = _errno_action(errno.EPERM)
        rest.rule(refuse, "mmap", (2, SCMP_CMP_MASKED_EQ, wx, wx))
        for call in ("mprotect", "pkey_mprotect"):
            rest.rule(refuse, call, (2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        rest.rule(refuse, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    rest.load()
    # Last: the allow list refuses seccomp() itself.
    if box.syscalls is not None:
        calls = _Filter(_errno_action(getattr(errno, box.syscall_errno)))
        for name in box.syscalls:
            calls.rule(SCMP_ACT_ALLOW, name)
        calls.load()


if __name__ == "__main__":
    apply(Sandbox(**json.loads(sys.argv[1])))
    os.execv(sys.argv[2], sys.argv[2:])
