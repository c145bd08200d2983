"""NT-Xent and SuNCEt against naive per-pair loops, and a 2-process gloo run
against one process on the concatenated batch."""
from __future__ import annotations

import contextlib
import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.losses import init_nt_xent_loss, init_suncet_loss, nt_xent, nt_xent_positives, suncet
from tests.helpers.dist import free_port

# --------------------------------------------------------------------------- naive references
# Written as explicit loops over pairs on 0-d float64 tensors (differentiable),
# with cosines as dot / (|a| |b|) and plain exp/sum/log: no normalize, no
# logsumexp, no masks.


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = sum(a[k] * b[k] for k in range(a.shape[0]))
    na = torch.sqrt(sum(a[k] * a[k] for k in range(a.shape[0])))
    nb = torch.sqrt(sum(b[k] * b[k] for k in range(b.shape[0])))
    return dot / (na * nb)


def naive_nt_xent(z: torch.Tensor, t: float) -> torch.Tensor:
    z = z.double()
    rows = z.shape[0]
    n = rows // 2
    total = 0.0
    for i in range(rows):
        partner = i + n if i < n else i - n
        denominator = 0.0
        for k in range(rows):
            if k != i:
                denominator = denominator + torch.exp(_cos(z[i], z[k]) / t)
        total = total - torch.log(torch.exp(_cos(z[i], z[partner]) / t) / denominator)
    return total / rows


def naive_multiview_nt_xent(z: torch.Tensor, views: int, t: float) -> torch.Tensor:
    """Row r is view r // n of image r % n; each anchor's loss is the mean, over the other views
    of its image, of -log(exp(cos_ip / t) / sum over every other row of exp(cos_ik / t))."""
    z = z.double()
    rows = z.shape[0]
    n = rows // views
    total = 0.0
    for i in range(rows):
        denominator = 0.0
        for k in range(rows):
            if k != i:
                denominator = denominator + torch.exp(_cos(z[i], z[k]) / t)
        positives = [p for p in range(rows) if p != i and p % n == i % n]
        term = 0.0
        for p in positives:
            term = term - torch.log(torch.exp(_cos(z[i], z[p]) / t) / denominator)
        total = total + term / len(positives)
    return total / rows


def naive_suncet(z: torch.Tensor, labels: list[int], t: float) -> torch.Tensor:
    z = z.double()
    rows = z.shape[0]
    total, count = 0.0, 0
    for i in range(rows):
        numerator, denominator, partners = 0.0, 0.0, 0
        for j in range(rows):
            if j == i:
                continue
            e = torch.exp(_cos(z[i], z[j]) / t)
            denominator = denominator + e
            if labels[j] == labels[i]:
                numerator = numerator + e
                partners += 1
        if partners:
            total = total - torch.log(numerator / denominator)
            count += 1
    return total / count


def naive_values_math(z: torch.Tensor, t: float) -> float:
    """NT-Xent once more with the math module only (no autograd)."""
    rows = [[float(x) for x in r] for r in z.double()]
    norm = [math.sqrt(sum(x * x for x in r)) for r in rows]

    def cos(i, j):
        return sum(a * b for a, b in zip(rows[i], rows[j])) / (norm[i] * norm[j])

    n = len(rows) // 2
    total = 0.0
    for i in range(len(rows)):
        p = (i + n) % len(rows)
        den = sum(math.exp(cos(i, k) / t) for k in range(len(rows)) if k != i)
        total += -math.log(math.exp(cos(i, p) / t) / den)
    return total / len(rows)


def _grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    value = fn(z)
    (g,) = torch.autograd.grad(value, z)
    return value.detach(), g


# --------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("n,d,t", [(1, 3, 0.5), (3, 4, 0.1), (5, 3, 0.07)])
def test_nt_xent_matches_naive_value_and_grad(n, d, t):
    z = torch.randn(2 * n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    value, grad = _grad(lambda x: nt_xent(x, t), z)
    ref_value, ref_grad = _grad(lambda x: naive_nt_xent(x, t), z)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert value.item() == pytest.approx(naive_values_math(z, t), rel=1e-10, abs=1e-12)


def test_nt_xent_float32_matches_naive():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    value, grad = _grad(lambda x: nt_xent(x, 0.2), z)
    ref_value, ref_grad = _grad(lambda x: naive_nt_xent(x, 0.2), z.double())
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_nt_xent_single_pair_is_zero():
    # With one image the positive is the only other row: loss log(1) = 0.
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    value = nt_xent(z, 0.1)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(z.grad).all()


def test_nt_xent_positive_index_row_order():
    # Two ranks of N=2: [v1_r0 (0,1); v2_r0 (2,3); v1_r1 (4,5); v2_r1 (6,7)].
    assert nt_xent_positives(2, 2).tolist() == [2, 3, 0, 1, 6, 7, 4, 5]
    assert nt_xent_positives(3, 1).tolist() == [3, 4, 5, 0, 1, 2]


def test_nt_xent_factory_equals_function():
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    loss = init_nt_xent_loss(3, 0.3)
    torch.testing.assert_close(loss(z), nt_xent(z, 0.3))
    with pytest.raises(ValueError, match="expected 6 rows"):
        loss(torch.randn(4, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nt_xent_low_precision_is_finite_and_close(dtype):
    g = torch.Generator().manual_seed(3)
    # Large entries (|z|^2 >> 65504) and a small temperature (exp(1/t) >> 65504)
    # overflow if anything were computed in fp16.
    z32 = 300.0 * torch.randn(8, 16, generator=g)
    value, grad = _grad(lambda x: nt_xent(x, 0.05), z32.to(dtype))
    ref = nt_xent(z32, 0.05)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert value.item() == pytest.approx(ref.item(), rel=0.05, abs=0.05)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_nt_xent_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), bad)


@pytest.mark.parametrize("n,views,t", [(2, 3, 0.5), (3, 8, 0.1), (4, 2, 0.2)])
def test_multiview_nt_xent_matches_naive_value_and_grad(n, views, t):
    """Multi-crop: every other view of an image is a positive; two views are NT-Xent itself."""
    z = torch.randn(views * n, 4, generator=torch.Generator().manual_seed(views), dtype=torch.float64)
    value, grad = _grad(lambda x: nt_xent(x, t, views=views), z)
    ref_value, ref_grad = _grad(lambda x: naive_multiview_nt_xent(x, views, t), z)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    if views == 2:
        torch.testing.assert_close(value, naive_nt_xent(z, t), rtol=1e-10, atol=1e-12)


def test_view_positives_are_the_other_views_of_the_image():
    from train.losses import view_positives

    got = view_positives(2, 3, 2)  # 2 images x 3 views per rank, 2 ranks: 12 rows
    assert got.tolist()[:6] == [[2, 4], [3, 5], [0, 4], [1, 5], [0, 2], [1, 3]]
    assert got.tolist()[6:] == [[r + 6 for r in row] for row in got.tolist()[:6]]
    with pytest.raises(ValueError, match="views must be an integer >= 2"):
        init_nt_xent_loss(2, 0.1, 1, views=1)


def test_nt_xent_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 2 rows"):
        nt_xent(torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="2-D"):
        nt_xent(torch.randn(4), 0.1)
    with pytest.raises(ValueError, match="at least one row"):
        nt_xent(torch.randn(0, 3), 0.1)
    with pytest.raises(ValueError, match="floating point"):
        nt_xent(torch.ones(4, 3, dtype=torch.long), 0.1)


# --------------------------------------------------------------------------- SuNCEt


@pytest.mark.parametrize(
    "labels",
    [
        [0, 0, 1, 1, 2, 2],  # C=3, K=2
        [3, 1, 3, 3, 1, 0, 0, 1],  # unordered, repeated classes of different sizes
        [0, 0, 1, 2, 2, 3],  # classes 1 and 3 have a single row (K=1): left out as anchors
    ],
)
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_suncet_matches_naive_value_and_grad(labels, t):
    z = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(len(labels)), dtype=torch.float64)
    y = torch.tensor(labels)
    value, grad = _grad(lambda x: suncet(x, y, t), z)
    ref_value, ref_grad = _grad(lambda x: naive_suncet(x, labels, t), z)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_suncet_singleton_rows_still_act_as_negatives():
    labels = torch.tensor([0, 0, 1])
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    value = suncet(z, labels, 0.1)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    assert z.grad[2].abs().sum() > 0  # the lone class-1 row is in both anchors' denominators


def test_suncet_without_any_partner_raises():
    with pytest.raises(ValueError, match="no row has a same-class partner"):
        suncet(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), 0.1)


def test_suncet_closure_needs_no_host_check():
    """The factory's closure masks anchors without a partner on the device (no
    boolean indexing, no sync): the same value and gradient as the one-call
    version, and NaN (not an exception) when no anchor has a partner."""
    loss = init_suncet_loss(6, 0.2)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])  # classes 1 and 3 alone
    value, grad = _grad(lambda x: loss(x, labels), z)
    ref_value, ref_grad = _grad(lambda x: naive_suncet(x, labels.tolist(), 0.2), z)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert torch.isnan(loss(z, torch.arange(6)))


def test_suncet_float32_matches_naive():
    labels = [0, 1, 0, 1, 2, 2]
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    value, grad = _grad(lambda x: suncet(x, torch.tensor(labels), 0.1), z)
    ref_value, ref_grad = _grad(lambda x: naive_suncet(x, labels, 0.1), z.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_suncet_low_precision_is_finite_and_close(dtype):
    g = torch.Generator().manual_seed(5)
    z32 = 300.0 * torch.randn(8, 16, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    value, grad = _grad(lambda x: suncet(x, y, 0.05), z32.to(dtype))
    ref = suncet(z32, y, 0.05)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert value.item() == pytest.approx(ref.item(), rel=0.05, abs=0.05)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("-inf"), float("inf")])
def test_suncet_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        suncet(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), bad)
    with pytest.raises(ValueError, match="temperature"):
        init_suncet_loss(4, bad)


def test_suncet_rejects_bad_labels():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        suncet(z, torch.tensor([0, 0, 1]), 0.1)
    with pytest.raises(ValueError, match="labels must have shape"):
        suncet(z, torch.tensor([[0, 0], [1, 1]]), 0.1)
    with pytest.raises(ValueError, match="integer class ids"):
        suncet(z, torch.tensor([0.0, 0.0, 1.0, 1.0]), 0.1)


# --------------------------------------------------------------------------- 2-process equivalence

WORLD = 2
N_GLOBAL = 4  # images per step across ranks for NT-Xent (2 per rank)
M_GLOBAL = 8  # labelled rows across ranks for SuNCEt (4 per rank)
T = 0.2


def _fixed_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "v1": torch.randn(N_GLOBAL, 5, generator=g, dtype=torch.float64),
        "v2": torch.randn(N_GLOBAL, 5, generator=g, dtype=torch.float64),
        "sz": torch.randn(M_GLOBAL, 5, generator=g, dtype=torch.float64),
        # class 0 and 2 split across ranks, class 3 a singleton
        "labels": torch.tensor([0, 1, 2, 1, 0, 2, 2, 3]),
    }


@contextlib.contextmanager
def _gloo_group(rank: int, port: int):
    """This spawned process as rank ``rank`` of a WORLD-process gloo group on 127.0.0.1:``port``."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, port):
        b = _fixed_batch()
        n, m = N_GLOBAL // WORLD, M_GLOBAL // WORLD
        z = torch.cat([b["v1"][rank * n : (rank + 1) * n], b["v2"][rank * n : (rank + 1) * n]]).requires_grad_(True)
        nt_loss = nt_xent(z, T)
        nt_loss.backward()
        sz = b["sz"][rank * m : (rank + 1) * m].clone().requires_grad_(True)
        sc_loss = suncet(sz, b["labels"][rank * m : (rank + 1) * m], T)
        sc_loss.backward()
        torch.save(
            {"nt_loss": nt_loss.detach(), "nt_grad": z.grad, "sc_loss": sc_loss.detach(), "sc_grad": sz.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )



@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_match_one_process_on_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    b = _fixed_batch()
    # One process, concatenated batch: [v1_r0; v1_r1; v2_r0; v2_r1].
    z = torch.cat([b["v1"], b["v2"]]).requires_grad_(True)
    nt_ref = nt_xent(z, T)
    nt_ref.backward()
    sz = b["sz"].clone().requires_grad_(True)
    sc_ref = suncet(sz, b["labels"], T)
    sc_ref.backward()

    n, m = N_GLOBAL // WORLD, M_GLOBAL // WORLD
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["nt_loss"], nt_ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["sc_loss"], sc_ref.detach(), rtol=1e-12, atol=1e-12)
        # DDP averages over ranks, and only this rank produced its rows: the
        # gradient that reaches the parameters is local grad / world.
        rows = torch.cat([torch.arange(rank * n, (rank + 1) * n), N_GLOBAL + torch.arange(rank * n, (rank + 1) * n)])
        torch.testing.assert_close(got["nt_grad"] / WORLD, z.grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["sc_grad"] / WORLD, sz.grad[rank * m : (rank + 1) * m], rtol=1e-10, atol=1e-12)


VIEWS = 5  # the multi-crop case: 2 global + 3 local views of each image


def _multiview_batch() -> torch.Tensor:
    """[VIEWS, N_GLOBAL, 5]: every view of every global image."""
    return torch.randn(VIEWS, N_GLOBAL, 5, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


def _multiview_worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, port):
        n = N_GLOBAL // WORLD
        z = _multiview_batch()[:, rank * n : (rank + 1) * n].reshape(VIEWS * n, 5).requires_grad_(True)  # view-major
        loss = init_nt_xent_loss(n, T, WORLD, views=VIEWS)(z)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": z.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_multiview_two_ranks_match_one_process_on_the_gathered_batch(tmp_path):
    mp.spawn(_multiview_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    whole = _multiview_batch()
    z = whole.reshape(VIEWS * N_GLOBAL, 5).clone().requires_grad_(True)  # one process: all images, view-major
    ref = naive_multiview_nt_xent(z, VIEWS, T)
    ref.backward()
    grad = z.grad.view(VIEWS, N_GLOBAL, 5)
    n = N_GLOBAL // WORLD
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-10, atol=1e-12)
        mine = grad[:, rank * n : (rank + 1) * n].reshape(VIEWS * n, 5)
        torch.testing.assert_close(got["grad"] / WORLD, mine, rtol=1e-9, atol=1e-12)


def _detached_worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, port):
        b = _fixed_batch()
        n = N_GLOBAL // WORLD
        z = torch.cat([b["v1"][rank * n : (rank + 1) * n], b["v2"][rank * n : (rank + 1) * n]]).requires_grad_(True)
        loss = init_nt_xent_loss(n, T, WORLD, gather="detached")(z)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": z.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


def _naive_local_nt_xent(z_all: torch.Tensor, anchors: list[int], positive: dict[int, int]) -> torch.Tensor:
    """Mean over ``anchors`` of -log softmax of the positive, written as a loop (the reference)."""
    zn = torch.nn.functional.normalize(z_all, dim=1)
    terms = []
    for i in anchors:
        sims = torch.stack([zn[i] @ zn[k] / T for k in range(len(zn)) if k != i])
        others = [k for k in range(len(zn)) if k != i]
        terms.append(-(sims[others.index(positive[i])] - torch.logsumexp(sims, dim=0)))
    return torch.stack(terms).mean()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_detached_gather_differentiates_each_ranks_own_anchors_only(tmp_path):
    mp.spawn(_detached_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    b = _fixed_batch()
    n = N_GLOBAL // WORLD
    blocks = [torch.cat([b["v1"][r * n : (r + 1) * n], b["v2"][r * n : (r + 1) * n]]) for r in range(WORLD)]
    positive = {r * 2 * n + j: r * 2 * n + (j + n) % (2 * n) for r in range(WORLD) for j in range(2 * n)}
    everything = torch.cat(blocks)
    global_mean = _naive_local_nt_xent(everything, list(range(len(everything))), positive)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], global_mean, rtol=1e-12, atol=1e-12)  # the value: the global mean
        # The gradient: this rank's anchors' mean loss, every other rank's rows held constant.
        mine = blocks[rank].clone().requires_grad_(True)
        rows = torch.cat([blocks[r] if r != rank else mine for r in range(WORLD)])
        _naive_local_nt_xent(rows, list(range(rank * 2 * n, (rank + 1) * 2 * n)), positive).backward()
        torch.testing.assert_close(got["grad"], mine.grad, rtol=1e-10, atol=1e-12)


def _official_worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, port):
        b = _fixed_batch()
        n = N_GLOBAL // WORLD
        z = torch.cat([b["v1"][rank * n : (rank + 1) * n], b["v2"][rank * n : (rank + 1) * n]]).requires_grad_(True)
        loss = init_nt_xent_loss(n, T, WORLD, gather="official")(z)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": z.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


def _naive_official_nt_xent(anchors: torch.Tensor, keys: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """The official code's formula, written differently: for local anchor ``a`` (rows ``[v1; v2]``
    of ``n`` images each), ``-log(exp(cos(a, pos)/t) / sum_{k != a} exp(cos(a, k)/t))`` over the
    keys; ``keys`` are whatever the caller passes (constants for the official gradient)."""
    total = 0.0
    for i in range(2 * n):
        me, pos = offset + i, offset + (i + n) % (2 * n)
        den = sum(torch.exp(_cos(anchors[i], keys[k]) / T) for k in range(keys.shape[0]) if k != me)
        total = total - torch.log(torch.exp(_cos(anchors[i], keys[pos]) / T) / den)
    return total / (2 * n)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_official_gather_differentiates_anchors_only_at_two_ranks(tmp_path):
    """The authors' NT-Xent (``AllGather.apply(z.detach())``): each rank's gradient is that of its
    own anchors' mean with every key, its own included, a constant; the value is the global mean."""
    mp.spawn(_official_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    b = _fixed_batch()
    n = N_GLOBAL // WORLD
    blocks = [torch.cat([b["v1"][r * n : (r + 1) * n], b["v2"][r * n : (r + 1) * n]]) for r in range(WORLD)]
    keys = torch.cat(blocks).detach()
    values = [_naive_official_nt_xent(blocks[r], keys, r * 2 * n, n) for r in range(WORLD)]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], sum(values) / WORLD, rtol=1e-12, atol=1e-12)
        anchors = blocks[rank].clone().requires_grad_(True)
        _naive_official_nt_xent(anchors, keys, rank * 2 * n, n).backward()
        torch.testing.assert_close(got["grad"], anchors.grad, rtol=1e-10, atol=1e-12)


def test_official_gather_on_one_process_holds_every_key_constant():
    """At one process too: the value is NT-Xent's, the gradient the anchor side alone (about half)."""
    torch.manual_seed(3)
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    got = init_nt_xent_loss(4, T, 1, gather="official")(z)
    (g_official,) = torch.autograd.grad(got, z)
    anchors = z.detach().clone().requires_grad_(True)
    ref = _naive_official_nt_xent(anchors, z.detach(), 0, 4)
    ref.backward()
    torch.testing.assert_close(got, naive_nt_xent(z.detach(), T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_official, anchors.grad, rtol=1e-10, atol=1e-12)
    (g_full,) = torch.autograd.grad(init_nt_xent_loss(4, T, 1)(z), z)
    assert not torch.allclose(g_official, g_full)  # the full gradient differentiates the keys too


def test_official_gather_multiview_keeps_the_value():
    """With multi-crop views the value is the multi-view NT-Xent's; only anchors carry gradient."""
    torch.manual_seed(4)
    z = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)  # 3 views x 4 images
    got = init_nt_xent_loss(4, T, 1, gather="official", views=3)(z)
    torch.testing.assert_close(got, naive_multiview_nt_xent(z.detach(), 3, T), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(got, z)
    keys = z.detach()
    anchors = z.detach().clone().requires_grad_(True)
    # anchor side by hand: the mean over anchors of the mean over positives, keys held constant
    zn_a = torch.nn.functional.normalize(anchors, dim=1)
    zn_k = torch.nn.functional.normalize(keys, dim=1)
    terms = []
    for i in range(12):
        logits = torch.stack([zn_a[i] @ zn_k[k] / T for k in range(12) if k != i])
        others = [k for k in range(12) if k != i]
        pos = [others.index(p) for p in others if p % 4 == i % 4]
        terms.append(torch.logsumexp(logits, 0) - logits[pos].mean())
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(g, anchors.grad, rtol=1e-10, atol=1e-12)


def test_detached_gather_is_the_plain_loss_on_one_process():
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    a = init_nt_xent_loss(4, T, 1, gather="detached")(z)
    (ga,) = torch.autograd.grad(a, z)
    b = init_nt_xent_loss(4, T, 1)(z)
    (gb,) = torch.autograd.grad(b, z)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    with pytest.raises(ValueError, match="ntxent_gather"):
        init_nt_xent_loss(4, T, 1, gather="sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_losses_match_cpu_float64():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(48, 32, generator=g, dtype=torch.float64)
    labels = torch.arange(12).repeat_interleave(4)
    for fn, args in ((nt_xent, ()), (suncet, (labels,))):
        expected = fn(z, *args, 0.1)
        z_gpu = z.to("cuda", torch.float16).requires_grad_()
        got = fn(z_gpu, *(a.cuda() for a in args), 0.1)
        got.backward()
        assert torch.isfinite(z_gpu.grad).all()
        assert got.item() == pytest.approx(expected.item(), rel=1e-2)
