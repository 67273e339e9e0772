"""Editing across devices and nodes with Lightning's DDP launchers (README, "Multi-GPU and multi-node").

Every rank holds the whole frozen model and reads the whole edit stream, so every rank sees the
same global batch of ``batch_size`` requests at every step. Each rank runs the inner optimisations
(v*, MetaKE's meta-loss) for its contiguous *shard* of that batch; the results are gathered with
fixed shapes plus a validity mask, put back in the global order, and every rank then applies the
identical closed-form update. Nothing is padded by repeating a request, so no edit is applied twice
or lost whatever the number of requests, ranks and batch size.

``DDPNoWrapStrategy`` (``strategy: ddp_nowrap``) keeps Lightning's launchers (``devices``,
``num_nodes``, torchrun, SLURM), process group and collectives, but does not wrap the module in
``DistributedDataParallel``: torch refuses a module with no trainable parameter, and an edit step
has no gradient to all-reduce. The module state is broadcast from rank 0 once instead.

The helpers below are no-ops on one process, so the single-device path runs the same code.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lit_edit.targets import TargetResult


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def shard(n: int, world: int | None = None, r: int | None = None) -> range:
    """Positions of the global batch of ``n`` requests handled by rank ``r``: contiguous blocks of
    ⌈n / world⌉, so concatenating the ranks' shards gives back the global order."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    size = math.ceil(n / world)
    return range(min(r * size, n), min((r + 1) * size, n))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks (a new tensor; ``x`` itself on one process)."""
    if not is_distributed():
        return x
    x = x.detach().clone().contiguous()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_rows(x: torch.Tensor, capacity: int) -> torch.Tensor:
    """Concatenate every rank's rows ``x`` ([m_r, ...], m_r ≤ capacity) in rank order.

    Collectives need equal shapes on all ranks: each rank pads to ``capacity`` rows and sends a
    validity mask with them; padding is dropped after the gather. Every rank must call this, even
    one with no rows.
    """
    if not is_distributed():
        return x
    m = x.shape[0]
    if m > capacity:
        raise ValueError(f"{m} rows do not fit the gather capacity {capacity}")
    padded = torch.zeros((capacity, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:m] = x
    valid = torch.zeros(capacity, dtype=torch.bool, device=x.device)
    valid[:m] = True
    world = dist.get_world_size()
    rows = [torch.empty_like(padded) for _ in range(world)]
    masks = [torch.empty_like(valid) for _ in range(world)]
    dist.all_gather(rows, padded.contiguous())
    dist.all_gather(masks, valid)
    return torch.cat(rows)[torch.cat(masks)]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's (picklable) ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def checksum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A cheap fingerprint of some tensors (float64 sum and sum of squares of each): equal on all ranks
    exactly when the ranks applied identical updates (bitwise-identical weights give identical sums)."""
    return torch.stack([torch.stack([t.double().sum(), t.double().pow(2).sum()]) for t in tensors]).flatten()


def assert_in_sync(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Raise if any rank's :func:`checksum` differs from rank 0's."""
    if not is_distributed():
        return
    mine = checksum(tensors)
    all_ = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(all_, mine)
    bad = [r for r, c in enumerate(all_) if not torch.equal(c, all_[0])]
    if bad:
        raise RuntimeError(f"{what} differ between rank 0 and rank(s) {bad} (checksums {[c.tolist() for c in all_]}): "
                           "the ranks no longer apply identical updates")


class DDPNoWrapStrategy(DDPStrategy):
    """DDP for a frozen model: Lightning's launcher, process group and collectives, no DDP wrapper.

    ``configure_ddp`` only broadcasts rank 0's module state (weights and buffers), so every rank starts
    from identical weights; the editing step keeps them identical (gathered targets, same update).
    """

    strategy_name = "ddp_nowrap"

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DDP without the DistributedDataParallel "
                                   "wrapper, for a frozen model (lit_edit)", start_method="popen", override=True)


DDPNoWrapStrategy.register_strategies(StrategyRegistry)


def check_strategy(trainer) -> None:
    """Multi-process runs need ``ddp_nowrap``: plain ``ddp`` would wrap the frozen model and fail in torch."""
    strategy = trainer.strategy
    if trainer.world_size <= 1 or isinstance(strategy, DDPNoWrapStrategy):
        return
    name = type(strategy).__name__
    hint = (" DDPStrategy wraps the model in DistributedDataParallel, which torch refuses for a frozen model "
            "(no parameter requires a gradient)." if isinstance(strategy, DDPStrategy) else "")
    raise ValueError(f"lit_edit runs on {trainer.world_size} processes only with strategy 'ddp_nowrap', got {name}.{hint} "
                     "Set `trainer.strategy: ddp_nowrap` (or --trainer.strategy ddp_nowrap); it keeps Lightning's "
                     "launchers (devices, num_nodes, torchrun, SLURM).")


def gather_targets(local: TargetResult | None, capacity: int, d: int, dtype: torch.dtype, device) -> TargetResult:
    """Every rank's targets (its shard's rows, ≤ ``capacity``; None when its shard has no write), concatenated
    in rank order = the global order of the batch's writes. One process: ``local`` itself."""
    if not is_distributed():
        return local
    if local is None:
        z, zl = torch.zeros(0, d, device=device, dtype=dtype), torch.zeros(0, device=device, dtype=dtype)
        local = TargetResult(z, z, z, zl, zl, torch.zeros(0, dtype=torch.long), [])
    rows = lambda x: gather_rows(x.to(device), capacity)  # noqa: E731
    return TargetResult(rows(local.v_star), rows(local.h_init), rows(local.delta), rows(local.loss), rows(local.nll),
                        rows(local.steps).cpu(), local.history)


def own_writes(batch: list, columns) -> tuple[list[int], int]:
    """This rank's writes of ``batch`` (indices among the writes: its :func:`shard`, whose targets it optimises)
    and the gather width (the most target rows any rank's shard has, ``columns.rows`` per write). One process:
    every write."""
    write_pos = [i for i, r in enumerate(batch) if r.writes]
    n_rows = [len(rows) for rows in columns.rows]
    shards = [shard(len(batch), r=r) for r in range(world_size())]
    own = [j for j, i in enumerate(write_pos) if i in shards[rank()]]
    capacity = max(sum(n for n, i in zip(n_rows, write_pos) if i in sh) for sh in shards)
    return own, capacity
