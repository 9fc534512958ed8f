"""The user and admin documentation's examples, run for real.

Every ```python block of docs/users.md and docs/admins.md runs in its own interpreter
(``sys.executable``) against a live gateway of the ``gw_island`` fixture (echo nodes serving model
"echo"), with the environment its reader would have: ``OPENAI_BASE_URL`` and ``ATOLL_GATEWAY_URL``,
on the users' page ``OPENAI_API_KEY`` (user alice's key; she owns the adapters the page names), on
the admins' page ``ATOLL_ADMIN_KEY``, and ``ATOLL_MODEL`` = ``ATOLL_EMBED_MODEL`` = "echo". A block
fails if it exits non-zero, prints nothing, or runs past its time.

Every ```sh block that calls curl and no ``atoll`` command runs under ``bash -euo pipefail`` the
same way, with the docs' default model names replaced by "echo"; it fails on a non-zero exit or
an error body in its output. Every ``atoll ...`` command in a ```sh block must parse against the
real typer app: its command path, options and arguments.

A ``<!-- needs: ... -->`` comment on the line before a fence says what the block needs beyond
the echo island: ``files`` (a storage agent and a training queue), ``training`` (those and a
trainer that trains a tiny model under the name "echo", whose adapters the echo nodes then
serve), ``transcription`` (a local node transcribing with a tiny random Whisper, its name in
``ATOLL_TRANSCRIBE_MODEL``), ``interactive`` (runs until stopped: not run, only its ``atoll``
commands checked).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

from atoll.cli import main as cli
from support import REPO
from support.island import Island
from support.overlay import eventually
from support.tiny_models import build_tiny_model

DOCS = REPO / "docs"
PAGES = ("users.md", "admins.md")
# Pages whose commands are checked but not run (they start brokers and agents of their own).
COMMAND_PAGES = ("operators.md", "security.md", "../README.md", "../configs/README.md")
FENCE = re.compile(r"^```([\w-]*)\s*$")
NEEDS = re.compile(r"^<!--\s*needs:\s*([a-z, ]+?)\s*-->$")
KNOWN_NEEDS = {
    "python": {"files", "training", "transcription"},
    "sh": {"files", "training", "interactive"},
}
USER = "alice"
ADAPTERS = ("alice/soap-notes", "alice/sql")  # what the users' page names, alice's here
LOCAL_MODEL = "echo"
DOCS_MODELS = ("SmolLM2-135M-Instruct", "all-MiniLM-L6-v2")  # the docs' defaults, in sh blocks
TIMEOUT_S = 30.0  # one example; a training one gets TRAINING_TIMEOUT_S
TRAINING_TIMEOUT_S = 90.0
RUNNER = CliRunner()
SHELL_OPERATORS = set("();<>|&\n")
ERROR_BODY = re.compile(r'"error":\s*\{')  # an error in OpenAI's shape (not a job's "error": null)
# A dataset for the curl upload, which names "the file from the Python example".
TRAIN_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Which country is city {i} the capital of?"},
            {"role": "assistant", "content": f"City {i} is the capital of country {i}."},
        ]
    }
    for i in range(8)
]


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    needs: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    lines = (DOCS / page).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if opened is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{page}:{i + 1}: a code block is never closed")
        marker = NEEDS.match(lines[i - 1].strip()) if i else None
        needs = frozenset(n.strip() for n in marker.group(1).split(",")) if marker else frozenset()
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(page, i + 1, opened.group(1), code, needs))
        i = end + 1
    return blocks


def strip_comments(code: str) -> str:
    """A shell snippet without its ``# ...`` comments (a ``#`` that starts a word, unquoted)."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(code):
        char = code[i]
        if quote is None and char == "#" and (i == 0 or code[i - 1].isspace()):
            end = code.find("\n", i)
            i = len(code) if end < 0 else end
            continue
        if quote is None and char in "'\"":
            quote = char
        elif char == quote:
            quote = None
        elif char == "\\" and quote != "'":  # an escaped character is never a quote
            out.append(code[i : i + 2])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def atoll_commands(code: str) -> list[list[str]]:
    """The arguments of every ``atoll`` command in a shell snippet, also inside ``$(...)``, after
    ``&&`` or ``|``, or behind ``VAR=value`` assignments."""
    text = strip_comments(code).replace("\\\n", " ")
    lexer = shlex.shlex(text, posix=True, punctuation_chars="".join(SHELL_OPERATORS))
    lexer.whitespace = " \t\r"  # a newline ends a command: it is an operator here
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands = []
    segment: list[str] = []
    for token in [*lexer, ";"]:
        if not set(token) <= SHELL_OPERATORS:
            segment.append(token)
            continue
        while segment and re.match(r"^[A-Za-z_]\w*=", segment[0]):
            segment.pop(0)
        if segment[:1] == ["atoll"]:
            commands.append(segment[1:])
        segment = []
    return commands


def check_atoll_command(args: list[str]) -> None:
    """Raise AssertionError unless ``atoll ARGS`` names a command and options that exist (the
    real app parses them with ``--help`` appended, which runs nothing) and gives the command its
    required options (but those the environment may give) and arguments."""
    result = RUNNER.invoke(cli.app, [*args, "--help"])
    if result.exit_code != 0:
        lines = [line.strip(" │╭╮╰╯─") for line in result.output.splitlines()]
        raise AssertionError(" ".join(line for line in lines if line) or repr(result.exception))
    command = typer.main.get_command(cli.app)
    while isinstance(command, TyperGroup) and args and args[0] in command.commands:
        command, args = command.commands[args[0]], args[1:]
    if isinstance(command, TyperGroup) and command.commands:
        return  # a group's own options (`atoll broker --listen ...`): --help checked them
    options = {o: p for p in command.params if isinstance(p, TyperOption) for o in p.opts}
    positional = []
    words = iter(args)
    for word in words:
        name = word.partition("=")[0]
        if name in options:
            if not options[name].is_flag and "=" not in word:
                next(words, None)  # its value
        else:
            positional.append(word)
    for param in command.params:
        given = any(word.partition("=")[0] in param.opts for word in args)
        # An option read from the environment (the key: OPENAI_API_KEY) is the reader's to set.
        from_env = bool(getattr(param, "envvar", None))
        if param.required and param.param_type_name == "option" and not given and not from_env:
            raise AssertionError(f"{param.opts[0]} is required")
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if len(positional) < sum(p.required for p in arguments):
        raise AssertionError(f"missing arguments: {[p.name for p in arguments]}")
    if len(positional) > len(arguments) and all(p.nargs != -1 for p in arguments):
        raise AssertionError(f"unexpected arguments: {positional[len(arguments) :]}")


BLOCKS = [block for page in PAGES for block in read_blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in ("sh", "bash")]
COMMANDS = SHELL + [
    b for page in COMMAND_PAGES for b in read_blocks(page) if b.lang in ("sh", "bash")
]
CURL = [
    b
    for b in SHELL
    if "curl " in b.code and not atoll_commands(b.code) and "interactive" not in b.needs
]


def ids(blocks: list[Block]) -> list[str]:
    return [b.id for b in blocks]


async def add_services(island: Island, tmp_path: Path, trainer: bool) -> None:
    """A storage agent and a training queue; with ``trainer``, one that trains a tiny model
    under the overlay name "echo", so the echo nodes serve the adapters it makes."""
    await island.make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    training: dict[str, object] = {"mode": "queue"}
    if trainer:
        base = build_tiny_model(tmp_path / "tiny-llama")
        training = {
            "mode": "both",
            "device": "cpu",
            "heartbeat": 0.3,
            "poll": 0.5,
            "models": {LOCAL_MODEL: str(base)},
            "model_cache": str(tmp_path / "models"),
        }
    await island.make_agent(
        "queue", roles=("training",), plugins={"training": training}, heartbeat=0.2
    )
    discovery = island.plugin.gateway.watch.discovery
    await eventually(
        lambda: bool(discovery.select(plugin="storage") and discovery.select(plugin="training"))
    )


async def environment(island: Island, block: Block, tmp_path: Path) -> dict[str, str]:
    """What a reader of ``block``'s page has: the endpoint, a key, and the services it needs."""
    inherited = ("OPENAI_", "ATOLL_", "LANGCHAIN_", "LANGSMITH_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env |= {
        "OPENAI_BASE_URL": f"{island.url}/v1",
        "ATOLL_GATEWAY_URL": island.url,
        "ATOLL_MODEL": LOCAL_MODEL,
        "ATOLL_EMBED_MODEL": LOCAL_MODEL,
    }
    if block.page == "users.md":
        env["OPENAI_API_KEY"] = island.key(USER)
        for adapter in ADAPTERS:
            island.accounts.register_adapter(adapter, LOCAL_MODEL, owner=USER, actor="docs")
    else:
        env["ATOLL_ADMIN_KEY"] = island.admin_key
        # The admins' examples read /metrics: a gateway that has heard the nodes' feed once.
        await eventually(lambda: "gpu1" in island.plugin.gateway.watch.metrics)
    if block.needs & {"files", "training"}:
        await add_services(island, tmp_path, trainer="training" in block.needs)
    if "transcription" in block.needs:
        env["ATOLL_TRANSCRIBE_MODEL"] = await island.add_transcriber(tmp_path / "models")
    return env


async def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run a process to its end (the gateway serves from this event loop meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(argv[:2])} ran past {timeout:g} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


# --- the pages themselves ---------------------------------------------------------------------


def test_pages_have_the_examples_they_promise() -> None:
    for page in PAGES:
        langs = [b.lang for b in BLOCKS if b.page == page]
        assert "python" in langs and "sh" in langs, (page, langs)
    assert len([b for b in PYTHON if b.page == "users.md"]) >= 10
    for block in BLOCKS:
        known = KNOWN_NEEDS.get(block.lang, set())
        assert block.needs <= known, f"{block.id}: unknown needs {set(block.needs - known)}"


def test_atoll_commands_parse() -> None:
    """No invented command or flag: every ``atoll`` line in a sh block of any page parses."""
    problems = []
    checked = 0
    for block in COMMANDS:
        for args in atoll_commands(block.code):
            checked += 1
            try:
                check_atoll_command(args)
            except AssertionError as exc:
                problems.append(f"{block.id}: atoll {shlex.join(args)}\n  {exc}")
    assert not problems, "\n".join(problems)
    assert checked >= 60  # the admins' and operators' pages are mostly commands: all found


def test_the_checker_refuses_invented_commands() -> None:
    """The parse check can fail: an unknown flag, command or missing argument is refused."""
    check_atoll_command(["keys", "rotate", "k_3f9a1c2b", "--grace", "1h"])
    check_atoll_command(["broker", "-d", "/tmp/b2", "--listen", "127.0.0.1:7401"])
    check_atoll_command(["top", "--once", "--sort", "gpu"])
    for bad, why in (
        (["keys", "rotate", "k_3f9a1c2b", "--grace-period", "1h"], "No such option"),
        (["keys", "delete", "k_3f9a1c2b"], "No such command"),
        (["metrics", "--json"], "No such option"),
        (["projects", "add-member", "cardio"], "missing arguments"),
        (["keys", "revoke", "k_1", "k_2"], "unexpected arguments"),
        (["datasets", "upload", "notes.jsonl"], "--owner is required"),
    ):
        with pytest.raises(AssertionError, match=why):
            check_atoll_command(bad)
    assert atoll_commands("KEY=$(atoll keys create bob --ttl 7d)  # a comment\n") == [
        ["keys", "create", "bob", "--ttl", "7d"]
    ]


# --- the examples, against a live gateway -------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON, ids=ids(PYTHON))
async def test_python_example_runs(block: Block, gw_island: Island, tmp_path: Path) -> None:
    env = await environment(gw_island, block, tmp_path)
    script = tmp_path / "example.py"
    script.write_text(block.code)
    timeout = TRAINING_TIMEOUT_S if "training" in block.needs else TIMEOUT_S
    code, out = await run([sys.executable, str(script)], env, tmp_path, timeout)
    assert code == 0, f"{block.id} exited {code}:\n{out}"
    assert out.strip(), f"{block.id} printed nothing"


@pytest.mark.parametrize("block", CURL, ids=ids(CURL))
async def test_curl_example_runs(block: Block, gw_island: Island, tmp_path: Path) -> None:
    if "jq " in block.code and shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    env = await environment(gw_island, block, tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    script = block.code
    for name in DOCS_MODELS:
        script = script.replace(name, LOCAL_MODEL)
    code, out = await run(["bash", "-euo", "pipefail", "-c", script], env, tmp_path, TIMEOUT_S)
    assert code == 0, f"{block.id} exited {code}:\n{out}"
    assert out.strip() and not ERROR_BODY.search(out), f"{block.id}:\n{out}"
