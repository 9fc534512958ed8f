"""Audio for the local transcription model: WAV files decoded to 16 kHz mono float samples, cut
into Whisper's 30 s windows, and a transcription's segments written as OpenAI's reply formats.

Only WAV (16-bit PCM, any rate and channel count) is decoded: no library installed here reads
mp3, flac or ogg, and a file in another container is refused with a clear InvalidRequest.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from atoll.agent.errors import InvalidRequest

RATE = 16_000  # what Whisper's feature extractor takes
WINDOW_S = 30  # Whisper hears 30 s at a time
WINDOW = RATE * WINDOW_S
_PCM = 1
_EXTENSIBLE = 0xFFFE
_PCM_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def decode_wav(data: bytes) -> np.ndarray:
    """The samples of a 16-bit PCM WAV file, as float32 in [-1, 1], mono (channels averaged) and
    resampled to 16 kHz. Anything else is an InvalidRequest saying what it is."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        kind = _container(data)
        raise InvalidRequest(
            f"the audio is {kind}, not a WAV file: the local transcription backend decodes "
            "WAV (16-bit PCM) only"
        )
    fmt: tuple[int, int, int, int] | None = None
    samples: bytes | None = None
    at = 12
    while at + 8 <= len(data) and samples is None:
        chunk, size = data[at : at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = data[at + 8 : at + 8 + size]
        if chunk == b"fmt ":
            if len(body) < 16:
                raise InvalidRequest("the WAV file's fmt chunk is truncated")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _EXTENSIBLE and len(body) >= 40 and body[26:40] == _PCM_GUID_TAIL:
                tag = struct.unpack_from("<H", body, 24)[0]
            fmt = (tag, channels, rate, bits)
        elif chunk == b"data":
            samples = body
        at += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None or samples is None:
        raise InvalidRequest("the WAV file has no fmt or no data chunk")
    tag, channels, rate, bits = fmt
    if tag != _PCM or bits != 16:
        raise InvalidRequest(
            f"the WAV file holds {bits}-bit samples of format {tag}; only 16-bit PCM is decoded"
        )
    if not 1 <= channels <= 16 or not 1000 <= rate <= 384_000:
        raise InvalidRequest(f"the WAV file declares {channels} channels at {rate} Hz")
    frames = len(samples) // (2 * channels)
    if frames == 0:
        raise InvalidRequest("the WAV file holds no samples")
    pcm = np.frombuffer(samples, dtype="<i2", count=frames * channels).reshape(frames, channels)
    mono = pcm.astype(np.float32).mean(axis=1) / 32768.0
    return resample(mono, rate)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """``samples`` at ``rate`` Hz as 16 kHz, by linear interpolation (speech sits well below
    the 8 kHz a 16 kHz signal carries, so no filter is worth its cost here)."""
    if rate == RATE:
        return samples
    n = max(1, round(len(samples) * RATE / rate))
    at = np.arange(n, dtype=np.float64) * (rate / RATE)
    return np.interp(at, np.arange(len(samples)), samples).astype(np.float32)


def windows(samples: np.ndarray) -> list[np.ndarray]:
    """30 s windows, the last one shorter (the feature extractor pads it)."""
    return [samples[i : i + WINDOW] for i in range(0, len(samples), WINDOW)]


def _container(data: bytes) -> str:
    for magic, name in (
        (b"ID3", "MP3"),
        (b"\xff\xfb", "MP3"),
        (b"fLaC", "FLAC"),
        (b"OggS", "Ogg"),
        (b"\x1aE\xdf\xa3", "WebM/Matroska"),
    ):
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return "MP4/M4A"
    return "not a recognised audio format"


# --- replies ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the file
    end: float
    text: str
    tokens: list[int]


def verbose(task: str, language: str, duration: float, segments: list[Segment]) -> dict[str, Any]:
    """OpenAI's ``verbose_json``. Whisper's scores per segment (avg_logprob, no_speech_prob) are
    not computed: those fields are left out rather than made up."""
    return {
        "task": task,
        "language": language,
        "duration": round(duration, 3),
        "text": joined(segments),
        "segments": [
            {
                "id": i,
                "seek": int(s.start * 100),  # in 10 ms frames, as Whisper counts
                "start": round(s.start, 2),
                "end": round(s.end, 2),
                "text": s.text,
                "tokens": s.tokens,
                "compression_ratio": _compression(s.text),
            }
            for i, s in enumerate(segments)
        ],
    }


def joined(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments).strip()


def subtitles(segments: list[Segment], kind: str) -> str:
    """SubRip (``srt``) or WebVTT (``vtt``) cues, one per segment."""
    sep = "," if kind == "srt" else "."
    cues = [
        f"{_clock(s.start, sep)} --> {_clock(s.end, sep)}\n{s.text.strip()}\n"
        for s in segments
        if s.text.strip()
    ]
    if kind == "srt":
        return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, 1))
    return "WEBVTT\n\n" + "\n".join(cues)


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return (
        f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"
    )


def _compression(text: str) -> float:
    raw = text.encode()
    return round(len(raw) / len(zlib.compress(raw)), 3) if raw else 0.0
