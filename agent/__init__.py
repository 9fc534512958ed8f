"""The agent: identity, broker connection with failover, RPC, pub/sub and the plugin host."""
