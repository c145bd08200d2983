"""Checkpointed RNG states on CUDA, with the devices faked: each rank saves and restores its own
device's generator, so a checkpoint resumes on fewer (or more) visible GPUs than it was written on.

``FakeCuda`` stands in for torch's CUDA generators the way torch's own functions reach them
(``torch.cuda.random``'s ``device_count``, ``get_rng_state`` and ``set_rng_state``, and their
``torch.cuda`` names): a device index at or past the visible count raises ``IndexError``, as
``torch.cuda.default_generators[idx]`` does.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import train.checkpoint as ckpt


class FakeCuda:
    """``count`` visible devices, each generator state a distinct byte tensor."""

    def __init__(self, monkeypatch, count: int, tag: int):
        self.count = count
        self.states = {i: torch.tensor([tag, i], dtype=torch.uint8) for i in range(count)}
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "device_count", lambda: self.count)
            monkeypatch.setattr(module, "get_rng_state", self.get)
            monkeypatch.setattr(module, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def _index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        index = 0 if index is None else index
        if index >= self.count:
            raise IndexError("list index out of range")  # torch.cuda.default_generators[index]
        return index

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()


def cuda(i: int) -> torch.device:
    return torch.device("cuda", i)


def saved_by(ranks_and_devices: list[tuple[int, int]], monkeypatch, visible: int) -> dict:
    """The checkpoint's ``rng`` as ``gather_rng_states`` assembles it: every rank's own
    ``rng_state`` on its device (here one process plays each rank in turn)."""
    fake = FakeCuda(monkeypatch, visible, tag=7)
    states = []
    for rank, device in ranks_and_devices:
        torch.manual_seed(100 + rank)  # each rank's CPU stream differs
        fake.states[device] = torch.tensor([7, 100 + rank], dtype=torch.uint8)
        states.append(ckpt.rng_state(cuda(device)))
    return {"ranks": states}


def test_a_rank_saves_only_its_own_device_generator(monkeypatch):
    FakeCuda(monkeypatch, 8, tag=1)
    state = ckpt.rng_state(cuda(3))
    assert torch.equal(state["cuda"], torch.tensor([1, 3], dtype=torch.uint8))
    assert "cuda" not in ckpt.rng_state(torch.device("cpu"))


def test_an_eight_gpu_checkpoint_resumes_on_four_visible_gpus(monkeypatch):
    """Issue: ``set_rng_state_all`` of 8 states raised IndexError with 4 devices visible."""
    rng = saved_by([(r, r) for r in range(8)], monkeypatch, visible=8)
    node = FakeCuda(monkeypatch, 4, tag=0)
    for rank in range(4):  # the resumed run's ranks 0..3, on devices 0..3
        ckpt.set_rng_state(rng, rank, cuda(rank))
        assert torch.equal(node.states[rank], torch.tensor([7, 100 + rank], dtype=torch.uint8))
        assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(100 + rank).get_state())


def test_one_gpu_per_task_restores_each_rank_into_its_only_device(monkeypatch):
    """srun with one GPU per task: every rank sees one device, ``cuda:0``."""
    rng = saved_by([(r, r) for r in range(4)], monkeypatch, visible=4)
    for rank in range(4):
        task = FakeCuda(monkeypatch, 1, tag=0)
        ckpt.set_rng_state(rng, rank, cuda(0))
        assert torch.equal(task.states[0], torch.tensor([7, 100 + rank], dtype=torch.uint8))


def test_more_ranks_than_saved_take_a_saved_rank_state(monkeypatch):
    rng = saved_by([(0, 0), (1, 1)], monkeypatch, visible=2)
    node = FakeCuda(monkeypatch, 4, tag=0)
    for rank in range(4):
        ckpt.set_rng_state(rng, rank, cuda(rank))
        assert torch.equal(node.states[rank], torch.tensor([7, 100 + rank % 2], dtype=torch.uint8))


def test_an_older_checkpoint_restores_the_entry_of_this_device_if_it_has_one(monkeypatch):
    """Before: rank 0 saved ``get_rng_state_all()`` (every device it saw) and the CPU states."""
    FakeCuda(monkeypatch, 8, tag=5)
    old = ckpt.rng_state(None) | {"cuda": torch.cuda.random.get_rng_state_all()}
    node = FakeCuda(monkeypatch, 2, tag=0)
    ckpt.set_rng_state(old, 0, cuda(1))
    assert torch.equal(node.states[1], torch.tensor([5, 1], dtype=torch.uint8))
    assert torch.equal(node.states[0], torch.tensor([0, 0], dtype=torch.uint8))  # untouched
    ckpt.set_rng_state(old, 3, cuda(1))  # fine on any rank
    ckpt.set_rng_state(ckpt.rng_state(None), 0, cuda(1))  # a CPU run's checkpoint on a GPU


def test_gathered_states_round_trip_through_a_weights_only_load_on_one_process(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    rng = ckpt.gather_rng_states(torch.device("cpu"))
    ckpt.save_atomic({"rng": rng}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], 0, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _gather_on_rank(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(10 + rank)
        gathered = ckpt.gather_rng_states(torch.device("cpu"))
        if rank == 0:
            torch.save(gathered, out)
        else:
            assert gathered is None
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_rank_state_reaches_rank_zero_over_gloo(tmp_path):
    world = 2
    torch.multiprocessing.spawn(_gather_on_rank, args=(world, f"file://{tmp_path / 'store'}", str(tmp_path / "g.pt")),
                                nprocs=world)
    gathered = torch.load(tmp_path / "g.pt", weights_only=True)
    for rank in range(world):
        want = torch.Generator().manual_seed(10 + rank).get_state()
        assert torch.equal(gathered["ranks"][rank]["torch"], want)
