"""Model resolution (GGUF conversion into a cache, model directories, bad specs) and sentence
embeddings checked against sentence-transformers on the same model files.

Conversion is exercised twice: on a tiny llama GGUF written here with the ``gguf`` package (fast:
cache hits, crashes, concurrent processes, the tokenizer repairs) and, marked ``embedded``, on the
real SmolLM2 file, whose converted model must answer a question correctly."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from rich.console import Console

from atoll.agent.errors import InvalidRequest
from atoll.plugins import basemodels
from atoll.plugins.basemodels import (
    MANIFEST,
    ModelSpecError,
    cache_name,
    embedded_gguf,
    is_complete,
    model_id,
    resolve_model,
)
from atoll.plugins.inference.contract import EmbedRequest
from atoll.plugins.inference.embeddings import MAX_INPUTS, Embedder, EmbeddingModelError, minilm_dir

LONG = " ".join(f"word{i} and some more text about topic {i % 7}" for i in range(200))
SENTENCES = [
    "A cat sits on the mat.",
    "A kitten is sitting on a rug.",
    "Quarterly tax filing deadlines for corporations.",
    "",
    "   padded with spaces   ",
    "Ünïcödé — 東京 😀 and numbers 12345",
    LONG,
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- a tiny llama GGUF with a byte-level vocabulary, laid out as llama.cpp writes SmolLM2 ------


def write_tiny_gguf(path: Path) -> Path:
    import gguf
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "1"), ("1", "2")]
    tokens = specials + sorted(set(bytes_to_unicode().values())) + [a + b for a, b in pairs]
    hidden, heads, kv_heads, layers, ffn = 64, 4, 2, 2, 128
    kv = kv_heads * hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges([f"{a} {b}" for a, b in pairs])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (len(tokens), hidden)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv, hidden),
            f"blk.{i}.attn_v.weight": (kv, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    norms = ["output_norm.weight"]
    norms += [f"blk.{i}.{n}.weight" for i in range(layers) for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> None:
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(basemodels, "_convert", boom)


# --- specs ----------------------------------------------------------------------------------


def test_directory_spec_is_used_as_is(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_model(str(model_dir), tmp_path / "cache") == model_dir.resolve()
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing cached
    assert model_id(str(model_dir)) == "my-model"
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert model_id(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected 'embedded'"),
        ("   ", "expected 'embedded'"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "expected 'embedded', a path to a .gguf file"),
        ("{tmp}/missing.gguf", "no GGUF file at"),
        ("{tmp}/no-config", "has no config.json"),
    ],
)
def test_bad_specs_are_refused_clearly(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "no-config").mkdir()
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(ModelSpecError, match=message):
        resolve_model(spec, tmp_path / "cache")
    with pytest.raises(ValueError, match=message):  # a ValueError for callers that catch those
        model_id(spec)


def test_a_corrupt_gguf_leaves_no_cache_entry(tmp_path: Path) -> None:
    bad = tmp_path / "broken.Q4_0.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSpecError, match="not a readable GGUF file"):
        resolve_model(str(bad), cache, quiet())
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    assert model_id(str(bad)) == "broken"


def test_embedded_spec_names_the_shipped_file_without_converting() -> None:
    path = embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert model_id("embedded") == "SmolLM2-135M-Instruct"


# --- conversion on the tiny GGUF ------------------------------------------------------------


def test_tiny_gguf_converts_into_a_loadable_cached_directory(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = quiet()
    entry = resolve_model(str(tiny_gguf), tmp_path / "cache", console)
    assert entry.parent == tmp_path / "cache" and entry.name.startswith("Tiny-Llama.F32-")
    assert is_complete(entry)
    assert isinstance(console.file, io.StringIO)
    assert "Tiny-Llama.F32.gguf: done" in console.file.getvalue()  # the progress display
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["model_id"] == "Tiny-Llama" and manifest["size"] == tiny_gguf.stat().st_size
    assert model_id(str(entry)) == "Tiny-Llama"  # the cache entry reports its GGUF's name

    model = AutoModelForCausalLM.from_pretrained(entry)
    tok = AutoTokenizer.from_pretrained(entry)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    assert model.generation_config is not None and model.generation_config.eos_token_id == 2
    assert tok.chat_template == CHAT_TEMPLATE
    # The repairs: transformers would say EOS is <|im_start|> and prepend BOS to everything.
    specials = (tok.bos_token, tok.eos_token, tok.pad_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok("the")["input_ids"] == tok.convert_tokens_to_ids(["t", "he"])
    # llama.cpp's "smollm" pre-tokenizer isolates digits although "12" and "Ġ1" are merges.
    assert tok.convert_ids_to_tokens(tok(" the 123")["input_ids"]) == ["Ġthe", "Ġ", "1", "2", "3"]
    for text in ["naïve café — 東京 😀", "  two\n\nlines\t"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 1

    forbid_conversion(monkeypatch)
    assert resolve_model(str(tiny_gguf), tmp_path / "cache") == entry


def test_a_changed_gguf_is_converted_again(tiny_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / tiny_gguf.name
    copy.write_bytes(tiny_gguf.read_bytes())
    first = resolve_model(str(copy), tmp_path / "cache", quiet())
    os.utime(copy, ns=(time.time_ns(), copy.stat().st_mtime_ns + 10**9))
    second = resolve_model(str(copy), tmp_path / "cache", quiet())
    assert second != first and is_complete(first) and is_complete(second)


def test_a_failed_conversion_leaves_nothing_that_looks_finished(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_convert = basemodels._convert

    def convert_then_fail(gguf: Path, dest: Path, console: Console) -> None:
        real_convert(gguf, dest, console)  # every file written, manifest included
        raise OSError("disk full")

    monkeypatch.setattr(basemodels, "_convert", convert_then_fail)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSpecError, match=r"cannot convert .*disk full"):
        resolve_model(str(tiny_gguf), cache, quiet())
    assert sorted(p.name for p in cache.iterdir()) == [f".{cache_name(tiny_gguf)}.lock"]


def test_a_crashed_process_leftovers_are_not_taken_for_a_model(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    # A process killed after writing its files: its temporary directory stays behind.
    crash = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from atoll.plugins import basemodels\n"
        "real = basemodels._convert\n"
        "def convert(gguf, dest, console):\n"
        "    real(gguf, dest, console)\n"
        "    os._exit(9)\n"
        "basemodels._convert = convert\n"
        "basemodels.resolve_model(sys.argv[1], Path(sys.argv[2]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", crash, str(tiny_gguf), str(cache)],
        capture_output=True,
        timeout=90,
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    name = cache_name(tiny_gguf)
    (leftover,) = cache.glob(f".{name}.tmp-*")
    assert (leftover / MANIFEST).is_file()  # complete inside, yet never renamed into place
    entry = cache / name
    entry.mkdir()  # an entry without its manifest (say, copied by hand halfway)
    (entry / "config.json").write_text("{}")
    assert not is_complete(entry)

    assert resolve_model(str(tiny_gguf), cache, quiet()) == entry
    assert is_complete(entry) and not leftover.exists()
    assert json.loads((entry / "config.json").read_text())["model_type"] == "llama"


def test_concurrent_processes_convert_once(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    worker = (
        "import sys\n"
        "from pathlib import Path\n"
        "from atoll.plugins import basemodels\n"
        "real = basemodels._convert\n"
        "def convert(*args):\n"
        "    print('CONVERTING', flush=True)\n"
        "    real(*args)\n"
        "basemodels._convert = convert\n"
        "print(basemodels.resolve_model(sys.argv[1], Path(sys.argv[2])), flush=True)\n"
    )
    lock = cache / f".{cache_name(tiny_gguf)}.lock"
    logs = [tmp_path / "a.err", tmp_path / "b.err"]
    with lock.open("a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # both workers must queue behind this holder
        procs = []
        for log in logs:
            with log.open("wb") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", worker, str(tiny_gguf), str(cache)],
                        stdout=subprocess.PIPE,
                        stderr=err,
                    )
                )
        deadline = time.monotonic() + 60
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs)
            time.sleep(0.1)
        fcntl.flock(held, fcntl.LOCK_UN)
    outputs = [p.communicate(timeout=90)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert sum(out.count("CONVERTING") for out in outputs) == 1
    paths = {out.strip().splitlines()[-1] for out in outputs}
    assert paths == {str(cache / cache_name(tiny_gguf))}
    assert is_complete(cache / cache_name(tiny_gguf))
    assert list(cache.glob(".*.tmp-*")) == []


# --- the embedded SmolLM2, converted once per pytest run --------------------------------------


@pytest.mark.embedded
@pytest.mark.timeout(900)
def test_embedded_model_converts_and_answers(embedded_model: tuple[Path, Path, float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry, leftover, seconds = embedded_model
    print(f"embedded conversion took {seconds:.1f} s")
    assert is_complete(entry) and entry != leftover and not leftover.exists()
    assert model_id(str(entry)) == "SmolLM2-135M-Instruct"
    tok = AutoTokenizer.from_pretrained(entry)
    model = AutoModelForCausalLM.from_pretrained(entry)
    generation = model.generation_config
    assert tok.eos_token == "<|im_end|>" and generation is not None and generation.eos_token_id == 2
    assert "<|im_start|>" in (tok.chat_template or "")
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.embedded
@pytest.mark.timeout(900)
def test_embedded_second_resolve_uses_the_cache(
    embedded_model: tuple[Path, Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _, _ = embedded_model
    weights = (entry / "model.safetensors").stat().st_mtime_ns
    forbid_conversion(monkeypatch)
    assert resolve_model("embedded", entry.parent) == entry
    assert (entry / "model.safetensors").stat().st_mtime_ns == weights


# --- embeddings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """sentence-transformers' own output for the same model directory (with and without its
    Normalize module)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    raw = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
    assert st.max_seq_length == 256
    return {
        "normalized": st.encode(SENTENCES, convert_to_numpy=True),
        "raw": raw.encode(SENTENCES, convert_to_numpy=True),
    }


async def test_embeddings_equal_sentence_transformers(reference: dict[str, np.ndarray]) -> None:
    embedder = Embedder(batch_size=3)  # several batches, each padded differently
    for normalize, key in [(True, "normalized"), (False, "raw")]:
        result = await embedder.embed(EmbedRequest(input=SENTENCES, normalize=normalize))
        got = np.array(result.embeddings)
        assert result.model == "all-MiniLM-L6-v2" and got.shape == (len(SENTENCES), 384)
        np.testing.assert_allclose(got, reference[key], atol=1e-5, rtol=0)


async def test_norms_similarity_and_truncation() -> None:
    embedder = Embedder()
    await embedder.load()
    result = await embedder.embed(EmbedRequest(input=SENTENCES))
    vectors = np.array(result.embeddings)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    raw = np.array(
        (await embedder.embed(EmbedRequest(input=SENTENCES, normalize=False))).embeddings
    )
    assert np.all(np.abs(np.linalg.norm(raw, axis=1) - 1.0) > 1e-3)  # really not normalised
    cat, kitten, taxes = vectors[0], vectors[1], vectors[2]
    assert cat @ kitten > 0.5 > cat @ taxes
    # Past 256 tokens text is cut: two texts that differ only there embed the same.
    tails = await embedder.embed(EmbedRequest(input=[LONG + " ending one", LONG + " other end"]))
    np.testing.assert_allclose(tails.embeddings[0], tails.embeddings[1], atol=1e-6)
    np.testing.assert_allclose(tails.embeddings[0], vectors[-1], atol=1e-5)


async def test_usage_counts_tokens() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    expected = sum(
        len(tok(s.strip(), truncation=True, max_length=256)["input_ids"]) for s in SENTENCES
    )
    result = await Embedder(batch_size=2).embed(EmbedRequest(input=SENTENCES))
    assert result.usage.prompt_tokens == expected and result.usage.completion_tokens == 0
    only_empty = await Embedder().embed(EmbedRequest(input=["", ""]))
    assert only_empty.usage.prompt_tokens == 4  # [CLS] [SEP] each
    long = await Embedder().embed(EmbedRequest(input=[LONG]))
    assert long.usage.prompt_tokens == 256


async def test_concurrent_requests_are_serialised_and_correct() -> None:
    embedder = Embedder()
    alone = [(await embedder.embed(EmbedRequest(input=[s]))).embeddings[0] for s in SENTENCES[:3]]
    together = await asyncio.gather(
        *(embedder.embed(EmbedRequest(input=[s])) for s in SENTENCES[:3])
    )
    for single, result in zip(alone, together, strict=True):
        np.testing.assert_allclose(result.embeddings[0], single, atol=1e-6)


async def test_embedding_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at most 2048"):
        EmbedRequest(input=["x"] * (MAX_INPUTS + 1))
    embedder = Embedder()
    unchecked = EmbedRequest.model_construct(input=["x"] * (MAX_INPUTS + 1), model=None)
    with pytest.raises(InvalidRequest, match="give 1 to 2048 inputs, not 2049"):
        await embedder.embed(unchecked)
    with pytest.raises(InvalidRequest, match="embeds with all-MiniLM-L6-v2, not 'gpt-4'"):
        await embedder.embed(EmbedRequest(input=["x"], model="gpt-4"))
    named = await embedder.embed(
        EmbedRequest(input=["x"], model="sentence-transformers/all-MiniLM-L6-v2")
    )
    assert len(named.embeddings[0]) == 384
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        Embedder(batch_size=0)
    with pytest.raises(EmbeddingModelError, match="gives no max_seq_length"):
        Embedder(model_dir=tmp_path)
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    with pytest.raises(EmbeddingModelError, match=r"cannot read .*modules\.json"):
        Embedder(model_dir=tmp_path)
    pooling = {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}
    (tmp_path / "modules.json").write_text(json.dumps([pooling]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    with pytest.raises(EmbeddingModelError, match="only mean is supported"):
        Embedder(model_dir=tmp_path)
