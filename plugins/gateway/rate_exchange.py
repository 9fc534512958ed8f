"""The task that makes rate limits hold across gateways sharing a PostgreSQL database (how:
accounts/rate_shares.py): about once a second, this gateway's use goes in and the others' comes
back into its limiter."""

from __future__ import annotations

import asyncio

from atoll.logs import EventLogger
from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.limits import RateLimiter

EXCHANGE_S = 1.0
STALE_S = 5.0  # a gateway not heard from for this long (stopped, cut off) counts for nothing


async def exchange_rates(
    accounts: Accounts,
    limiter: RateLimiter,
    gateway: str,
    log: EventLogger,
    every: float = EXCHANGE_S,
) -> None:
    failing = False
    while True:
        try:
            others = await accounts.offload(
                accounts.share_rates, gateway, limiter.shares(), STALE_S
            )
        except Exception as exc:  # the database away: the others' last known use stays
            if not failing:  # said once per outage, not every second
                log.warning("gateway.rate_exchange_failed", error=exc)
            failing = True
        else:
            limiter.set_others(others)
            if failing:
                log.info("gateway.rate_exchange_resumed")
            failing = False
        await asyncio.sleep(every)
