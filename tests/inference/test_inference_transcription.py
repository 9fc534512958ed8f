"""Transcription on the island: decoding every format OpenAI's API takes (files encoded by
FFmpeg here) and the reply formats, then the openai SDK against a
gateway and a ``local`` node with a tiny random Whisper, sent a WAV larger than the broker's
8 MiB message limit (the audio crosses the data plane as a stream in chunks)."""

from __future__ import annotations

import asyncio
import io
import struct
import wave
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest

from atoll.agent.errors import Forbidden, InvalidRequest
from atoll.agent.transfer import open_transfer
from atoll.plugins.gateway.app import AUDIO_BODY_BYTES
from atoll.plugins.inference.audio import RATE, Segment, decode_audio, subtitles, windows
from atoll.plugins.inference.contract import (
    MAX_AUDIO_BYTES,
    TRANSCRIBE,
    TranscribeRequest,
    transcribe,
)
from atoll.protocol.frames import DEFAULT_MAX_MESSAGE
from support.island import Island
from support.overlay import AgentFactory

WHISPER = "tiny-whisper"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sweep(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * (200 + 50 * t) * t)


def wav(seconds: float, rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A sine sweep as a PCM WAV file (the stdlib's writer)."""
    tone = sweep(seconds, rate)
    pcm = (np.repeat(tone[:, None], channels, axis=1) * 32767).astype("<i2")
    if bits == 8:
        pcm = ((tone + 1) * 127).astype(np.uint8)[:, None]
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels if bits == 16 else 1)
        w.setsampwidth(bits // 8)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


# --- decoding and formats -----------------------------------------------------------------------


def encoded(container: str, codec: str, seconds: float = 2.0, rate: int = 48_000) -> bytes:
    """The sweep in stereo, encoded by FFmpeg (PyAV) as ``codec`` in ``container``."""
    tone = np.ascontiguousarray(np.repeat(sweep(seconds, rate)[None, :], 2, axis=0), np.float32)
    out = io.BytesIO()
    with av.open(out, "w", format=container) as muxer:
        stream = muxer.add_stream(codec, rate=rate, layout="stereo")
        assert isinstance(stream, av.AudioStream)
        step = stream.codec_context.frame_size or 1024
        for at in range(0, tone.shape[1], step):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, at : at + step]), format="fltp", layout="stereo"
            )
            frame.sample_rate = rate
            muxer.mux(stream.encode(frame))
        muxer.mux(stream.encode(None))
    return out.getvalue()


def test_a_wav_of_any_rate_and_channels_becomes_16khz_mono() -> None:
    stereo = decode_audio(wav(2.0, 48_000, channels=2))
    assert stereo.dtype == np.float32 and len(stereo) == 2 * RATE
    same = decode_audio(wav(2.0, RATE))
    assert 0.45 < float(np.abs(same).max()) <= 0.5
    assert np.corrcoef(stereo, same)[0, 1] > 0.99  # the same sweep, resampled and mixed
    eight_bit = decode_audio(wav(2.0, 8000, bits=8))
    assert len(eight_bit) == 2 * RATE and np.corrcoef(eight_bit, same)[0, 1] > 0.9
    assert [len(w) for w in windows(np.zeros(RATE * 65, np.float32))] == [RATE * 30] * 2 + [
        RATE * 5
    ]


@pytest.mark.parametrize(
    ("container", "codec"),
    [
        ("mp3", "libmp3lame"),
        ("flac", "flac"),
        ("ogg", "libopus"),
        ("ipod", "aac"),  # an .m4a file
        ("mp4", "aac"),
        ("webm", "libopus"),
    ],
)
def test_every_format_openai_takes_is_decoded(container: str, codec: str) -> None:
    samples = decode_audio(encoded(container, codec))
    assert samples.dtype == np.float32
    assert abs(len(samples) / RATE - 2.0) < 0.1  # a codec's priming samples at most
    assert 0.25 < float(np.sqrt(np.mean(samples**2))) < 0.6  # the sweep, not silence or noise


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"ID3\x04" + bytes(100), "MP3 file could not be decoded"),
        (b"fLaC" + bytes(100), "FLAC file could not be decoded"),
        (b"OggS" + bytes(100), "Ogg file could not be decoded"),
        (b"\x00\x00\x00\x1cftypM4A " + bytes(50), "MP4/M4A file could not be decoded"),
        (bytes(12), "not in a recognised format"),
        (b"%PDF-1.7" + bytes(100), "not in a recognised format"),
        (b"RIFF\x04\x00\x00\x00WAVE", "WAV file could not be decoded"),
        (wav(0.1, 8000)[:44], "holds no samples"),
        (encoded("mp3", "libmp3lame")[:2000], None),  # cut short: what there is, or refused
    ],
)
def test_other_audio_is_refused_saying_what_it_is(data: bytes, said: str | None) -> None:
    if said is None:
        try:
            assert len(decode_audio(data)) < RATE
        except InvalidRequest as exc:
            assert "could not be decoded" in exc.message or "no samples" in exc.message
        return
    with pytest.raises(InvalidRequest, match=said):
        decode_audio(data)


def test_subtitles_number_and_time_each_segment() -> None:
    segments = [Segment(0.0, 1.5, " hello", [1]), Segment(61.25, 3725.0, " world", [2])]
    assert subtitles(segments, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nhello\n\n2\n00:01:01,250 --> 01:02:05,000\nworld\n"
    )
    assert subtitles(segments, "vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello")


# --- the island ---------------------------------------------------------------------------------


@pytest.fixture
async def island(make_agent: AgentFactory, tmp_path: Path) -> Island:
    isl = Island(make_agent)
    await isl.start_gateway()
    assert await isl.add_transcriber(tmp_path) == WHISPER
    return isl


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's translations
async def test_a_wav_over_8_mib_is_transcribed_through_the_openai_sdk(island: Island) -> None:
    audio = wav(50.0, 96_000, channels=2)  # two 30 s windows once at 16 kHz
    # Over the broker's message limit, and over the gateway's body limit for other routes.
    assert len(audio) > DEFAULT_MAX_MESSAGE and len(audio) > island.plugin.gateway.max_body_bytes
    url = f"{island.url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key=island.key("alice"), max_retries=0) as c:
        assert WHISPER in {m.id for m in (await c.models.list()).data}
        verbose = await c.audio.transcriptions.create(
            model=WHISPER, file=("long.wav", audio), response_format="verbose_json", language="de"
        )
        assert verbose.language == "de" and verbose.duration == pytest.approx(50.0, abs=0.01)
        segments = verbose.segments or []
        assert segments and all(0 <= s.start <= s.end <= 50.0 + 1e-6 for s in segments)
        # The second window's segments are offset by its start.
        assert any(s.start >= 30.0 for s in segments)
        assert verbose.text == "".join(s.text for s in segments).strip()
        plain = await c.audio.transcriptions.create(
            model=WHISPER, file=("long.wav", audio), language="de", prompt="Atoll", temperature=0
        )
        assert isinstance(plain.text, str)
        srt = await c.audio.transcriptions.create(
            model=WHISPER, file=("long.wav", audio), response_format="srt", language="de"
        )
        assert srt == "" or srt.startswith("1\n00:00:")
        english = await c.audio.translations.create(model=WHISPER, file=("c.wav", wav(3.0, 22_050)))
        assert isinstance(english.text, str)
    # The SDK types a translation's verbose_json as deprecated: asked for by hand.
    async with httpx.AsyncClient(base_url=url, headers=bearer(island.key("alice"))) as http:
        reply = await http.post(
            "/audio/translations",
            data={"model": WHISPER, "response_format": "verbose_json"},
            files={"file": ("c.wav", wav(3.0, 22_050))},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["task"] == "translate" and reply.json()["duration"] == 3.0


async def test_a_streamed_transcription_sends_each_window_as_it_is_heard(island: Island) -> None:
    audio = ("long.wav", wav(65.0, RATE))  # three windows: three pieces
    url = f"{island.url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key=island.key("alice"), max_retries=0) as c:
        whole = await c.audio.transcriptions.create(model=WHISPER, file=audio, language="de")
        events = await c.audio.transcriptions.create(
            model=WHISPER, file=audio, language="de", stream=True
        )
        seen = [event async for event in events]
        *deltas, done = seen
        assert [e.type for e in deltas] == ["transcript.text.delta"] * 3
        assert done.type == "transcript.text.done" and done.text == whole.text
        assert "".join(e.delta for e in deltas if e.type == "transcript.text.delta").strip() == (
            whole.text
        )
        with pytest.raises(openai.BadRequestError, match="streamed transcription is json or"):
            await c.audio.transcriptions.create(
                model=WHISPER, file=audio, stream=True, response_format="srt"
            )
        with pytest.raises(openai.BadRequestError, match="MP3"):  # before any text: a status
            await c.audio.transcriptions.create(
                model=WHISPER, file=("a.mp3", b"ID3" + bytes(99)), stream=True
            )


async def test_bad_audio_and_options_are_4xx_and_the_node_stays_up(island: Island) -> None:
    url = f"{island.url}/v1"
    clip = ("clip.wav", wav(1.0, RATE))
    async with openai.AsyncOpenAI(base_url=url, api_key=island.key("alice"), max_retries=0) as c:
        with pytest.raises(openai.BadRequestError, match="MP3 file could not be decoded"):
            await c.audio.transcriptions.create(model=WHISPER, file=("a.mp3", b"ID3" + bytes(99)))
        with pytest.raises(openai.BadRequestError, match="does not know the language 'xx'"):
            await c.audio.transcriptions.create(model=WHISPER, file=clip, language="xx")
        with pytest.raises(openai.UnprocessableEntityError):
            await c.audio.transcriptions.create(model=WHISPER, file=clip, temperature=3)
        with pytest.raises(openai.UnprocessableEntityError):
            await c.audio.transcriptions.create(model=WHISPER, file=("empty.wav", b""))
        body = struct.pack("<4sI4s", b"RIFF", 0, b"WAVE")
        with pytest.raises(openai.BadRequestError, match="WAV file could not be decoded"):
            await c.audio.transcriptions.create(model=WHISPER, file=("odd.wav", body))
        with pytest.raises(openai.BadRequestError, match="not in a recognised format"):
            await c.audio.transcriptions.create(model=WHISPER, file=("a.pdf", b"%PDF" + bytes(9)))
        song = await c.audio.transcriptions.create(
            model=WHISPER,
            file=("a.mp3", encoded("mp3", "libmp3lame")),
            response_format="verbose_json",
        )
        assert abs(song.duration - 2.0) < 0.1
        text = await c.audio.transcriptions.create(model=WHISPER, file=clip, response_format="text")
        assert isinstance(text, str) and text.endswith("\n")


async def test_the_transcribe_stream_checks_its_caller_and_the_audio_size(island: Island) -> None:
    """Straight to the node: only the gateway's roles may open the stream, and audio that ends
    before its declared size is refused, the node answering the next request."""
    gw = island.gateway
    assert gw is not None
    clip = TranscribeRequest(audio=wav(1.0, RATE), model=WHISPER)
    user = await island.make_agent("mallory", roles=("agent",))
    with pytest.raises(Forbidden, match="needs one of the roles gateway"):
        await transcribe(user.agent, "ear/inference", clip, 10.0)
    header = {"model": WHISPER, "size": 1000}
    async with open_transfer(gw.agent, "ear/inference", TRANSCRIBE.name, header, 10.0) as stream:
        await stream.write(bytes(10))
        await stream.write_eof()
        with pytest.raises(InvalidRequest, match="ended 990 bytes short of 1000"):
            await stream.read()
    too_big = {"model": WHISPER, "size": MAX_AUDIO_BYTES + 1}
    with pytest.raises(InvalidRequest, match="size: Input should be less than or equal"):
        async with open_transfer(gw.agent, "ear/inference", TRANSCRIBE.name, too_big, 10.0) as s:
            await s.read()
    result = await transcribe(gw.agent, "ear/inference", clip, 10.0)
    assert result.model == WHISPER and result.body == {"text": result.text}


async def test_audio_over_its_limit_is_a_413(island: Island) -> None:
    """Refused by its declared length, before a byte of the body is read."""
    host, port = island.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + island.key("a").encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % (AUDIO_BODY_BYTES + 1)
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")
