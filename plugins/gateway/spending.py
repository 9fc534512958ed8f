"""What a request may spend, before it is sent: a low estimate of its prompt for the rate limits
(charged at admission, settled to the node's count), a high one for budgets (the reservation
must never be below what the request can use), and the price table that turns tokens into cost.
The budgets themselves, and the one transaction that reserves against them, are
accounts/budgets.py's."""

from __future__ import annotations

import json
from typing import Any

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.contract import Price
from atoll.plugins.inference.contract import EmbedRequest, GenerateRequest, Usage

CHARS_PER_TOKEN = 4  # the rate limits' admission estimate of prompt tokens (no tokenizer here)
TOKENS_PER_MESSAGE = 8  # what a chat template may add around each message (role markers, ends)
NANO_PER_PRICE_UNIT = 1000  # a price per million tokens is this many nano-units per token
TEMPLATE_TOKENS = 64  # the default of what a chat template may add to a prompt, reserved


def prompt_estimate(request: GenerateRequest | EmbedRequest | dict[str, Any]) -> int:
    """Prompt tokens charged at admission, before a node has counted them: a low estimate
    (about 4 characters a token), so the final count rarely falls below it."""
    if isinstance(request, GenerateRequest):
        chars = len(request.prompt or "") + sum(len(m.content) for m in request.messages or [])
        chars += len(request.continuation or "")
        return len(request.prompt_token_ids or ()) + chars // CHARS_PER_TOKEN
    # embed: its inputs (the model inference_routes.py builds, or its dict form)
    texts = request.get("input") if isinstance(request, dict) else request.input
    if not isinstance(texts, list):
        return 0
    return sum(len(t) for t in texts if isinstance(t, str)) // CHARS_PER_TOKEN


def prompt_bound(request: GenerateRequest | EmbedRequest, template_tokens: int) -> int:
    """The most prompt tokens ``request`` can count as: every token of a byte-level tokenizer
    holds at least one byte of the text, so its UTF-8 bytes, plus what a chat template adds
    (``template_tokens`` once, ``TOKENS_PER_MESSAGE`` per message: a default system prompt, role
    markers). Tools and tool calls count as their JSON."""
    if isinstance(request, EmbedRequest):
        return sum(len(t.encode()) for t in request.input)
    scored = len((request.continuation or "").encode())  # a continuation is prompt too
    if request.prompt_token_ids is not None:  # counted exactly: the node adds none
        return len(request.prompt_token_ids) + scored
    if request.prompt is not None:
        return len(request.prompt.encode()) + scored
    messages = request.messages or []
    size = sum(
        len(m.content.encode()) + len((m.name or "").encode()) + TOKENS_PER_MESSAGE
        for m in messages
    )
    extras = [m.tool_calls for m in messages if m.tool_calls] + [request.tools or []]
    extra = sum(len(json.dumps(e).encode()) for e in extras if e)
    return size + template_tokens + extra + scored


class Spending:
    """Reservations against budgets for the requests of one gateway, at its prices."""

    def __init__(
        self, accounts: Accounts, prices: dict[str, Price], template_tokens: int, hold_s: float
    ) -> None:
        self.accounts = accounts
        # Per token, in nano-units: integers, so a budget's sums are exact.
        self.prices = {
            model: (round(p.input * NANO_PER_PRICE_UNIT), round(p.output * NANO_PER_PRICE_UNIT))
            for model, p in prices.items()
        }
        self.template_tokens = template_tokens
        self.hold_s = hold_s  # a reservation's longest life: a request's deadline and more

    def cost(self, model: str, adapter: str | None, usage: Usage) -> int:
        """In nano-units: at the adapter's price, else its base model's, else nothing."""
        price_in, price_out = self.prices.get(adapter or "") or self.prices.get(model) or (0, 0)
        return usage.prompt_tokens * price_in + usage.completion_tokens * price_out

    async def reserve_generate(
        self,
        principal: Principal,
        request_id: str,
        model: str,
        adapter: str | None,
        requests: list[GenerateRequest],
        per_prompt: int,
    ) -> None:
        """Hold the most the choices of one API request can use (their prompts, once per prompt,
        and every choice's ``max_new_tokens``), or GatewayError 429 naming the budget."""
        prompt = sum(prompt_bound(r, self.template_tokens) for r in requests[::per_prompt])
        most = sum(r.params.max_new_tokens for r in requests)
        why = f"a prompt of at most {prompt} tokens and max_tokens {most}"
        most_used = Usage(prompt_tokens=prompt, completion_tokens=most)
        await self._reserve(principal, request_id, model, adapter, most_used, why)

    async def reserve_call(
        self, principal: Principal, request_id: str, model: str, params: Any
    ) -> None:
        """An embedding (its inputs) or a transcription (nothing counted in or out)."""
        prompt = prompt_bound(params, 0) if isinstance(params, EmbedRequest) else 0
        why = f"inputs of at most {prompt} tokens"
        await self._reserve(principal, request_id, model, None, Usage(prompt_tokens=prompt), why)

    async def _reserve(
        self,
        principal: Principal,
        request_id: str,
        model: str,
        adapter: str | None,
        most: Usage,
        why: str,
    ) -> None:
        if not principal.budgeted:  # a budget set since authenticate applies from the next
            return
        cost = self.cost(model, adapter, most)
        await self.accounts.offload(
            self.accounts.reserve, request_id, principal.key_id, principal.user,
            principal.project, most.total_tokens, cost, self.hold_s, why,
        )  # fmt: skip

    def release(self, request_id: str) -> None:
        self.accounts.release(request_id)
