"""Everything distributed in one place: process-group setup from torchrun or
SLURM variables, rank helpers, and a gradient-preserving all-gather."""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ and os.environ[name] != "":
            return int(os.environ[name])
    return None


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    # "node[01-04,07]" or "nodeA,nodeB": the first host name is enough.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("-")[0].split(",")[0].rstrip("]")
        return prefix + first
    return head


class DeviceError(RuntimeError):
    """The requested device does not exist here."""


def choose_device(requested: str | None, local_rank: int) -> torch.device:
    """``cpu``/``cuda`` when requested, else CUDA when present."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested not in (None, "auto", "cuda"):
        raise DeviceError(f"--device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise DeviceError("--device cuda: CUDA is not available here (no GPU, or a CPU-only torch); "
                          "use --device cpu or auto")
    return torch.device("cpu")


def init_distributed(requested_device: str | None = None, timeout_s: int = 1800) -> DistContext:
    """Join the process group described by torchrun (RANK/WORLD_SIZE/LOCAL_RANK)
    or SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) variables, or run alone.

    NCCL on CUDA, gloo on CPU. Raises when the group cannot be formed, rather
    than silently training on one process.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: end with the agent
        die_with_parent()
    rank = _env_int("RANK", "SLURM_PROCID")
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if rank is None or world_size is None or world_size == 1:
        device = choose_device(requested_device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(0, 1, 0, device)
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    os.environ.setdefault("MASTER_PORT", "29500")
    device = choose_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(
            backend=backend,
            store=_elastic_store(rank, world_size, timeout),
            init_method=None if "TORCHELASTIC_RESTART_COUNT" in os.environ else "env://",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except Exception as exc:  # name what failed, then re-raise
        raise RuntimeError(
            f"could not join the process group (rank {rank} of {world_size}, backend {backend}, "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}"
        ) from exc
    return DistContext(rank, world_size, local_rank, device)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    torchrun starts each worker in a session of its own, so a worker outlives a killed agent
    (a preempted job step, ``kill -9`` of the launcher) and goes on training, holding the run
    directory and the GPU, while a restarted run starts beside it. Tied to the agent, the
    workers end with it. A no-op where ``prctl`` is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the call
        os.kill(os.getpid(), signal.SIGKILL)


def _elastic_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the rendezvous store with keys of this restart attempt only (None otherwise).

    torchrun's agent keeps one store across the restarts of a group (``static`` and ``c10d``
    rendezvous alike, torch 2.14), and ``env://`` no longer prefixes the keys per attempt. A
    restarted worker could then read the gloo/NCCL addresses that the killed group published,
    and fail with "Connection refused" or wait on a peer that is gone, depending on which
    worker publishes first. Prefixing the keys with ``TORCHELASTIC_RESTART_COUNT`` gives each
    attempt its own keys.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    return dist.PrefixStore(f"suncet/attempt_{attempt}", store)


def shutdown_distributed() -> None:
    """Leave the process group and end its threads before the interpreter shuts down.

    ``destroy_process_group`` drops only torch's own references. DDP's hooks keep the
    finished model, and with it the group, in reference cycles, so gloo's worker and I/O
    threads lived on into interpreter shutdown, where tearing them down now and then
    aborted a worker that had finished its run ("terminate called without an active
    exception", SIGABRT, and torchrun reporting the job failed). Collecting the cycles here
    destroys the group, joining its threads, while the interpreter is still whole."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def sync_bn_process_group(group_size: int):
    """The process group this rank's SyncBatchNorm layers synchronise over: consecutive ranks in
    groups of ``group_size`` (SwAV's ``--syncbn_process_group_size``, apex's
    ``create_syncbn_process_group``); None, every rank, for 0 or a size >= the world size. Every
    rank must call it (``new_group`` is collective), with a size that divides the world size."""
    rank, world = get_rank_and_world()
    if group_size == 0 or group_size >= world:
        return None
    if world % group_size:
        raise ValueError(f"model.sync_bn_group_size={group_size} does not divide the world size {world}")
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = group
    return mine


def get_rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank's copy and
    returns to each rank the slice for the rows it produced."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.rows = x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), keeping the
    autograd path to every rank's own rows. Identity when not distributed.

    Every rank must pass the same shape. Because each rank's loss is a mean
    over the global batch and DDP averages gradients over ranks, the
    all_reduce(SUM) in backward makes a W-rank run's gradients equal those of
    one process on the concatenated batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks, outside autograd (``x`` itself without a group of several)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


class _MeanIdentityGrad(torch.autograd.Function):
    """The mean over ranks forward, the identity backward (see ``all_reduce_mean_with_grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous() / dist.get_world_size()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def all_reduce_mean_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the ranks, for a loss every rank computes from that mean (PAWS's
    me-max): backward passes the gradient to this rank's ``x`` unchanged, which after DDP's
    averaging over ranks is the gradient of one process computing the same mean over the whole
    batch. ``x`` itself without a group of several."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _MeanIdentityGrad.apply(x)


def all_reduce_sum(value: int, device: torch.device) -> int:
    """``value`` summed over the ranks (itself without a group of several)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())
