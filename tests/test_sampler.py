from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.sampler import ClassBalancedSampler

# 7 classes with uneven sizes (2..9 images), shuffled order of dataset indices.
SIZES = [5, 9, 3, 4, 6, 2, 8]
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(len(SIZES)), SIZES))


def make(rank=0, world_size=1, C=3, K=2, unique=False, seed=0, labels=LABELS):
    return ClassBalancedSampler(labels, C, K, rank=rank, world_size=world_size, unique_classes=unique, seed=seed)


def epoch_batches(sampler, epoch=0, start_step=0):
    sampler.set_epoch(epoch, start_step)
    return list(sampler)


def check_layout(batch, C, K, labels=LABELS):
    assert len(batch) == C * K
    assert all(isinstance(i, int) for i in batch)
    blocks = [labels[batch[i * K : (i + 1) * K]] for i in range(C)]
    for block in blocks:
        assert len(set(block.tolist())) == 1  # class-major: one class per block
    classes = [int(b[0]) for b in blocks]
    assert len(set(classes)) == C
    for i in range(C):  # images of a class block are distinct
        assert len(set(batch[i * K : (i + 1) * K])) == K
    return classes


@pytest.mark.parametrize("world_size,unique", [(1, False), (2, False), (2, True), (3, False)])
def test_layout_coverage_and_length(world_size, unique):
    C, K = 3, 2
    samplers = [make(r, world_size, C, K, unique) for r in range(world_size)]
    lengths = {len(s) for s in samplers}
    assert len(lengths) == 1
    seen = set()
    for s in samplers:
        batches = epoch_batches(s, epoch=4)
        assert len(batches) == len(s)
        for b in batches:
            check_layout(b, C, K)
            seen.update(b)
    assert seen == set(range(len(LABELS)))  # every labeled image within one epoch


def test_length_formula():
    # R = max ceil(N_c / D) rounds over M = 7 classes, P class slots per step.
    assert len(make(C=3, K=2)) == -(-7 * 5 // 3)  # D=2, R=ceil(9/2)=5
    assert len(make(world_size=2, C=3, K=2)) == -(-7 * 3 // 3)  # D=4, R=3
    assert len(make(world_size=2, C=3, K=2, unique=True)) == -(-7 * 5 // 6)  # D=2, P=6


def test_class_frequency_balanced():
    s = make(C=3, K=2)
    counts = np.zeros(len(SIZES), int)
    for b in epoch_batches(s):
        for c in check_layout(b, 3, 2):
            counts[c] += 1
    assert counts.max() - counts.min() <= 1


def test_unique_classes_disjoint_across_ranks():
    W, C, K = 2, 3, 2
    per_rank = [epoch_batches(make(r, W, C, K, unique=True), epoch=1) for r in range(W)]
    for step in range(len(per_rank[0])):
        batches = [per_rank[r][step] for r in range(W)]
        index_sets = [set(b) for b in batches]
        class_sets = [set(LABELS[b].tolist()) for b in batches]
        assert not index_sets[0] & index_sets[1]
        assert not class_sets[0] & class_sets[1]


def test_shared_classes_different_images_across_ranks():
    labels = np.repeat(np.arange(4), 6)  # every class has >= W*K = 4 images
    W, C, K = 2, 2, 2
    per_rank = [epoch_batches(make(r, W, C, K, labels=labels), epoch=2) for r in range(W)]
    assert len(per_rank[0]) == len(per_rank[1])
    for b0, b1 in zip(*per_rank):
        assert labels[b0].tolist() == labels[b1].tolist()  # same classes, same order
        assert not set(b0) & set(b1)


def test_shared_classes_small_class_groups_ranks():
    # Class 2 has 3 images, K=1, W=4: ranks 0-2 see distinct images, rank 3 repeats.
    labels = np.array([0] * 8 + [1] * 8 + [2] * 3)
    per_rank = [epoch_batches(make(r, 4, 2, 1, labels=labels)) for r in range(4)]
    for step in range(len(per_rank[0])):
        batches = [per_rank[r][step] for r in range(4)]
        for j in range(2):
            imgs = [b[j] for b in batches]
            cls = int(labels[imgs[0]])
            assert len(set(imgs)) == (3 if cls == 2 else 4)


def test_deterministic_and_varies_with_epoch_and_seed():
    a = epoch_batches(make(seed=5), epoch=3)
    assert a == epoch_batches(make(seed=5), epoch=3)
    assert a != epoch_batches(make(seed=5), epoch=4)
    assert a != epoch_batches(make(seed=6), epoch=3)
    state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    epoch_batches(make(seed=7), epoch=0)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG use
    assert np.array_equal(np_state, np.random.get_state()[1])


def test_resume_mid_epoch_and_batch():
    s = make(world_size=2, rank=1, unique=True)
    full = epoch_batches(s, epoch=2)
    tail = epoch_batches(make(world_size=2, rank=1, unique=True), epoch=2, start_step=3)
    assert tail == full[3:]
    assert s.batch(2, 4) == full[4]
    assert epoch_batches(s, epoch=2, start_step=len(s)) == []
    with pytest.raises(ValueError, match="start_step"):
        s.set_epoch(0, start_step=len(s) + 1)


def test_accepts_lists_and_tensors():
    ref = epoch_batches(make())
    assert epoch_batches(make(labels=LABELS.tolist())) == ref
    assert epoch_batches(make(labels=torch.as_tensor(LABELS))) == ref


def test_errors():
    with pytest.raises(ValueError, match=r"only 7 classes"):
        make(C=8)
    with pytest.raises(ValueError, match=r"2 \* 4 = 8.*only 7 classes"):
        make(world_size=2, C=4, unique=True)
    with pytest.raises(ValueError, match=r"class 5 has 2 labeled image\(s\).*drop class 5"):
        make(K=3)
    with pytest.raises(ValueError, match="images_per_class"):
        make(K=0)
    with pytest.raises(ValueError, match="classes_per_batch"):
        make(C=0)
    with pytest.raises(ValueError, match="empty"):
        make(labels=[])
    with pytest.raises(ValueError, match="rank"):
        make(rank=2, world_size=2)
