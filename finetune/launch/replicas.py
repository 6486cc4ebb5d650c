"""Data-parallel replicas in sync: every rank's trainable weights, fingerprinted and compared at the
end of a run (replica_fingerprints in metrics.json)."""

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


def replica_fingerprints(model) -> list[str] | None:
    """Every rank's fingerprint of its trainable weights, gathered (a collective: every rank calls it).

    Data-parallel replicas must end bit-identical; a difference means ranks trained apart (a sampler
    or gradient-sync bug). None in a single process, or when weights are sharded (FSDP, ZeRO-3) and
    each rank holds only a slice."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in params)
    mine = None if sharded else weights_fingerprint(params)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return None if any(g is None for g in gathered) else gathered
