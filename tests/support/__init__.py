"""What the tests share, in one place (``tests/`` is on ``sys.path``: pytest's ``pythonpath``).

- ``overlay``: a test broker's agents driven by hand: ``AgentFactory``, ``eventually``,
  ``raw_session``, ``intercept``.
- ``island``: a gateway island of real agents (``Island``), storage and the fine-tuning loop.
- ``net``: loopback helpers: free ports, moto's S3 server, self-signed certificates, the CLI.
- ``broker_fakes``: a broker's sessions and frames without sockets.
- ``postgres``: a throwaway PostgreSQL cluster (initdb in a temporary directory, a unix socket),
  a fresh database per test.
- ``units``: systemd units read, checked with ``systemd-analyze`` and run under their seccomp
  sandbox (the deployment recipes in deploy/).
- ``tiny_models``, ``fake_lorax``, ``fake_openai``: tiny random models and adapters, and fake
  LoRAX and OpenAI-compatible servers on loopback.

The fixtures built on these are in ``tests/conftest.py``.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository's root (the package ``atoll``)."""
