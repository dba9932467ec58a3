"""The torch.distributed pieces shared by the meta-trainers (:class:`~l2l_zoo.meta.MetaTrainer`,
:class:`~l2l_zoo.meta.mlrsnet.MLRSNetMetaTrainer`): the process group's size and rank, an in-place
mean over the processes, and a cheap check that every process holds the same numbers."""
from __future__ import annotations

import torch

__all__ = ["dist_world", "all_mean", "mean_over_processes", "all_sum", "my_share", "gather_shares", "rank0_decides",
           "check_in_sync", "SYNC_CHECK_EVERY"]

#: steps between the checks (:func:`check_in_sync`) that every process holds the same parameters
SYNC_CHECK_EVERY = 10


def dist_world() -> tuple[int, int]:
    """(world size, rank) of torch.distributed, or (1, 0) when it is not initialised."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_world_size(), d.get_rank()
    return 1, 0


def all_mean(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over the processes (one flat all-reduce per dtype and
    device, so tensors of several dtypes keep their own precision)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        i = 0
        for t in group:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()


def mean_over_processes(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of one number over the processes (float64; ``value`` itself without
    torch.distributed), e.g. a minibatch loss that every process must agree on."""
    if dist_world()[0] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    all_mean([t])
    return float(t)


def my_share(n: int) -> slice:
    """This process's contiguous share of ``n`` items (shares differ by at most one item; all of
    them without torch.distributed), for work that is split over the processes and summed
    (:func:`all_sum`), e.g. an evaluation over a whole data split."""
    world, rank = dist_world()
    return slice(rank * n // world, (rank + 1) * n // world)


def all_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """The sums over the processes of a few numbers (float64; ``values`` unchanged without
    torch.distributed). ``device``: where the all-reduce runs (CUDA under NCCL)."""
    if dist_world()[0] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def gather_shares(mine: list[float], n: int, device: torch.device | str = "cpu") -> list[float]:
    """The whole list of ``n`` numbers of which this process computed its share, ``my_share(n)``
    (``mine``, in order), on every process: each process's share is placed in a zero vector and the
    vectors summed (float64, so every value arrives exactly). ``mine`` itself without torch.distributed."""
    part = my_share(n)
    if len(mine) != part.stop - part.start:
        raise ValueError(f"this process's share of {n} values is {part.stop - part.start} values, got {len(mine)}")
    if dist_world()[0] == 1:
        return [float(v) for v in mine]
    t = torch.zeros(n, dtype=torch.float64, device=device)
    t[part] = torch.tensor([float(v) for v in mine], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def rank0_decides(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's ``flag`` on every process (what the other ranks pass is ignored; ``flag`` itself
    without torch.distributed), e.g. whether rank 0's run cache holds a run or it could lock its
    output folder. ``device``: where the broadcast runs (CUDA under NCCL)."""
    if dist_world()[0] == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def check_in_sync(tensors: list[torch.Tensor], what: str, where: str) -> None:
    """Stop with a clear error unless ``tensors`` are bit-identical on every process: three
    checksums of their values (sum, position-weighted sum, sum of squares, in float64) are
    all-gathered and compared."""
    flat = torch.cat([v.detach().reshape(-1).double() for v in tensors])
    pos = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    mine = torch.stack([flat.sum(), (flat * pos).sum(), (flat * flat).sum()])
    every = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    if not all(torch.equal(every[0], e) for e in every):
        raise RuntimeError(f"{what} differ between the {len(every)} processes at {where} (checksums "
                           f"{[e.tolist() for e in every]}); they must start from the same seed and see the "
                           "same all-reduced gradients")
