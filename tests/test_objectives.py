"""SwAV and PAWS against naive references written differently (per-sample loops in float64, plain
exp/log/sum), Sinkhorn's marginals, SwAV's queue, frozen and normalised prototypes, and a
2-process gloo run of each against one process over the gathered batch."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.helpers.dist import free_port
from tests.test_losses import _gloo_group
from train.config import load_config
from train.objectives import ObjectiveSpec
from pipelines.sampler import ClassBalancedSampler
from train.objectives.paws import PAWS, smoothed_one_hot, step_classes
from train.objectives.swav import SwAV, sinkhorn

T = 0.1


def _spec(method: str, b: int, views: int, support: int = 0, world: int = 1, suncet: float = 0.0, classes: int = 2,
          unique: bool = False, **loss):
    cfg = load_config(None, [f"loss.method={method}", f"data.support_classes={classes}",
                             f"data.unique_classes={str(unique).lower()}",
                             *(f"loss.{k}={v}" for k, v in loss.items())])
    return ObjectiveSpec(cfg, unlabeled=b, views=views, global_views=2, support=support, suncet_weight=suncet,
                         world_size=world, device=torch.device("cpu"))


# --------------------------------------------------------------------------- naive references


def naive_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Sinkhorn-Knopp on the [N, K] score matrix, loop by loop (rows = samples here)."""
    n, k = scores.shape
    q = [[math.exp(scores[i][j] / epsilon) for j in range(k)] for i in range(n)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):  # every prototype: mass 1/K
            col = sum(q[i][j] for i in range(n))
            for i in range(n):
                q[i][j] = q[i][j] / col / k
        for i in range(n):  # every sample: mass 1/N
            row = sum(q[i])
            q[i] = [v / row / n for v in q[i]]
    return np.array([[v * n for v in row] for row in q])


def naive_swav(scores: np.ndarray, b: int, views: int, epsilon: float, iterations: int, t: float) -> float:
    """Swapped prediction, sample by sample: codes of views 0 and 1, predicted by every other view."""
    total = 0.0
    for crop in (0, 1):
        q = naive_sinkhorn(scores[crop * b : (crop + 1) * b], epsilon, iterations)
        sub = 0.0
        for v in range(views):
            if v == crop:
                continue
            for i in range(b):
                s = scores[v * b + i] / t
                log_norm = math.log(sum(math.exp(x) for x in s))
                sub -= sum(q[i][j] * (s[j] - log_norm) for j in range(len(s))) / b
        total += sub / (views - 1)
    return total / 2


def naive_paws(h: np.ndarray, p: np.ndarray, hs: np.ndarray, ps: np.ndarray, labels: list[int], b: int, views: int,
               tau: float, temp: float, smoothing: float, me_max: bool) -> float:
    """PAWS loss written out: soft nearest-neighbour probabilities, targets from the other global
    view, the mean target for local views, cross-entropy, and minus the entropy of the mean
    sharpened prediction."""
    classes = sorted(set(labels))
    off = smoothing / len(classes)
    y = [[(1 - smoothing + off) if c == label else off for c in classes] for label in labels]

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def predict(q, supports):
        sims = [sum(a * c for a, c in zip(unit(q), unit(s))) / tau for s in supports]
        m = max(sims)
        w = [math.exp(s - m) for s in sims]
        z = sum(w)
        return [sum(w[k] / z * y[k][c] for k in range(len(supports))) for c in range(len(classes))]

    def sharp(dist):
        s = [x ** (1 / temp) for x in dist]
        return [x / sum(s) for x in s]

    probs = [predict(p[i], ps) for i in range(views * b)]
    tg = [sharp(predict(h[i], hs)) for i in range(2 * b)]
    targets = []
    for v in range(views):
        for i in range(b):
            if v < 2:
                t = tg[(1 - v) * b + i]  # from the other global view
            else:
                t = [(tg[i][c] + tg[b + i][c]) / 2 for c in range(len(classes))]
            targets.append([x if x >= 1e-4 else 0.0 for x in t])
    ce = sum(-sum(t[c] * math.log(pr[c]) for c in range(len(classes))) for t, pr in zip(targets, probs)) / len(probs)
    if not me_max:
        return ce
    mean = [sum(sharp(pr)[c] for pr in probs) / len(probs) for c in range(len(classes))]
    return ce + sum(m * math.log(m) for m in mean)


# --------------------------------------------------------------------------- Sinkhorn and SwAV


def test_sinkhorn_equals_the_loops_and_its_marginals_converge():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    q = sinkhorn(scores, 0.05, 3)
    np.testing.assert_allclose(q.numpy(), naive_sinkhorn(scores.numpy(), 0.05, 3), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12, dtype=torch.float64))  # each sample: one assignment
    # with more iterations every prototype gets the same share of the batch
    many = sinkhorn(scores, 0.05, 200)
    torch.testing.assert_close(many.sum(dim=0), torch.full((5,), 12 / 5, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert (q >= 0).all()


class _Prototypes(nn.Module):
    def __init__(self, dim: int, k: int):
        super().__init__()
        self.prototypes = nn.Linear(dim, k, bias=False)

    def normalize_prototypes(self):
        with torch.no_grad():
            self.prototypes.weight.copy_(torch.nn.functional.normalize(self.prototypes.weight, dim=1))


def _swav(b: int, views: int, world: int = 1, dim: int = 4, k: int = 6, weights: torch.Tensor | None = None,
          **loss) -> tuple[SwAV, _Prototypes]:
    """SwAV built on prototypes of ``dim`` x ``k`` (holding ``weights`` when given: a model loaded
    from a checkpoint before the objective is built)."""
    head = _Prototypes(dim, k)
    if weights is not None:
        with torch.no_grad():
            head.prototypes.weight.copy_(weights)
    spec = _spec("swav", b, views, world=world, **{"swav.prototypes": k, **loss})
    return SwAV(spec, head.prototypes, head.normalize_prototypes), head


def test_swav_loss_equals_the_naive_swapped_prediction():
    b, views, k = 3, 4, 5
    objective, _ = _swav(b, views, k=k)
    g = torch.Generator().manual_seed(1)
    scores = torch.nn.functional.normalize(torch.randn(views * b, k, generator=g, dtype=torch.float64), dim=1)
    z = torch.randn(views * b, 4, dtype=torch.float64)
    (loss, total) = objective((z, scores), (), torch.zeros(0))
    expected = naive_swav(scores.numpy(), b, views, 0.05, 3, T)
    assert loss.item() == pytest.approx(expected, rel=1e-9) and total.item() == pytest.approx(expected, rel=1e-9)


def test_swav_prototypes_are_normalised_before_every_forward_and_frozen_first():
    objective, head = _swav(2, 2, **{"swav.freeze_prototypes_steps": 3})
    for step, frozen in ((0, True), (2, True), (3, False)):
        with torch.no_grad():
            head.prototypes.weight.mul_(3.0)  # an update
        objective.begin_step(0, step)
        torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(6))
        head.prototypes.weight.grad = torch.ones_like(head.prototypes.weight)
        objective.before_update(None)
        assert (head.prototypes.weight.grad is None) == frozen, step


def _updates(objective: SwAV, head: _Prototypes, steps: range) -> list[torch.Tensor]:
    """Steps of SwAV's hooks around a stand-in update of the prototypes; the weights each forward saw."""
    seen = []
    for step in steps:
        objective.begin_step(0, step)
        seen.append(head.prototypes.weight.detach().clone())
        objective.before_update(head)
        with torch.no_grad():
            head.prototypes.weight.add_(torch.randn(head.prototypes.weight.shape,
                                                    generator=torch.Generator().manual_seed(step)), alpha=0.1)
        objective.after_update(head)
    return seen


def test_swav_resumed_from_a_checkpoint_sees_the_uninterrupted_prototypes_bit_for_bit():
    """A checkpoint holds the prototypes as the update left them; a new objective built on them
    (a resumed run) normalises them once before the next forward, as the uninterrupted run does
    (normalising twice differs in the last bits: the resumed run drifted)."""
    torch.manual_seed(0)
    objective, head = _swav(2, 2, dim=32, k=200)
    uninterrupted = _updates(objective, head, range(6))
    torch.manual_seed(0)
    first, head = _swav(2, 2, dim=32, k=200)
    _updates(first, head, range(3))
    saved = head.prototypes.weight.detach().clone(), first.state_dict()  # the checkpoint after step 2
    resumed, head = _swav(2, 2, dim=32, k=200, weights=saved[0])
    resumed.load_state_dict(saved[1])
    for step, (got, want) in enumerate(zip(_updates(resumed, head, range(3, 6)), uninterrupted[3:]), start=3):
        assert torch.equal(got, want), step


def test_swav_queue_fills_is_used_once_full_and_survives_a_checkpoint():
    b = 2
    objective, head = _swav(b, 2, **{"swav.queue_length": 4, "swav.queue_start_epoch": 1})
    objective.begin_step(0, 0)
    assert objective.queue is None  # before its epoch
    seen, used = [], []
    for step in range(3):
        objective.begin_step(1, 5 + step)
        if step == 0:
            assert objective.queue.shape == (2, 4, 4) and not objective.queue.any()
        used.append(objective.use_queue)
        z = torch.nn.functional.normalize(torch.randn(2 * b, 4), dim=1)
        scores = head.prototypes(z)
        objective((z, scores), (), torch.zeros(0))
        seen.append(z)
    # newest first: the queue holds the last two steps' rows of each assigned crop
    torch.testing.assert_close(objective.queue[0], torch.cat([seen[2][:b], seen[1][:b]]))
    torch.testing.assert_close(objective.queue[1], torch.cat([seen[2][b:], seen[1][b:]]))
    assert used == [False, False, True]  # full after two steps, used from the third
    state = objective.state_dict()
    assert state["queued"] == 4
    for saved in (state, {"queue": state["queue"], "use_queue": True}):  # today's checkpoint, and one without the count
        restored, _ = _swav(b, 2, **{"swav.queue_length": 4, "swav.queue_start_epoch": 1})
        restored.load_state_dict(saved)
        torch.testing.assert_close(restored.queue, objective.queue)
        restored.begin_step(1, 8)
        assert restored.use_queue
    # with the queue on, the codes equal Sinkhorn over [queue scores; batch scores], batch rows kept
    z = torch.nn.functional.normalize(torch.randn(2 * b, 4), dim=1)
    scores = head.prototypes(z)
    queued = objective.queue[0].clone() @ head.prototypes.weight.detach().T
    codes = objective.codes(scores, z, 0)
    torch.testing.assert_close(codes, sinkhorn(torch.cat([queued, scores[:b].detach()]), 0.05, 3)[-b:])


def test_swav_queue_half_filled_in_an_older_checkpoint_counts_its_rows():
    b = 2
    objective, head = _swav(b, 2, **{"swav.queue_length": 6, "swav.queue_start_epoch": 0})
    objective.begin_step(0, 0)
    z = torch.nn.functional.normalize(torch.randn(2 * b, 4), dim=1)
    objective((z, head.prototypes(z)), (), torch.zeros(0))
    restored, _ = _swav(b, 2, **{"swav.queue_length": 6, "swav.queue_start_epoch": 0})
    restored.load_state_dict({"queue": objective.state_dict()["queue"], "use_queue": False})
    assert restored.queued == objective.queued == 2
    for full in (False, False, True):  # 2 rows, then 4, then 6 of 6 before the step
        restored.begin_step(0, 1)
        assert restored.use_queue == full


def test_paws_loss_equals_the_naive_formula():
    b, views, classes, per = 3, 4, 3, 2
    objective = PAWS(_spec("paws", b, views, support=classes * per, classes=classes, suncet_weight=0.0))
    g = torch.Generator().manual_seed(2)
    h, p = (torch.randn(views * b, 5, generator=g, dtype=torch.float64) for _ in range(2))
    hs, ps = (torch.randn(classes * per, 5, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([7, 7, 2, 2, 9, 9])
    loss, memax, total = objective((h, p), (hs, ps), labels)
    expected = naive_paws(h.numpy(), p.numpy(), hs.numpy(), ps.numpy(), labels.tolist(), b, views, T, 0.25, 0.1, True)
    without = naive_paws(h.numpy(), p.numpy(), hs.numpy(), ps.numpy(), labels.tolist(), b, views, T, 0.25, 0.1, False)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(without, rel=1e-6) and memax.item() == pytest.approx(expected - without, rel=1e-5)
    assert memax.item() < 0  # minus an entropy


def naive_label_matrix(labels: list[int], smoothing: float) -> torch.Tensor:
    """One row per label over the sorted distinct labels: 1 - s + s/C on its class, s/C elsewhere."""
    classes = sorted(set(labels))
    off = smoothing / len(classes)
    return torch.tensor([[1 - smoothing + off if c == label else off for c in classes] for label in labels])


@pytest.mark.parametrize("world, unique, views", [(1, False, 1), (1, True, 2), (2, False, 1), (2, True, 2),
                                                  (3, False, 2), (3, True, 1)])
def test_paws_label_matrix_over_the_samplers_support_sets(world, unique, views):
    """The gathered support set of real sampler steps (each rank class-major, ranks in order, an
    image's views adjacent; sparse unsorted class ids): the label matrix is the naive one, bit for
    bit, with its class count known from the config instead of read back from the device."""
    classes, per_class, ids = 3, 2, [907, 12, 455, 3, 610, 78, 231, 999, 40]
    labels = np.repeat(ids, 4)
    samplers = [ClassBalancedSampler(labels, classes, per_class, rank=r, world_size=world, unique_classes=unique,
                                     seed=1) for r in range(world)]
    spec = _spec("paws", 4, 2, support=classes * per_class * views, world=world, classes=classes, unique=unique)
    for step in range(len(samplers[0])):
        gathered = torch.cat([torch.from_numpy(labels[s.batch(0, step)]).repeat_interleave(views) for s in samplers])
        got = smoothed_one_hot(gathered, step_classes(spec), 0.1)
        assert torch.equal(got, naive_label_matrix(gathered.tolist(), 0.1)), step


# --------------------------------------------------------------------------- two processes


WORLD, B, VIEWS, K, DIM = 2, 3, 4, 5, 6
SUPPORT = 4  # per rank: 2 classes x 2 images, ranks sharing the classes


def _fixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"z": torch.randn(VIEWS, WORLD * B, DIM, generator=g, dtype=torch.float64),
            "w": torch.randn(K, DIM, generator=g, dtype=torch.float64),
            "h": torch.randn(VIEWS, WORLD * B, DIM, generator=g, dtype=torch.float64),
            "p": torch.randn(VIEWS, WORLD * B, DIM, generator=g, dtype=torch.float64),
            "hs": torch.randn(WORLD * SUPPORT, DIM, generator=g, dtype=torch.float64),
            "ps": torch.randn(WORLD * SUPPORT, DIM, generator=g, dtype=torch.float64),
            "labels": torch.tensor([4, 4, 1, 1, 4, 4, 1, 1])}


def _rows(x: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's rows of [VIEWS, WORLD*B, D], view-major."""
    return x[:, rank * B : (rank + 1) * B].reshape(VIEWS * B, -1)


def _swav_forward(z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zn = torch.nn.functional.normalize(z, dim=1)
    return zn, zn @ torch.nn.functional.normalize(w, dim=1).T


def _worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, port):
        d = _fixed()
        z = _rows(d["z"], rank).requires_grad_(True)
        objective = SwAV(_spec("swav", B, VIEWS, world=WORLD, **{"swav.prototypes": K}),
                         nn.Linear(DIM, K, bias=False), lambda: None)
        (swav_loss, _) = objective(_swav_forward(z, d["w"]), (), torch.zeros(0))
        swav_loss.backward()
        h, p = (_rows(d[k], rank).requires_grad_(True) for k in ("h", "p"))
        hs, ps = (d[k][rank * SUPPORT : (rank + 1) * SUPPORT].clone().requires_grad_(True) for k in ("hs", "ps"))
        paws = PAWS(_spec("paws", B, VIEWS, support=SUPPORT, world=WORLD))
        _, _, paws_loss = paws((h, p), (hs, ps), d["labels"][rank * SUPPORT : (rank + 1) * SUPPORT])
        paws_loss.backward()
        torch.save({"swav": swav_loss.detach(), "z_grad": z.grad, "paws": paws_loss.detach(), "p_grad": p.grad,
                    "ps_grad": ps.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_match_one_process_on_the_gathered_batch(tmp_path):
    """The value is the global batch's on every rank; each rank's gradient, averaged by DDP over
    the ranks, is one process's gradient on the whole batch (rank grad / W = that process's)."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    d = _fixed()
    z = d["z"].reshape(VIEWS * WORLD * B, DIM).clone().requires_grad_(True)  # one process: every image, view-major
    one = SwAV(_spec("swav", WORLD * B, VIEWS, **{"swav.prototypes": K}), nn.Linear(DIM, K, bias=False), lambda: None)
    (swav_ref, _) = one(_swav_forward(z, d["w"]), (), torch.zeros(0))
    swav_ref.backward()
    h, p = (d[k].reshape(VIEWS * WORLD * B, DIM).clone().requires_grad_(True) for k in ("h", "p"))
    hs, ps = d["hs"].clone().requires_grad_(True), d["ps"].clone().requires_grad_(True)
    _, _, paws_ref = PAWS(_spec("paws", WORLD * B, VIEWS, support=WORLD * SUPPORT))((h, p), (hs, ps), d["labels"])
    paws_ref.backward()
    z_grad, p_grad = z.grad.view(VIEWS, WORLD * B, DIM), p.grad.view(VIEWS, WORLD * B, DIM)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["swav"], swav_ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["paws"], paws_ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["z_grad"] / WORLD, _rows(z_grad, rank), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got["p_grad"] / WORLD, _rows(p_grad, rank), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got["ps_grad"] / WORLD, ps.grad[rank * SUPPORT : (rank + 1) * SUPPORT],
                                   rtol=1e-8, atol=1e-12)


def test_method_settings_are_checked_naming_the_key():
    from train.config import ConfigError

    for bad, message in (("loss.method=byol", "loss.method must be one of"),
                         ("loss.swav.epsilon=0", "loss.swav.epsilon must be > 0"),
                         ("loss.paws.label_smoothing=1", "loss.paws.label_smoothing must be in [0, 1)")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(None, [bad, "loss.suncet_weight=0"]).validate()
    with pytest.raises(ConfigError, match="PAWS reads the support set through its own loss"):
        load_config(None, ["loss.method=paws"]).validate()
