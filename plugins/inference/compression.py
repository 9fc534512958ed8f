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

The rank is either given or chosen by an error budget: the smallest shared rank at which every
member's relative error over all its modules is within the budget (``_budget``: one fit at the
largest rank allowed, read off its truncations, then one fit at the rank found). Why a budget
rather than a rank:
greedy decoding is sensitive to the error, not to the rank, and what a shared basis cannot keep
is each member's own part, which a higher rank buys back slowly at r² bytes per member and
module (on the benchmark's family: 1.23% median error at rank 16, 1.08% at 32, 0.83% at 64, for
cores of 61 KB, 246 KB and 983 KB per member against its 1.84 MB original). The budget stops at
``max_rank``; members still above it are named (``Collection.over_budget``) and
``compress_adapters`` refuses to write such a collection.

The artefact (a directory): ``collection.safetensors`` (per module ``<module>.U`` [out, r],
``<module>.V`` [in, r] and ``<module>.cores`` [members, r, r], float32, r that module's rank)
and ``collection.json`` (the manifest: format, base model, the largest rank, the error budget if
any, modules with their shapes and ranks, members with their ids, the sha256 of their source
weights, their errors, and the sha256 of the tensors file). ``read_collection`` checks it all
before anything is loaded: a bad hash, a wrong shape or rank, a missing or unexpected tensor or
member refuses the whole collection (AdapterRejected). It reads format /1 too (one rank for
every module, as ``[in, out]``), which this code no longer writes.
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

FORMAT = "atoll-lora-collection/2"  # /2: a rank per module
READABLE = ("atoll-lora-collection/1", FORMAT)  # /1: one rank for every module (padded)
ROUNDS = 8  # alternating rounds: enough for the error to settle on the tests' and bench's sets
MAX_MEMBERS = 4096
# The error budget's default: every member within 1.25% of its ΔW (relative Frobenius error,
# over all its modules). On the embedded model, random errors of 0.35%, 0.7% and 1.4% of
# the originals' ΔW cost 0.4%, 1.4% and 4.2% of greedy tokens (32-token answers, 16 members x
# 16 held-out prompts; README, bench/adapters.py): 1.25% keeps the 95% target with a margin.
MAX_ERROR = 0.0125
MAX_RANK = 64  # the budget's search stops here: a member's own part past it is not shared

# Per module path: A [rank, in], B [out, rank] (scaling folded into B), as pool.LoraWeights.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Collection:
    """Shared bases and per-member cores; ``cores[m]`` is [members, r_m, r_m] in member
    order, ``r_m = ranks[m]``."""

    ranks: dict[str, int]  # per module: its shared rank
    members: list[str]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module: (U [out, r], V [in, r])
    cores: dict[str, torch.Tensor]
    errors: list[float]  # per member: relative Frobenius error over all its modules
    max_error: float | None = None  # the budget the ranks were chosen for, if any

    @property
    def rank(self) -> int:
        """The largest module rank."""
        return max(self.ranks.values())

    def over_budget(self) -> list[str]:
        """The members whose error is above the budget (none without a budget)."""
        if self.max_error is None:
            return []
        return [m for m, e in zip(self.members, self.errors, strict=True) if e > self.max_error]


Fit = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # U, V, cores, lost


def compress(
    members: dict[str, Factors],
    rank: int | None = None,
    *,
    max_error: float | None = None,
    max_rank: int = MAX_RANK,
    rounds: int = ROUNDS,
) -> Collection:
    """Jointly factorise ``members`` (id: factors; one module set for all), either at shared
    rank ``rank`` or, with ``max_error``, at the smallest shared rank (up to ``max_rank``) that
    keeps every member's relative error over all its modules within ``max_error``
    (``_budget``). Each module's rank is clamped to what its shapes and its members' ranks
    allow (a module of 6 rank-4 members is exact at 24). A budget out of reach at
    ``max_rank`` leaves its fit; ``Collection.over_budget`` names the members above it."""
    if (rank is None) == (max_error is None):
        raise ValueError("give a rank or an error budget (max_error), not both or neither")
    if (rank is not None and rank < 1) or (max_error is not None and not 0 < max_error < 1):
        raise ValueError("a rank is 1 or more, an error budget between 0 and 1")
    if not 2 <= len(members) <= MAX_MEMBERS:
        raise ValueError(f"a collection has 2 to {MAX_MEMBERS} members, not {len(members)}")
    ids = list(members)
    modules = sorted(members[ids[0]])
    for mid in ids[1:]:
        if sorted(members[mid]) != modules:
            raise ValueError(f"{mid!r} targets other modules than {ids[0]!r}: one module set")
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    norms: dict[str, torch.Tensor] = {}  # per module: each member's ‖ΔW_i‖²
    caps: dict[str, int] = {}
    for module in modules:
        pairs[module] = [(a.double(), b.double()) for a, b in (members[i][module] for i in ids)]
        d_out, d_in = pairs[module][0][1].shape[0], pairs[module][0][0].shape[1]
        if any(a.shape[1] != d_in or b.shape[0] != d_out for a, b in pairs[module]):
            raise ValueError(f"{module}: members disagree on its shape")
        caps[module] = min(d_in, d_out, sum(a.shape[0] for a, _ in pairs[module]))
        norms[module] = torch.stack([((b.T @ b) * (a @ a.T)).sum() for a, b in pairs[module]])
    if rank is not None:
        fits = {m: _fit(pairs[m], norms[m], min(rank, caps[m]), rounds) for m in modules}
    else:
        assert max_error is not None
        fits = _budget(pairs, norms, caps, max_error, max_rank, rounds)
    total = torch.stack(list(norms.values())).sum(0)
    lost = torch.stack([fits[m][3] for m in modules]).sum(0)
    return Collection(
        ranks={m: fits[m][0].shape[1] for m in modules},
        members=ids,
        bases={m: (fits[m][0].float(), fits[m][1].float()) for m in modules},
        cores={m: fits[m][2].float() for m in modules},
        errors=(lost / total.clamp(min=1e-30)).sqrt().tolist(),
        max_error=max_error,
    )


def _fit(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], norms: torch.Tensor, r: int, rounds: int
) -> Fit:
    """Shared bases of rank ``r`` for one module, the members' cores and what each loses
    (``‖ΔW_i‖² - ‖Σ_i‖²``: ΔW_i projected onto span(U) x span(V) keeps ``‖Σ_i‖²``)."""
    u, v = _joint_bases(pairs, r, rounds)
    core = torch.stack([(u.T @ b) @ (a @ v) for a, b in pairs])  # Σ_i = Uᵀ B_i A_i V
    return u, v, core, (norms - core.pow(2).sum((1, 2))).clamp(min=0)


def _budget(
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    norms: dict[str, torch.Tensor],
    caps: dict[str, int],
    max_error: float,
    max_rank: int,
    rounds: int,
) -> dict[str, Fit]:
    """Per module, the fit at the smallest shared rank ``k`` within which every member loses
    at most ``max_error²`` of its squared norm over all modules. One fit per module at
    ``max_rank`` first; its bases' leading ``k`` columns (ordered by what they keep) are a fit
    at ``k`` with an exact error (the cores' leading [k, k] blocks, U and V being
    orthonormal), so the smallest ``k`` within the budget is read off them without refitting.
    Then a fresh fit at ``k``, kept if every member is within the budget with it too (it
    usually loses less than the truncation), else the truncation. Two fits per module,
    whatever the rank."""
    modules = list(pairs)
    full = {m: _fit(pairs[m], norms[m], min(max_rank, caps[m]), rounds) for m in modules}
    limit = max_error**2 * torch.stack(list(norms.values())).sum(0)

    def truncated(m: str, k: int) -> Fit:
        u, v, core, _ = full[m]
        k = min(k, u.shape[1])
        kept = core[:, :k, :k]
        return u[:, :k], v[:, :k], kept, (norms[m] - kept.pow(2).sum((1, 2))).clamp(min=0)

    def within(fits: dict[str, Fit]) -> bool:
        return bool((torch.stack([f[3] for f in fits.values()]).sum(0) <= limit).all())

    def cut(k: int) -> dict[str, Fit]:
        return {m: truncated(m, k) for m in modules}

    top = max(min(max_rank, c) for c in caps.values())
    k = next((k for k in range(1, top + 1) if within(cut(k))), top)
    cuts = cut(k)
    if k == top:  # within only at the largest rank, or out of reach: its full fit
        return cuts
    fresh = {m: _fit(pairs[m], norms[m], min(k, caps[m]), rounds) for m in modules}
    return fresh if within(fresh) else cuts


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
        "max_error": collection.max_error,
        "modules": {
            m: [v.shape[0], u.shape[0], u.shape[1]] for m, (u, v) in collection.bases.items()
        },
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
    rank: int  # the largest module rank
    members: list[str]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    cores: dict[str, torch.Tensor]
    manifest: dict[str, Any]


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"collection {path.name!r}: no readable {MANIFEST} ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE:
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
        modules = _modules(manifest, rank)
        members = [str(m["id"]) for m in manifest["members"]]
        digest = str(manifest["sha256"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise refuse(f"{MANIFEST} lacks {exc}") from None
    if not modules:
        raise refuse("it has no modules")
    for module, (_, _, r) in modules.items():
        if not 1 <= r <= max_rank:
            raise refuse(f"{module} has rank {r}, outside this node's 1..{max_rank}")
    if rank != max(r for _, _, r in modules.values()):
        raise refuse(f"rank {rank} is not its modules' largest")
    if len(set(members)) != len(members) or not 2 <= len(members) <= MAX_MEMBERS:
        raise refuse("its members must be 2 or more distinct adapters")
    if not (path / TENSORS).is_file() or sha256(path / TENSORS) != digest:
        raise refuse(f"{TENSORS} does not match its manifest's sha256")
    for module, (d_in, d_out, _) in modules.items():
        if shapes.get(module) != (d_in, d_out):
            raise refuse(f"{module} {[d_in, d_out]} does not fit this base model")
    n = len(members)
    expected: dict[str, tuple[int, ...]] = {}
    for module, (d_in, d_out, r) in modules.items():
        expected |= {
            f"{module}.U": (d_out, r),
            f"{module}.V": (d_in, r),
            f"{module}.cores": (n, r, r),
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


def _modules(manifest: dict[str, Any], rank: int) -> dict[str, tuple[int, int, int]]:
    """Per module (in, out, rank): /2 says each module's rank, /1 gives (in, out) and one rank
    for all. ValueError when an entry is not as its format says."""
    width = 2 if manifest["format"] == READABLE[0] else 3
    modules = {}
    for module, shape in manifest["modules"].items():
        if not isinstance(shape, list) or len(shape) != width:
            raise ValueError(f"{module}: {shape} is not {width} numbers")
        modules[str(module)] = (
            int(shape[0]),
            int(shape[1]),
            int(shape[-1]) if width == 3 else rank,
        )
    return modules


def module_ranks(manifest: dict[str, Any]) -> list[int]:
    """Each module's rank, as a checked manifest of either format gives them."""
    return [r for _, _, r in _modules(manifest, int(manifest["rank"])).values()]


def member_bytes(total: int, ranks: list[int], members: int) -> int:
    """A member's share of a collection of ``total`` bytes whose modules have ``ranks``: its
    own cores (float32) plus the bases divided among all members."""
    own = 4 * sum(r * r for r in ranks)
    return own + math.ceil((total - members * own) / members)


def compress_adapters(
    adapters: dict[str, Path],
    base_model: str,
    name: str,
    out: Path,
    rank: int | None = None,
    max_error: float | None = None,
    max_rank: int = MAX_RANK,
) -> dict[str, Any]:
    """Compress the PEFT adapter directories ``adapters`` (id: directory), all trained for
    ``base_model`` (a name or a directory of it), into the artefact ``out`` at ``rank`` or
    within the error budget ``max_error`` (``compress``); returns its manifest, whose base
    model is the one the members' configs name. ValueError, and no artefact, when members stay
    above the budget even at ``max_rank``."""
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
    made = compress(factors, rank, max_error=max_error, max_rank=max_rank)
    if over := made.over_budget():
        worst = max(made.errors)
        raise ValueError(
            f"{len(over)} member(s), {over[0]!r} first, stay above the error budget "
            f"{max_error} even at rank {max_rank} (largest error {worst:.4f}): they share too "
            "little for it; allow a larger rank, a larger budget, or give a rank"
        )
    return write_collection(out, name, base, made, sources)


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """The share of greedy tokens equal position by position (the report's agreement): a
    divergence costs every token after it that differs too."""
    pairs = list(zip(ours, theirs, strict=True))
    same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=False))
    total = sum(max(len(x), len(y)) for x, y in pairs)
    return same / total if total else 1.0
