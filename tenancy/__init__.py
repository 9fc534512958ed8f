"""Identity and trust, issued: Ed25519 key files, the operator's store, credentials, enrollment
tokens and revocations, and the table of what each role may do. Verifying them is the protocol
core's (``atoll.protocol.trust``); this package builds on it."""
