"""The local backend's transcription model: a transformers Whisper from a directory the operator
gives (model, processor, generation config), loaded on first use and run on a worker thread, one
file at a time. Audio is cut into 30 s windows (audio.py), decoded a few windows per batch;
every format is decoded with timestamps (Whisper's timestamp rules also keep its text in
well-formed segments), each segment's times offset by its window's start."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoll.agent.errors import InvalidRequest
from atoll.plugins.inference.audio import (
    RATE,
    WINDOW_S,
    Segment,
    decode_audio,
    joined,
    subtitles,
    verbose,
    windows,
)
from atoll.plugins.inference.backend import Partial
from atoll.plugins.inference.contract import TranscribeRequest, TranscribeResult

BATCH = 8  # windows decoded together (one at a time when streamed)


class Transcriber:
    def __init__(self, path: Path, device: str, dtype: torch.dtype) -> None:
        self.path = path
        self.model_id = path.name
        self.device = device
        self.dtype = dtype
        self._loaded: tuple[Any, Any] | None = None
        self._load_lock = threading.Lock()
        self._turn = asyncio.Lock()  # one file at a time: the model is one

    async def transcribe(
        self, request: TranscribeRequest, partial: Partial | None = None
    ) -> TranscribeResult:
        """``partial``: each window's text as it is decoded (``request.stream``). A cancelled
        request stops after the batch being decoded, and the next file waits for that."""
        if request.model is not None and request.model != self.model_id:
            raise InvalidRequest(
                f"this node transcribes with {self.model_id!r}, not {request.model!r}"
            )
        samples = await asyncio.to_thread(decode_audio, request.audio)
        loop = asyncio.get_running_loop()

        def heard(text: str) -> None:  # on the worker thread
            if partial is not None and text:
                loop.call_soon_threadsafe(partial, text)

        stop = threading.Event()
        async with self._turn:
            job = asyncio.ensure_future(asyncio.to_thread(self._run, request, samples, heard, stop))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                stop.set()
                await asyncio.wait([job])  # the model is free again once it has stopped
                job.exception()  # retrieved: its error was for nobody
                raise

    def _load(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._loaded is None:
                from transformers import WhisperForConditionalGeneration, WhisperProcessor

                model: Any = WhisperForConditionalGeneration.from_pretrained(
                    self.path, dtype=self.dtype
                )
                processor = WhisperProcessor.from_pretrained(self.path)
                self._loaded = model.to(self.device).eval(), processor
            return self._loaded

    def _run(
        self, request: TranscribeRequest, samples: np.ndarray, heard: Partial, stop: threading.Event
    ) -> TranscribeResult:
        model, processor = self._load()
        options = self._options(model, processor, request)
        language = request.language or self._detected(model, processor, samples)
        parts = windows(samples)
        segments: list[Segment] = []
        done, said = 0, False  # segments handed to ``heard``; whether any had words
        batch = 1 if request.stream else BATCH  # streamed: each window's text as it is heard
        for first in range(0, len(parts), batch):
            if stop.is_set():
                raise InvalidRequest("the transcription was abandoned")  # nobody reads it
            group = parts[first : first + batch]
            features = processor.feature_extractor(
                [np.asarray(w) for w in group], sampling_rate=RATE, return_tensors="pt"
            ).input_features.to(self.device, self.dtype)
            try:
                with torch.inference_mode():
                    out = model.generate(
                        features, return_timestamps=True, return_dict_in_generate=True, **options
                    )
            except ValueError as exc:  # options the model cannot take (a prompt too long, ...)
                raise InvalidRequest(
                    f"the transcription model refused the request: {exc}"
                ) from None
            for i, window in enumerate(group):
                offset = (first + i) * WINDOW_S
                end = offset + len(window) / RATE
                segments += self._timed(processor, model, out["segments"][i], offset, end)
            piece = "".join(t.text for t in segments[done:])
            heard(piece if said else piece.lstrip())  # as the text starts: no leading space
            said = said or bool(piece.strip())
            done = len(segments)
        duration = len(samples) / RATE
        if request.response_format == "verbose_json":
            body = verbose(request.task, language, duration, segments)
            return TranscribeResult(model=self.model_id, text=body["text"], body=body)
        if request.response_format in ("srt", "vtt"):
            return TranscribeResult(
                model=self.model_id, text=subtitles(segments, request.response_format)
            )
        text = joined(segments)
        if request.response_format == "text":
            return TranscribeResult(model=self.model_id, text=text + "\n")
        return TranscribeResult(model=self.model_id, text=text, body={"text": text})

    def _options(self, model: Any, processor: Any, request: TranscribeRequest) -> dict[str, Any]:
        """generate's keyword arguments for ``request``; InvalidRequest for what the model
        cannot do (a language it does not know, translating with an English-only model)."""
        config = model.generation_config
        multilingual = bool(getattr(config, "is_multilingual", False))
        options: dict[str, Any] = {"do_sample": bool(request.temperature)}
        if request.temperature:
            options["temperature"] = request.temperature
        if request.language is not None:
            known = sorted(k.strip("<|>") for k in (getattr(config, "lang_to_id", None) or {}))
            if not multilingual or request.language not in known:
                raise InvalidRequest(
                    f"{self.model_id!r} does not know the language {request.language!r} "
                    f"(it knows: {', '.join(known) or 'none: it is English-only'})"
                )
            options["language"] = request.language
        if multilingual:
            options["task"] = request.task
        elif request.task == "translate":
            raise InvalidRequest(f"{self.model_id!r} is English-only: it does not translate")
        if request.prompt:
            options["prompt_ids"] = processor.get_prompt_ids(
                request.prompt, return_tensors="pt"
            ).to(self.device)
        return options

    def _detected(self, model: Any, processor: Any, samples: np.ndarray) -> str:
        """The language Whisper hears in the first window (English for an English-only model)."""
        config = model.generation_config
        if not getattr(config, "is_multilingual", False):
            return "en"
        features = processor.feature_extractor(
            np.asarray(samples[: RATE * WINDOW_S]), sampling_rate=RATE, return_tensors="pt"
        ).input_features.to(self.device, self.dtype)
        with torch.inference_mode():
            token = int(model.detect_language(features)[0])
        names = {v: k.strip("<|>") for k, v in config.lang_to_id.items()}
        return names.get(token, "unknown")

    def _timed(
        self, processor: Any, model: Any, found: list[dict[str, Any]], offset: float, end: float
    ) -> list[Segment]:
        """Whisper's segments of one window, in the file's time: times past the window's real
        end (Whisper hears a short last window padded to 30 s) are held at that end."""
        return [
            Segment(
                min(offset + float(s["start"]), end),
                min(offset + float(s["end"]), end),
                self._text(processor, model, s["tokens"].tolist()),
                s["tokens"].tolist(),
            )
            for s in found
        ]

    @staticmethod
    def _text(processor: Any, model: Any, ids: list[int]) -> str:
        """The words of ``ids``: timestamp tokens (those after ``<|notimestamps|>``) and special
        tokens dropped."""
        stamps = model.generation_config.no_timestamps_token_id + 1
        words = [t for t in ids if t < stamps]
        return str(processor.tokenizer.decode(words, skip_special_tokens=True))
