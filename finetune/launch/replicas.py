"""Data-parallel replicas in sync: every rank's trainable weights, fingerprinted and compared at the
end of a run (replica_fingerprints in metrics.json); sharded weights (FSDP, ZeRO-3): the share of the
parameter values each rank holds (shard_values)."""

from __future__ import annotations

from typing import Any



def weights_fingerprint(tensors) -> str:
    """A short digest of tensors' values: per tensor the float64 sum, sum of squares and a position-weighted
    sum, computed where the tensors live (no copy to the CPU of a large model)."""
    import hashlib

    import torch

    stats = []
    for t in tensors:
        x = t.detach().reshape(-1).double()
        ramp = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) / x.numel()
        stats.append(torch.stack([x.sum(), (x * x).sum(), (x * ramp).sum()]).cpu())
    blob = torch.cat(stats).numpy().tobytes() if stats else b""
    return hashlib.sha256(blob).hexdigest()[:16]


def local_values(p) -> int:
    """How many of a parameter's values this rank holds: an FSDP2 DTensor's local shard, a ZeRO-3 partition."""
    if type(p).__name__ == "DTensor":
        return p.to_local().numel()
    return int(getattr(p, "ds_tensor", p).numel())


def replica_state(model) -> dict[str, list]:
    """Gathered from every rank (a collective: every rank calls it); {} in a single process.

    Data-parallel replicas: `replica_fingerprints`, each rank's fingerprint of its trainable weights. They
    must end bit-identical; a difference means ranks trained apart (a sampler or gradient-sync bug).
    Sharded weights (FSDP, ZeRO-3): `shard_values`, how many parameter values each rank holds."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {}
    params = list(model.parameters())
    sharded = any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in params)
    mine: Any = sum(local_values(p) for p in params) if sharded else \
        weights_fingerprint([p for p in params if p.requires_grad])
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {"shard_values" if sharded else "replica_fingerprints": gathered}
