"""The gateway's inference routes: OpenAI's /v1 chat completions, completions, embeddings,
transcriptions, translations and models, and LoRAX's /, /generate and /generate_stream. Bodies
are parsed and built by the dialect modules (openai_*.py, lorax_api.py); what a request does is
service.py's."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and ``user``
# (the authenticated-caller dependency) is a value of app.py's.
import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from atoll.plugins.gateway import lorax_api, openai_requests, openai_streams
from atoll.plugins.gateway import openai_responses as responses
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.bodies import Event, sse
from atoll.plugins.gateway.catalog import ModelCard
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.inference.contract import (
    EMBED,
    MAX_AUDIO_BYTES,
    TRANSCRIBE,
    EmbedResult,
    GenerateRequest,
    TranscribeRequest,
    TranscribeResult,
)

LORAX_PATHS = ("/", "/generate", "/generate_stream")  # their errors take LoRAX's shape


def install_openai(app: FastAPI, gw: Gateway, user: Any) -> None:
    """OpenAI's inference routes; ``user`` is the authenticated-caller dependency of app.py."""

    @app.get("/v1/models", response_model=responses.ModelList)
    async def list_models(principal: user) -> Any:
        return _json(responses.ModelList(data=[_model(c) for c in gw.catalog.models(principal)]))

    # ``:path``: adapter ids hold a slash (``alice/soap``)
    @app.get("/v1/models/{model_id:path}", response_model=responses.Model)
    async def retrieve_model(principal: user, model_id: str) -> Any:
        for card in gw.catalog.models(principal):
            if card.id == model_id:
                return _json(_model(card))
        raise GatewayError(  # as for a model that exists but is not the caller's
            404,
            f"the model {model_id!r} does not exist or you do not have access to it",
            code="model_not_found",
            param="model",
        )

    @app.post("/v1/chat/completions", response_model=responses.ChatCompletion)
    async def chat(principal: user, body: openai_requests.ChatCompletionRequest) -> Any:
        rid = uuid.uuid4().hex
        if not body.stream:
            return _json(await chat_reply(gw, principal, body, rid))
        events, n = _chat_events(gw, principal, body, rid, background=False)
        stream = openai_streams.ChatStream(
            rid, body.model, n, include_usage=body.include_usage, logprobs=bool(body.logprobs)
        )
        return await _sse(events, stream.chunks, stream.finish, stream.error)

    @app.post("/v1/completions", response_model=responses.Completion)
    async def completions(principal: user, body: openai_requests.CompletionRequest) -> Any:
        rid = uuid.uuid4().hex
        if not body.stream:
            return _json(await completion_reply(gw, principal, body, rid))
        events, n = _completion_events(gw, principal, body, rid, background=False)
        stream = openai_streams.CompletionStream(
            rid,
            body.model,
            n,
            per_prompt=body.choices_per_prompt,
            include_usage=body.include_usage,
            logprobs=body.logprobs is not None,
        )
        return await _sse(events, stream.chunks, stream.finish, stream.error)

    @app.post("/v1/embeddings", response_model=responses.CreateEmbeddingResponse)
    async def embeddings(principal: user, body: openai_requests.EmbeddingRequest) -> Any:
        return _json(await embedding_reply(gw, principal, body))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        principal: user,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()],
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float | None, Form()] = None,
        stream: Annotated[bool, Form()] = False,
    ) -> Any:
        options = {"language": language, "prompt": prompt, "temperature": temperature}
        if stream:
            return await streamed_transcription(
                gw, principal, file, model, response_format, options
            )
        return await audio_reply(gw, principal, file, model, "transcribe", response_format, options)

    @app.post("/v1/audio/translations")
    async def translations(
        principal: user,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()],
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float | None, Form()] = None,
    ) -> Any:
        options = {"prompt": prompt, "temperature": temperature}
        return await audio_reply(gw, principal, file, model, "translate", response_format, options)


async def _audio_request(
    file: UploadFile, model: str, task: str, response_format: str, options: dict[str, Any]
) -> TranscribeRequest:
    if file.size is not None and file.size > MAX_AUDIO_BYTES:
        raise GatewayError(413, f"the audio file is over {MAX_AUDIO_BYTES} bytes", param="file")
    try:
        return TranscribeRequest(
            audio=await file.read(),
            filename=file.filename or "audio",
            model=model,
            task=task,  # type: ignore[arg-type]
            response_format=response_format,  # type: ignore[arg-type]
            **options,
        )
    except ValueError as exc:
        raise GatewayError(422, f"invalid {task} request: {exc}") from None


async def audio_reply(
    gw: Gateway,
    principal: Principal,
    file: UploadFile,
    model: str,
    task: str,
    response_format: str,
    options: dict[str, Any],
) -> Any:
    """A transcription or translation: the uploaded file to a node (over the data plane, in
    chunks), its reply in the format asked for."""
    params = await _audio_request(file, model, task, response_format, options)
    reply = await gw.call(principal, model, TRANSCRIBE, params, None)
    result = TranscribeResult.model_validate(reply)
    if response_format in ("text", "srt", "vtt"):
        return PlainTextResponse(result.text)
    return result.body if isinstance(result.body, dict) else {"text": result.text}


async def streamed_transcription(
    gw: Gateway,
    principal: Principal,
    file: UploadFile,
    model: str,
    response_format: str,
    options: dict[str, Any],
) -> Response:
    """OpenAI's transcription stream: a ``transcript.text.delta`` event per piece of text as
    the node hears it, then ``transcript.text.done``. A failure before the first piece is an
    honest HTTP status; after it, an error event ends the stream."""
    if response_format not in ("json", "text"):
        raise GatewayError(400, "a streamed transcription is json or text", param="response_format")
    stream = options | {"stream": True}
    params = await _audio_request(file, model, "transcribe", response_format, stream)
    pieces: asyncio.Queue[str] = asyncio.Queue()
    call = asyncio.ensure_future(
        gw.call(principal, model, TRANSCRIBE, params, None, on_delta=pieces.put_nowait)
    )
    first = asyncio.ensure_future(pieces.get())
    try:
        await asyncio.wait({call, first}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        call.cancel()
        raise
    finally:
        first.cancel()
    head = [first.result()] if first.done() and not first.cancelled() else []
    if not head:
        call.result()  # failed before any text: its status, as an HTTP one

    async def body() -> AsyncIterator[bytes]:
        try:
            for piece in head:
                yield sse({"type": "transcript.text.delta", "delta": piece})
            while not (call.done() and pieces.empty()):
                get = asyncio.ensure_future(pieces.get())
                await asyncio.wait({call, get}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield sse({"type": "transcript.text.delta", "delta": get.result()})
                else:
                    get.cancel()
            result = TranscribeResult.model_validate(call.result())
            yield sse({"type": "transcript.text.done", "text": result.text.strip()})
        except GatewayError as exc:
            yield sse(exc.body())
        finally:
            call.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


# --- OpenAI's requests answered whole: the routes' and a batch's lines' (batches.py) ---------


def _chat_events(
    gw: Gateway,
    principal: Principal,
    body: openai_requests.ChatCompletionRequest,
    rid: str,
    background: bool,
) -> tuple[AsyncGenerator[tuple[int, Event], None], int]:
    target = gw.resolve(principal, body.model, openai_requests.mixture_of(body))
    requests = _ids(openai_requests.chat_to_generate(body, target.base, target.adapter), rid)
    prompt = _prompt_text(principal, [m.model_dump(mode="json") for m in body.messages])
    events = gw.run(
        principal,
        target,
        requests,
        per_prompt=len(requests),
        prompt_text=prompt,
        background=background,
    )
    return events, len(requests)


def _completion_events(
    gw: Gateway,
    principal: Principal,
    body: openai_requests.CompletionRequest,
    rid: str,
    background: bool,
) -> tuple[AsyncGenerator[tuple[int, Event], None], int]:
    target = gw.resolve(principal, body.model, openai_requests.mixture_of(body))
    generate = openai_requests.completion_to_generate(body, target.base, target.adapter)
    requests = _ids(generate, rid)
    events = gw.run(
        principal,
        target,
        requests,
        per_prompt=body.choices_per_prompt,
        prompt_text=_prompt_text(principal, body.prompt),
        operation="text_completion",
        background=background,
    )
    return events, len(requests)


async def chat_reply(
    gw: Gateway,
    principal: Principal,
    body: openai_requests.ChatCompletionRequest,
    rid: str,
    background: bool = False,
) -> responses.ChatCompletion:
    events, n = _chat_events(gw, principal, body, rid, background)
    choices = await _collect(events, n)
    return responses.chat_completion(rid, body.model, choices, logprobs=bool(body.logprobs))


async def completion_reply(
    gw: Gateway,
    principal: Principal,
    body: openai_requests.CompletionRequest,
    rid: str,
    background: bool = False,
) -> responses.Completion:
    events, n = _completion_events(gw, principal, body, rid, background)
    choices = await _collect(events, n)
    return responses.completion(
        rid,
        body.model,
        choices,
        per_prompt=body.choices_per_prompt,
        logprobs=body.logprobs is not None,
    )


async def embedding_reply(
    gw: Gateway,
    principal: Principal,
    body: openai_requests.EmbeddingRequest,
    background: bool = False,
) -> responses.CreateEmbeddingResponse:
    embed = openai_requests.embedding_to_embed(body, body.model)
    prompt = _prompt_text(principal, body.input)
    reply = await gw.call(principal, body.model, EMBED, embed, prompt, background=background)
    result = EmbedResult.model_validate(reply)
    return responses.embedding_response(result, body.model, body.encoding_format)


def _model(card: ModelCard) -> responses.Model:
    return responses.Model(
        id=card.id,
        created=card.created,
        owned_by=card.owned_by,
        kind=card.kind,
        parent=card.base,
        root=card.base or card.id,
    )


def install_lorax(app: FastAPI, gw: Gateway, user: Any) -> None:
    """LoRAX's routes (``LORAX_PATHS``); ``user`` as for ``install_openai``."""

    async def lorax(
        principal: Principal, body: lorax_api.LoraxRequest, stream: bool, listed: bool
    ) -> Any:
        mixture = lorax_api.lorax_mixture(body)
        adapter_id = body.params.adapter_id
        model = adapter_id or gw.default_base()
        target = gw.resolve(principal, model if not mixture else gw.default_base(), mixture)
        rid = uuid.uuid4().hex
        generate = lorax_api.lorax_to_generate(body, target.base, target.adapter)
        events = gw.run(
            principal,
            target,
            _ids([generate], rid),
            per_prompt=1,
            prompt_text=_prompt_text(principal, body.inputs),
            operation="text_completion",
        )
        if stream:
            out = lorax_api.LoraxStream(body)
            return await _sse(events, lambda _i, e: out.chunks(e), lambda: b"", out.error)
        (choice,) = await _collect(events, 1)
        reply = lorax_api.lorax_response(body, choice)
        return [reply] if listed else reply

    @app.post("/", response_model=list[lorax_api.LoraxResponse])
    async def lorax_root(principal: user, body: lorax_api.LoraxRequest) -> Any:
        return await lorax(principal, body, bool(body.stream), listed=True)

    @app.post("/generate", response_model=lorax_api.LoraxResponse)
    async def lorax_generate(principal: user, body: lorax_api.LoraxRequest) -> Any:
        return await lorax(principal, body, False, listed=False)

    @app.post("/generate_stream")
    async def lorax_generate_stream(principal: user, body: lorax_api.LoraxRequest) -> Any:
        return await lorax(principal, body, True, listed=False)


def _json(body: Any) -> Response:
    """Built and checked by the dialect modules already: serialised once, not validated again by
    FastAPI (``response_model`` stays on the route for the OpenAPI schema)."""
    return Response(body.model_dump_json(), media_type="application/json")


def _ids(requests: list[GenerateRequest], rid: str) -> list[GenerateRequest]:
    return [r.model_copy(update={"request_id": rid}) for r in requests]


def _prompt_text(principal: Principal, prompt: Any) -> str | None:
    """Prompt text for the ledger, only for projects that opted in."""
    if not principal.store_prompts:
        return None
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


async def _collect(events: AsyncIterator[tuple[int, Event]], n: int) -> list[list[Event]]:
    choices: list[list[Event]] = [[] for _ in range(n)]
    async for index, event in events:
        choices[index].append(event)
    return choices


async def _sse(
    events: AsyncGenerator[tuple[int, Event], None],
    chunks: Callable[[int, Event], bytes],
    finish: Callable[[], bytes],
    error: Callable[[GatewayError], bytes],
) -> Response:
    """A streaming response whose status is settled by the first event: an error before it is an
    honest HTTP status; after it, an error event ends the stream."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        raise GatewayError(503, "the inference node ended without answering") from None

    async def body() -> AsyncIterator[bytes]:
        try:
            yield chunks(*first)
            async for index, event in events:
                if data := chunks(index, event):
                    yield data
            yield finish()  # after the ledger row: `events` has ended
        except GatewayError as exc:
            yield error(exc)
        finally:
            await events.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
