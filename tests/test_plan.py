"""The shared sample plan (``pipelines.plan``) against independent references: the unlabeled
order against ``DistributedSampler`` itself, the support batches against a ``ClassBalancedSampler``
iterated epoch by epoch; and the property that makes world-size changes safe: a global step
holds the same images whatever the number of ranks sharing a global batch."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import DataError
from pipelines.plan import UnlabeledPlan, build_plan, sample_seed
from pipelines.spec import SupportSpec
from tests.helpers.reference_plan import reference_support, reference_unlabeled


@pytest.mark.parametrize("n,b,w", [(40, 6, 1), (40, 6, 2), (97, 4, 3), (100, 5, 4)])
def test_unlabeled_plan_is_distributed_samplers_order(n, b, w):
    for rank in range(w):
        plan = UnlabeledPlan(n, b, rank, w, seed=7)
        for epoch in (0, 3):
            assert plan.batches(epoch).tolist() == reference_unlabeled(n, b, rank, w, 7, epoch)


@pytest.mark.parametrize("global_batch,worlds", [(12, (1, 2, 3, 4, 6)), (8, (1, 2, 4, 8))])
def test_a_global_step_holds_the_same_images_on_any_number_of_ranks(global_batch, worlds):
    n = 101
    per_world = {}
    for w in worlds:
        plans = [UnlabeledPlan(n, global_batch // w, r, w, seed=3) for r in range(w)]
        steps = {p.steps_per_epoch for p in plans}
        assert steps == {n // global_batch}
        per_world[w] = [sorted(np.concatenate([p.batches(2)[s] for p in plans]).tolist())
                        for s in range(n // global_batch)]
    first = per_world[worlds[0]]
    assert all(per_world[w] == first for w in worlds)
    flat = [i for step in first for i in step]
    assert len(set(flat)) == len(flat) == (n // global_batch) * global_batch  # each image at most once


def test_unlabeled_plan_refuses_data_that_cannot_fill_a_batch():
    with pytest.raises(DataError, match="cannot fill one batch"):
        UnlabeledPlan(5, 3, 0, 2, seed=0)


def test_support_plan_follows_the_class_balanced_sampler_across_its_epochs():
    labels = np.repeat(np.arange(6), [5, 4, 7, 3, 6, 5])
    labeled = np.flatnonzero(np.arange(len(labels)) % 5 != 0)  # a real subset: positions != dataset indices
    for rank in range(2):
        plan = build_plan(len(labels), labels, labeled, 4, SupportSpec(3, 2), rank, 2, seed=11)
        sampler = plan.support.sampler
        first, count = 3, 4 * len(sampler) + 1  # crosses several sampler epochs
        got = plan.support.batches(first, count).tolist()
        assert got == reference_support(sampler, labeled, first, count)
        assert set(np.ravel(got)) <= set(labeled.tolist())
        assert [plan.support.batch(g).tolist() for g in range(first, first + 3)] == got[:3]


def test_support_plan_is_none_without_a_support_set():
    labels = np.zeros(10, dtype=np.int64)
    assert build_plan(10, labels, np.arange(10), 2, None, 0, 1, seed=0).support is None


def test_an_impossible_support_set_is_a_data_error_naming_the_key():
    labels = np.repeat(np.arange(3), 4)
    with pytest.raises(DataError, match="support_classes"):
        build_plan(12, labels, np.arange(12), 2, SupportSpec(5, 2), 0, 1, seed=0)


def test_sample_seeds_depend_on_every_key():
    base = sample_seed(1, 2, 3, 4)
    assert base == sample_seed(1, 2, 3, 4) and 0 <= base < 2**63
    assert len({base, sample_seed(0, 2, 3, 4), sample_seed(1, 0, 3, 4), sample_seed(1, 2, 0, 4),
                sample_seed(1, 2, 3, 0)}) == 5
