"""Sans-I/O protocol core: frames, subjects, end-to-end sealing, the trust chain's verification,
the session handshake, an agent's session and its streams' flow control.

Nothing here opens a socket or touches asyncio, and nothing imports from outside this package,
so every piece can be unit-tested and fuzzed.
"""
