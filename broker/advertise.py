"""LAN discovery of brokers: they advertise ``_atoll._tcp.local.`` over mDNS (zeroconf) with
their URL, and ``atoll agent join --discover`` browses for one."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import psutil
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE = "_atoll._tcp.local."


def _addresses(host: str) -> list[str]:
    """The IPv4 addresses a listener on ``host`` is reachable at."""
    ip = ipaddress.ip_address(socket.gethostbyname(host))
    if not ip.is_unspecified:
        return [str(ip)]
    found = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    ]
    return found or ["127.0.0.1"]


class Advertiser:
    def __init__(self, name: str, scheme: str, host: str, port: int) -> None:
        self.addresses = _addresses(host)
        self.url = f"{scheme}://{self.addresses[0]}:{port}"  # never 0.0.0.0
        loopback_only = all(ipaddress.ip_address(a).is_loopback for a in self.addresses)
        self._zc = AsyncZeroconf(
            interfaces=self.addresses if loopback_only else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        self._info = ServiceInfo(
            SERVICE,
            f"{name}.{SERVICE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=port,
            properties={"url": self.url, "broker": name},
            server=f"{name}.local.",
        )

    async def start(self) -> None:
        await self._zc.async_register_service(self._info, allow_name_change=True)

    async def stop(self) -> None:
        await self._zc.async_unregister_all_services()
        await self._zc.async_close()


async def discover(timeout: float = 3.0, interfaces: list[str] | None = None) -> list[str]:
    """Broker URLs advertised on the LAN, waiting up to ``timeout`` for the first answers."""
    zc = AsyncZeroconf(interfaces=interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
    names: list[str] = []
    found = asyncio.Event()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added:
            names.append(name)
            found.set()

    browser = AsyncServiceBrowser(zc.zeroconf, SERVICE, handlers=[on_change])
    urls: list[str] = []
    try:
        try:
            await asyncio.wait_for(found.wait(), timeout)
            await asyncio.sleep(0.2)  # let the other brokers answering the same query land too
        except TimeoutError:
            return []
        for name in names:
            info = AsyncServiceInfo(SERVICE, name)
            if await info.async_request(zc.zeroconf, 2000):
                url = info.properties.get(b"url")
                if url:
                    urls.append(url.decode())
    finally:
        await browser.async_cancel()
        await zc.async_close()
    return sorted(set(urls))
