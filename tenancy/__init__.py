"""Identity and trust: Ed25519 keys, the operator -> tenant -> agent credential chain,
enrollment tokens and revocations."""
