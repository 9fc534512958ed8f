"""Compressed LoRA collections: many adapters of one base model and module set as one shared
basis per module and a small core per adapter (Gabrielsson et al., 2024, "Compress then Serve";
the JD-Full objective).

For each target module the members' updates ``ΔW_i = B_i A_i`` (scaling folded into B, as the
pool folds it) are approximated as ``U Σ_i Vᵀ`` with ``U`` [out, r] and ``V`` [in, r] shared and
orthonormal, ``Σ_i`` [r, r] full, minimising ``Σ_i ‖ΔW_i - U Σ_i Vᵀ‖²_F``. Method: alternating
maximisation (the paper's JD-Full). For fixed V the best U spans the top r left singular vectors
of ``[ΔW_1 V, …, ΔW_n V]``, for fixed U the best V those of ``[ΔW_1ᵀ U, …, ΔW_nᵀ U]``, and then
``Σ_i = Uᵀ ΔW_i V``. Each basis comes from a thin [d, n·r] matrix built from the low-rank
factors (``ΔW_i V = B_i (A_i V)``), so no ``ΔW_i`` is ever formed. It starts from the one-shot SVD
of all members' column and row spaces and runs a fixed number of rounds, in float64 on the CPU:
the same inputs give the same bytes (no random start, unlike a randomised SVD), and each round
cannot increase the error. ALS rather than one SVD of the stacked As and Bs because a shared U
and V fitted jointly keep more of each ΔW_i at the same r.

Since ``U Σ_i Vᵀ`` is ΔW_i projected onto span(U) x span(V), the error is
``‖ΔW_i‖² - ‖Σ_i‖²``; ``‖ΔW_i‖² = tr((BᵀB)(AAᵀ))``. A member's relative error is over all
its modules together.

The artefact (a directory): ``collection.safetensors`` (per module ``<module>.U``, ``<module>.V``
and ``<module>.cores`` [members, r, r], float32) and ``collection.json`` (the manifest: base
model, rank, modules with their shapes, members with their ids, the sha256 of their source
weights, their errors, and the sha256 of the tensors file). ``read_collection`` checks it all
before anything is loaded: a bad hash, a wrong shape, a missing or unexpected tensor or member
refuses the whole collection (AdapterRejected).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atoll.plugins.inference.contract import AdapterRejected
from atoll.plugins.storage.contract.adapters import COLLECTION_MANIFEST as MANIFEST
from atoll.plugins.storage.contract.adapters import COLLECTION_TENSORS as TENSORS

FORMAT = "atoll-lora-collection/1"
ROUNDS = 8  # alternating rounds: enough for the error to settle on the tests' and bench's sets
MAX_MEMBERS = 4096

# Per module path: A [rank, in], B [out, rank] (scaling folded into B), as pool.LoraWeights.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Collection:
    """Shared bases and per-member cores; ``cores[m]`` is [members, r, r] in member order."""

    rank: int
    members: list[str]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module: (U [out, r], V [in, r])
    cores: dict[str, torch.Tensor]
    errors: list[float]  # per member: relative Frobenius error over all its modules


def compress(members: dict[str, Factors], rank: int, rounds: int = ROUNDS) -> Collection:
    """Jointly factorise ``members`` (id: factors; one module set for all) at shared rank
    ``rank`` (clamped to what each module's shapes allow)."""
    if not 2 <= len(members) <= MAX_MEMBERS:
        raise ValueError(f"a collection has 2 to {MAX_MEMBERS} members, not {len(members)}")
    ids = list(members)
    modules = sorted(members[ids[0]])
    for mid in ids[1:]:
        if sorted(members[mid]) != modules:
            raise ValueError(f"{mid!r} targets other modules than {ids[0]!r}: one module set")
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    cores: dict[str, torch.Tensor] = {}
    total = torch.zeros(len(ids), dtype=torch.float64)
    lost = torch.zeros(len(ids), dtype=torch.float64)
    for module in modules:
        pairs = [(a.double(), b.double()) for a, b in (members[i][module] for i in ids)]
        d_out, d_in = pairs[0][1].shape[0], pairs[0][0].shape[1]
        if any(a.shape[1] != d_in or b.shape[0] != d_out for a, b in pairs):
            raise ValueError(f"{module}: members disagree on its shape")
        r = min(rank, d_in, d_out, sum(a.shape[0] for a, _ in pairs))
        u, v = _joint_bases(pairs, r, rounds)
        core = torch.stack([(u.T @ b) @ (a @ v) for a, b in pairs])  # Σ_i = Uᵀ B_i A_i V
        norms = torch.stack([((b.T @ b) * (a @ a.T)).sum() for a, b in pairs])
        total += norms
        lost += (norms - core.pow(2).sum((1, 2))).clamp(min=0)
        if r < rank:  # pad: one rank for every module keeps the serving path uniform
            u, v = _pad(u, rank), _pad(v, rank)
            core = torch.nn.functional.pad(core, (0, rank - r, 0, rank - r))
        bases[module] = (u.float(), v.float())
        cores[module] = core.float()
    errors = (lost / total.clamp(min=1e-30)).sqrt().tolist()
    return Collection(rank=rank, members=ids, bases=bases, cores=cores, errors=errors)


def _joint_bases(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], r: int, rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    def top(m: torch.Tensor) -> torch.Tensor:
        """The top ``r`` left singular vectors of ``m`` [d, k]: for a wide one, the top
        eigenvectors of its [d, d] Gram (a quarter of the SVD's time at d=576, k=1024)."""
        if m.shape[0] > m.shape[1]:
            return torch.linalg.svd(m, full_matrices=False)[0][:, :r]
        return torch.linalg.eigh(m @ m.T)[1][:, -r:].flip(1)  # eigh: ascending order

    # Start: the members' column spaces (Bs weighted by their As) and row spaces, all together.
    u = top(torch.cat([b @ torch.linalg.qr(a.T)[1].T for a, b in pairs], dim=1))
    v = top(torch.cat([a.T @ torch.linalg.qr(b)[1].T for a, b in pairs], dim=1))
    for _ in range(rounds):
        u = top(torch.cat([b @ (a @ v) for a, b in pairs], dim=1))
        v = top(torch.cat([a.T @ (b.T @ u) for a, b in pairs], dim=1))
    return u, v


def _pad(m: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.nn.functional.pad(m, (0, rank - m.shape[1]))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_collection(
    out: Path, name: str, base_model: str, collection: Collection, sources: dict[str, str]
) -> dict[str, Any]:
    """Write the artefact into directory ``out``; ``sources``: member id -> sha256 of its
    source weights. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, (u, v) in collection.bases.items():
        tensors[f"{module}.U"] = u.contiguous()
        tensors[f"{module}.V"] = v.contiguous()
        tensors[f"{module}.cores"] = collection.cores[module].contiguous()
    save_file(tensors, str(out / TENSORS), metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "name": name,
        "base_model": base_model,
        "rank": collection.rank,
        "modules": {m: [v.shape[0], u.shape[0]] for m, (u, v) in collection.bases.items()},
        "members": [
            {"id": mid, "sha256": sources[mid], "error": round(err, 6)}
            for mid, err in zip(collection.members, collection.errors, strict=True)
        ],
        "sha256": sha256(out / TENSORS),
        "bytes": (out / TENSORS).stat().st_size,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class CollectionWeights:
    """A checked artefact, ready for a node: what ``read_collection`` returns."""

    name: str
    base_model: str
    rank: int
    members: list[str]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    cores: dict[str, torch.Tensor]
    manifest: dict[str, Any]


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"collection {path.name!r}: no readable {MANIFEST} ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterRejected(f"collection {path.name!r}: {MANIFEST} is not {FORMAT}")
    return manifest


def read_collection(
    path: Path, shapes: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype
) -> CollectionWeights:
    """The artefact at ``path``, checked whole against this base model's ``shapes`` (module:
    (in, out)) before any of it is used; AdapterRejected says what is wrong."""
    manifest = read_manifest(path)
    name = str(manifest.get("name") or path.name)

    def refuse(why: str) -> AdapterRejected:
        return AdapterRejected(f"collection {name!r} refused: {why}")

    try:
        rank = int(manifest["rank"])
        modules = {str(m): (int(s[0]), int(s[1])) for m, s in manifest["modules"].items()}
        members = [str(m["id"]) for m in manifest["members"]]
        digest = str(manifest["sha256"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise refuse(f"{MANIFEST} lacks {exc}") from None
    if not 1 <= rank <= max_rank:
        raise refuse(f"rank {rank} is outside this node's 1..{max_rank}")
    if len(set(members)) != len(members) or not 2 <= len(members) <= MAX_MEMBERS:
        raise refuse("its members must be 2 or more distinct adapters")
    if not (path / TENSORS).is_file() or sha256(path / TENSORS) != digest:
        raise refuse(f"{TENSORS} does not match its manifest's sha256")
    for module, shape in modules.items():
        if shapes.get(module) != shape:
            raise refuse(f"{module} {list(shape)} does not fit this base model")
    n = len(members)
    expected: dict[str, tuple[int, ...]] = {}
    for module, (d_in, d_out) in modules.items():
        expected |= {
            f"{module}.U": (d_out, rank),
            f"{module}.V": (d_in, rank),
            f"{module}.cores": (n, rank, rank),
        }
    try:
        with safe_open(str(path / TENSORS), framework="pt") as fh:
            keys = set(fh.keys())
            if keys != set(expected):
                odd = sorted(keys ^ set(expected))[0]
                raise refuse(f"{TENSORS}: tensor {odd!r} missing or unexpected")
            tensors = {k: fh.get_tensor(k) for k in expected}
    except AdapterRejected:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise refuse(f"{TENSORS} is damaged ({exc})") from None
    for key, want in expected.items():
        t = tensors[key]
        if tuple(t.shape) != want or not t.is_floating_point() or not torch.isfinite(t).all():
            raise refuse(f"{key} has shape {list(t.shape)}, not {list(want)}, or is not finite")
    return CollectionWeights(
        name=name,
        base_model=str(manifest.get("base_model", "")),
        rank=rank,
        members=members,
        bases={m: (tensors[f"{m}.U"].to(dtype), tensors[f"{m}.V"].to(dtype)) for m in modules},
        cores={m: tensors[f"{m}.cores"].to(dtype) for m in modules},
        manifest=manifest,
    )


def member_bytes(total: int, rank: int, modules: int, members: int) -> int:
    """A member's share of a collection of ``total`` bytes: its own cores plus the bases
    divided among all members."""
    own = 4 * modules * rank * rank
    return own + math.ceil((total - members * own) / members)


def compress_adapters(
    adapters: dict[str, Path], base_model: str, name: str, out: Path, rank: int
) -> dict[str, Any]:
    """Compress the PEFT adapter directories ``adapters`` (id: directory), all trained for
    ``base_model`` (a name or a directory of it), into the artefact ``out``; returns its
    manifest, whose base model is the one the members' configs name."""
    from atoll.plugins.inference.adapter_checks import CONFIG, WEIGHTS, same_model
    from atoll.plugins.inference.pool import read_adapter

    bases = {
        str(json.loads((path / CONFIG).read_text()).get("base_model_name_or_path") or base_model)
        for path in adapters.values()
    }
    if len(bases) != 1:
        raise ValueError(f"the members are for several base models: {sorted(bases)}")
    base = bases.pop()
    if not same_model(base, base_model):
        raise ValueError(f"the members are for {base!r}, not {base_model!r}")
    factors = {mid: read_adapter(path, torch.float64) for mid, path in adapters.items()}
    sources = {mid: sha256(path / WEIGHTS) for mid, path in adapters.items()}
    return write_collection(out, name, base, compress(factors, rank), sources)


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """The share of greedy tokens equal position by position (the report's agreement): a
    divergence costs every token after it that differs too."""
    pairs = list(zip(ours, theirs, strict=True))
    same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=False))
    total = sum(max(len(x), len(y)) for x, y in pairs)
    return same / total if total else 1.0
