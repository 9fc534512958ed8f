"""The broker: authenticates agents, routes direct messages and tenant-scoped pub/sub.

It holds no payload key: everything it relays between agents is sealed end to end.
"""
