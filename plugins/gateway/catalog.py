"""The models the gateway knows, from discovery: served chat bases, embedding and transcription
models, what trainers may fine-tune, and the list a caller sees (with the adapters it may use).

A model is known while some agent serving it is ACTIVE or only STALE (silent a few beats: a
broker restarting, a link failing over); it is unknown once every such agent is LOST. Nodes of
another tenant that a grant lets this one use (``agent@tenant``, ``atoll.agent.imports``) are
known the same way, from what they say of themselves when asked (``describe_node``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atoll.agent.discovery import Discovery, Status
from atoll.agent.node import Overlay
from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.bodies import ModelKind
from atoll.plugins.inference.contract import INFO, described


async def describe_node(overlay: Overlay, address: str) -> dict[str, Any]:
    """An inference node's description, asked of it (an imported node: its announcement is
    sealed for its own tenant)."""
    return described(INFO.check_reply(await overlay.call(address, INFO.name, {})))


@dataclass(frozen=True)
class ModelCard:
    """One model a caller may name: its kind (``chat``, ``adapter``, ``embedding``,
    ``transcription``) and, for an adapter, the base it applies to."""

    id: str
    kind: ModelKind
    created: int
    owned_by: str
    base: str | None = None


class Catalog:
    def __init__(self, discovery: Discovery, accounts: Accounts, created: int) -> None:
        self.discovery = discovery
        self.accounts = accounts
        self.created = created  # what served models show as ``created`` (the gateway's start)

    def base_models(self) -> dict[str, list[str]]:
        """Base model id -> agents serving it now."""
        return self._offered("base_model")

    def embedding_models(self) -> dict[str, list[str]]:
        return self._offered("embeddings")

    def transcription_models(self) -> dict[str, list[str]]:
        return self._offered("transcription")

    def trainable_models(self) -> set[str]:
        """Base models a job may name: those served now and those a trainer is configured
        with; never a path."""
        out = set(self.base_models())
        for entry in self.discovery.select(plugin="training"):
            models = (entry.capabilities.get("training") or {}).get("models")
            if isinstance(models, list):
                out.update(m for m in models if isinstance(m, str))
        return out

    def models(self, principal: Principal) -> list[ModelCard]:
        """Every model ``principal`` may use, once each: served bases (chat), their visible
        adapters and named mixtures, embedding and transcription models (a base that also
        embeds is listed as chat)."""
        cards = [ModelCard(m, "chat", self.created, "atoll") for m in sorted(self.base_models())]
        for a in self.accounts.visible_adapters(principal):
            owner = a.project or a.owner or "public"
            cards.append(ModelCard(a.id, "adapter", int(a.created), owner, a.base_model))
        for m in self.accounts.visible_mixtures(principal):
            owner = m.project or m.owner
            cards.append(ModelCard(m.id, "mixture", int(m.created), owner, m.base_model))
        offered: list[tuple[ModelKind, dict[str, list[str]]]] = [
            ("embedding", self.embedding_models()),
            ("transcription", self.transcription_models()),
        ]
        listed = {c.id for c in cards}
        for kind, served in offered:
            new = sorted(served.keys() - listed)
            cards += [ModelCard(m, kind, self.created, "atoll") for m in new]
            listed |= served.keys()
        return cards

    def _offered(self, capability: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for entry in self.discovery.select(plugin="inference", status=None):
            if entry.status is Status.LOST:
                continue
            model = (entry.capabilities.get("inference") or {}).get(capability)
            if isinstance(model, str) and model:
                out.setdefault(model, []).append(entry.name)
        return out
