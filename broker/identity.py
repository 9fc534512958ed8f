"""A broker's own key and operator-signed credential, kept in ``D/broker/``."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from atoll.protocol.trust import verify_broker
from atoll.tenancy.keys import generate, load_key, save_key
from atoll.tenancy.operator import OperatorStore


@dataclass
class BrokerKeys:
    key: SigningKey
    credential: bytes
    operator_pub: bytes
    name: str


def issue_broker_dir(operator: OperatorStore, out: Path, name: str) -> Path:
    """On the operator's host: a data dir a broker on another host can start from."""
    out = Path(out)
    bdir = out / "broker"
    bdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate()
    save_key(bdir / "broker.key", key)
    (bdir / "broker.cred").write_bytes(operator.broker_credential(name, key.verify_key.encode()))
    (out / "operator.pub").write_bytes(operator.operator_pub)
    return out


def load_broker_keys(data_dir: Path, name: str | None = None) -> BrokerKeys:
    """Load the broker identity; on an operator's data dir, create it on first use."""
    data_dir = Path(data_dir)
    bdir = data_dir / "broker"
    op = OperatorStore(data_dir)
    if not (bdir / "broker.cred").exists():
        if not op.initialised:
            raise FileNotFoundError(
                f"{data_dir} holds neither a broker credential nor an operator key: run "
                "`atoll init` here, or `atoll broker issue --out DIR` on the operator's host"
            )
        issue_broker_dir(op, data_dir, name or socket.gethostname().split(".")[0].lower())
    operator_pub = (data_dir / "operator.pub").read_bytes()
    credential = (bdir / "broker.cred").read_bytes()
    ident = verify_broker(credential, operator_pub)
    return BrokerKeys(load_key(bdir / "broker.key"), credential, operator_pub, ident.name)
