"""Audio for the local transcription model: files decoded to 16 kHz mono float samples, cut
into Whisper's 30 s windows, and a transcription's segments written as OpenAI's reply formats.

Decoding is FFmpeg's, through PyAV (its wheels carry FFmpeg): the formats OpenAI's API accepts —
WAV, MP3, FLAC, Ogg (Opus, Vorbis), MP4/M4A (AAC) and WebM/Matroska. The container is picked
from the file's first bytes and only that demuxer is run, so FFmpeg's other parsers never see a
caller's bytes; anything else is refused with a clear InvalidRequest, as is audio longer than
``MAX_SECONDS`` once decoded (a small compressed file can hold hours of silence).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from atoll.agent.errors import InvalidRequest

RATE = 16_000  # what Whisper's feature extractor takes
WINDOW_S = 30  # Whisper hears 30 s at a time
WINDOW = RATE * WINDOW_S
MAX_SECONDS = 4 * 3600  # decoded: 4 h of 16 kHz float32 is 0.9 GB
# (first bytes, or None: bytes 4-8 are "ftyp") -> FFmpeg's demuxer, and what to call it.
CONTAINERS: list[tuple[bytes | None, str, str]] = [
    (b"RIFF", "wav", "WAV"),
    (b"ID3", "mp3", "MP3"),
    (b"\xff\xfb", "mp3", "MP3"),
    (b"\xff\xf3", "mp3", "MP3"),
    (b"\xff\xf2", "mp3", "MP3"),
    (b"fLaC", "flac", "FLAC"),
    (b"OggS", "ogg", "Ogg"),
    (b"\x1aE\xdf\xa3", "matroska", "WebM/Matroska"),
    (None, "mp4", "MP4/M4A"),
]


def decode_audio(data: bytes) -> np.ndarray:
    """The samples of an audio file, as float32 in [-1, 1], mono (channels mixed) at 16 kHz.
    What cannot be decoded is an InvalidRequest saying why."""
    import av

    demuxer, kind = _container(data)
    samples: list[np.ndarray] = []
    total = 0
    to_mono = av.AudioResampler(format="flt", layout="mono", rate=RATE)
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            if not container.streams.audio:
                raise InvalidRequest(f"the {kind} file holds no audio stream")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                for out in to_mono.resample(frame):
                    samples.append(out.to_ndarray().reshape(-1))
                    total += out.samples
                if total > MAX_SECONDS * RATE:
                    raise InvalidRequest(
                        f"the audio is longer than {MAX_SECONDS // 3600} hours: split it"
                    )
            for out in to_mono.resample(None):  # what the resampler still holds
                samples.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise InvalidRequest(f"the {kind} file could not be decoded: {exc.strerror}") from None
    if not samples or not sum(len(s) for s in samples):
        raise InvalidRequest(f"the {kind} file holds no samples")
    return np.clip(np.concatenate(samples), -1.0, 1.0).astype(np.float32, copy=False)


def _container(data: bytes) -> tuple[str, str]:
    for magic, demuxer, kind in CONTAINERS:
        if data.startswith(magic) if magic else data[4:8] == b"ftyp":
            return demuxer, kind
    raise InvalidRequest(
        "the audio is not in a recognised format: send WAV, MP3, FLAC, Ogg, MP4/M4A or WebM"
    )


def windows(samples: np.ndarray) -> list[np.ndarray]:
    """30 s windows, the last one shorter (the feature extractor pads it)."""
    return [samples[i : i + WINDOW] for i in range(0, len(samples), WINDOW)]


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
