"""Sans-I/O protocol core: frames, subjects, end-to-end sealing and the session handshake.

Nothing here opens a socket or touches asyncio, so every piece can be unit-tested and fuzzed.
"""
