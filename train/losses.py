"""Contrastive losses: NT-Xent (SimCLR) and SuNCEt (Assran et al. 2020, eq. 2).

Both losses are built as factories (``init_nt_xent_loss``, ``init_suncet_loss``)
that precompute their index tensors and masks for a fixed per-rank batch size
and world size and return a short closure. ``nt_xent`` and ``suncet`` are the
one-call versions that build the closure from the input's shape.

Distributed semantics (the same for both losses)
------------------------------------------------
Every rank gathers the embeddings of all ranks with ``all_gather_with_grad``
and computes the loss over *all* global anchors, so every rank returns the
same value: the mean over the global batch. In backward, the gather sums the
(identical) gradients of all ranks, giving each rank ``W`` times the
single-process gradient of its own rows; DDP's division by ``W`` then makes a
``W``-rank step equal a one-process step on the concatenated batch. The
similarity matrix is therefore ``(W*B) x (W*B)`` on every rank; at
SimCLR-scale global batches (4096 pairs) that is a few GFLOP, small next to
the backbone. All ranks must pass tensors of the same shape (all_gather
requires it) and call the loss the same number of times.

Numerics: inputs are up-cast to at least float32 before normalisation, so
fp16/bf16 embeddings never overflow in the norms, the similarities or the
exponentials (which are only ever taken inside ``logsumexp`` /
``cross_entropy``). The gathered tensor is float32, so the gradient
all_reduce in backward is float32 too.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F

from train.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_no_grad, get_rank_and_world

NTXentFn = Callable[[torch.Tensor], torch.Tensor]
SuNCEtFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- checks


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number, got {temperature!r}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return value


def _check_embeddings(z: torch.Tensor, name: str) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name}: z must be a 2-D tensor [rows, dim], got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"{name}: z must be floating point, got {z.dtype}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{name}: z must have at least one row and one column, got {tuple(z.shape)}")


def _world_size(world_size: int | None) -> int:
    if world_size is None:
        return get_rank_and_world()[1]
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return world_size


def _normalize_and_gather(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in (at least) float32 and gather them from all ranks."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    return all_gather_with_grad(F.normalize(z.to(dtype), dim=1))


def _check_gathered(name: str, gathered_rows: int, expected_rows: int, world_size: int) -> None:
    if gathered_rows != expected_rows:
        raise RuntimeError(
            f"{name}: gathered {gathered_rows} rows but the loss was built for {expected_rows} "
            f"(world size {world_size}); rebuild the loss after the process group changes"
        )


# --------------------------------------------------------------------------- NT-Xent


def view_positives(local_images: int, views: int, world_size: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """int64 ``[V*N*W, V-1]``: the gathered rows that are each row's positives, for the row order
    documented in ``init_nt_xent_loss``: row ``r*VN + v*N + i`` (view ``v`` of image ``i`` of rank
    ``r``) has the other views of its image, ``r*VN + u*N + i`` for ``u != v`` in increasing ``u``."""
    n, v = local_images, views
    rows = torch.arange(v * n * world_size, device=device)
    block, view, image = rows // (v * n), (rows // n) % v, rows % n
    others = torch.arange(v - 1, device=device)
    other_views = others[None, :] + (others[None, :] >= view[:, None]).long()  # skip the row's own view
    return block[:, None] * (v * n) + other_views * n + image[:, None]


def nt_xent_positives(local_pairs: int, world_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Index of each gathered row's positive with two views: row ``r*2N + j`` pairs with
    ``r*2N + (j+N) % 2N`` (``view_positives`` with V = 2)."""
    return view_positives(local_pairs, 2, world_size, device)[:, 0]


GATHERS = ("grad", "detached", "official")  # loss.ntxent_gather


def _nt_xent_terms(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of ``logsumexp_k(logits_ik) - mean_p logits_ip`` (the anchor itself is
    already ``-inf`` in ``logits``); with one positive per row, F.cross_entropy's value."""
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, positives).mean(dim=1)).mean()


def init_nt_xent_loss(
    local_images: int,
    temperature: float,
    world_size: int | None = None,
    device: torch.device | str | None = None,
    gather: str = "grad",
    views: int = 2,
) -> NTXentFn:
    """Build the NT-Xent loss for ``local_images`` images with ``views`` views each per rank.

    Row order. Each rank passes ``z = [view 0; view 1; ...]`` with shape
    ``[V*N, D]``: rows ``v*N + i`` are the views of local image ``i`` (the
    contract's view-major order, groups concatenated). After the gather the
    global tensor is the rank blocks in rank order, so global row
    ``r*VN + v*N + i`` has its positives at ``r*VN + u*N + i``, ``u != v``
    (``view_positives``). Since the loss is a mean over anchors it does not
    depend on this order, and equals the single-process loss on all ranks'
    rows.

    The loss: cosine similarities ``s_ij`` of the L2-normalised rows; for each
    of the ``VNW`` anchors ``i`` with positives ``P(i)`` (the other views of its
    image), ``l_i = mean_{p in P(i)} -log( exp(s_ip/t) / sum_{k != i} exp(s_ik/t) )``;
    the result is the mean of ``l_i`` over all global anchors, identical on
    every rank. With two views (SimCLR) ``P(i)`` is the one other view and this
    is SimCLR's NT-Xent (the positive in the denominator, the other ``2NW-2``
    rows negatives). With more views (multi-crop) it is SupCon's ``L_out``
    with the image as the label: every view of an image pulls towards every
    other view of it, and the other views of the same image stay in the
    denominator, as SimCLR's positive does. ``world_size`` defaults to the
    current process group's.

    ``gather`` (``loss.ntxent_gather``) says which rows carry gradient; the value is the
    same global mean in every case:

    - ``"grad"`` (default): gradients pass through the gather, so a W-rank step equals one
      process on the whole batch (SimCLR's formula: every row is differentiated as anchor and
      as key).
    - ``"official"``: what the official SuNCEt code trains (``init_simclr_loss``:
      ``AllGather.apply(z.detach())``): every key is a constant, this rank's own rows
      included, so only the anchor side is differentiated, at any world size (one process
      too). Its NT-Xent gradient is about half of ``"grad"``'s, so SuNCEt weighs about twice
      as much against it.
    - ``"detached"``: each rank differentiates its own anchors *and* its own rows as keys;
      the other ranks' rows are constants. With one process it is ``"grad"``; it is not what
      any official code does (an earlier version of this docstring said it was).
    """
    if isinstance(local_images, bool) or not isinstance(local_images, int) or local_images < 1:
        raise ValueError(f"local_images must be an integer >= 1, got {local_images!r}")
    if isinstance(views, bool) or not isinstance(views, int) or views < 2:
        raise ValueError(f"views must be an integer >= 2 (NT-Xent pairs an image's views), got {views!r}")
    if gather not in GATHERS:
        raise ValueError(f"gather (loss.ntxent_gather) must be one of {GATHERS}, got {gather!r}")
    inv_t = 1.0 / _check_temperature(temperature)
    world = _world_size(world_size)
    local_rows = views * local_images
    rows = local_rows * world
    positives = view_positives(local_images, views, world, device)
    self_mask = torch.eye(rows, dtype=torch.bool, device=device)
    if gather == "official" or (gather == "detached" and world > 1):
        return _local_anchor_nt_xent(local_rows, inv_t, world, positives, self_mask,
                                     own_keys_with_grad=gather == "detached")

    def loss(z: torch.Tensor) -> torch.Tensor:
        _check_rows(z, local_rows, views, positives.device)
        # 1. normalise and gather: [VNW, D], rank blocks of [view 0; view 1; ...]
        zg = _normalize_and_gather(z)
        _check_gathered("nt_xent", zg.shape[0], rows, world)
        # 2. cosine-similarity logits, the anchor itself removed from the softmax
        logits = (zg @ zg.T * inv_t).masked_fill(self_mask, float("-inf"))
        # 3. the mean over positives of the cross-entropy, mean over all global anchors
        return _nt_xent_terms(logits, positives)

    return loss


def _check_rows(z: torch.Tensor, local_rows: int, views: int, device: torch.device) -> None:
    _check_embeddings(z, "nt_xent")
    if z.shape[0] != local_rows:
        raise ValueError(f"nt_xent: expected {local_rows} rows ({views} views x {local_rows // views} images, "
                         f"view-major), got {z.shape[0]}")
    if z.device != device:
        raise ValueError(f"nt_xent: z is on {z.device} but the loss was built for {device}")


def _local_anchor_nt_xent(local_rows: int, inv_t: float, world: int, positives: torch.Tensor,
                          self_mask: torch.Tensor, own_keys_with_grad: bool) -> NTXentFn:
    """NT-Xent differentiated through this rank's anchors only, every other rank's rows acting as
    constant keys; this rank's own rows as keys too when not ``own_keys_with_grad`` (``"official"``).
    The value is the global mean (see ``init_nt_xent_loss``); with DDP's averaging the gradient is
    that of the global mean with those keys held constant."""
    rank = get_rank_and_world()[0] if world > 1 else 0
    mine = slice(rank * local_rows, (rank + 1) * local_rows)
    views = positives.shape[1] + 1

    def loss(z: torch.Tensor) -> torch.Tensor:
        _check_rows(z, local_rows, views, positives.device)
        # 1. normalise; gather every rank's rows as constants (this rank's put back with gradient
        #    for "detached")
        zn = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
        keys = all_gather_no_grad(zn.detach())
        _check_gathered("nt_xent", keys.shape[0], self_mask.shape[0], world)
        if own_keys_with_grad:
            keys = torch.cat([keys[: mine.start], zn, keys[mine.stop :]])
        # 2. this rank's anchors against every row, itself removed from the softmax
        logits = (zn @ keys.T * inv_t).masked_fill(self_mask[mine], float("-inf"))
        local = _nt_xent_terms(logits, positives[mine])
        # 3. the value of the global mean, the gradient of this rank's mean
        if world == 1:
            return local
        total = all_reduce_no_grad(local.detach()) / world
        return local + (total - local.detach())

    return loss


def nt_xent(z: torch.Tensor, temperature: float, views: int = 2) -> torch.Tensor:
    """NT-Xent of ``z = [view 0; view 1; ...]`` (``[V*N, D]``, view-major); see
    ``init_nt_xent_loss`` for the loss and the distributed row order. Returns a float32 (or
    float64) scalar, the same on every rank."""
    _check_embeddings(z, "nt_xent")
    if z.shape[0] % views:
        raise ValueError(f"nt_xent: z must have a multiple of {views} rows ([view 0; view 1; ...]), got {z.shape[0]}")
    return init_nt_xent_loss(z.shape[0] // views, temperature, device=z.device, views=views)(z)


# --------------------------------------------------------------------------- SuNCEt


def init_suncet_loss(
    local_size: int,
    temperature: float,
    world_size: int | None = None,
    device: torch.device | str | None = None,
) -> SuNCEtFn:
    """Build the SuNCEt loss for ``local_size`` labelled rows per rank.

    ``z`` (``[M, D]``) and ``labels`` (``[M]``, integer class ids) are gathered
    from all ranks in rank order (``z`` keeping gradients, ``labels`` with a
    plain all_gather). For each global anchor ``i``, with cosine similarities
    ``s_ij``::

        l_i = -log( sum_{j != i, y_j = y_i} exp(s_ij/t) / sum_{k != i} exp(s_ik/t) )

    computed as a difference of two float32 ``logsumexp``s with ``-inf``
    masks. An anchor whose class has no other row in the gathered batch has an
    empty numerator (``l_i = inf``); such anchors are left out of the mean
    (they still act as negatives for the others). The result is the mean of
    ``l_i`` over the remaining anchors, identical on every rank.

    The closure never waits for the device: anchors are weighted 1/0 in a
    masked mean (no boolean indexing, no host check). A batch where no anchor
    has a partner gives NaN (0/0), which the training step treats as a
    non-finite loss; ``PretrainConfig.validate`` refuses the shapes that
    allow it (fewer than two rows per class and step), and the one-call
    ``suncet`` raises ``ValueError`` for it.
    """
    if isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 1:
        raise ValueError(f"local_size must be an integer >= 1, got {local_size!r}")
    inv_t = 1.0 / _check_temperature(temperature)
    world = _world_size(world_size)
    rows = local_size * world
    self_mask = torch.eye(rows, dtype=torch.bool, device=device)

    def loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_embeddings(z, "suncet")
        if z.shape[0] != local_size:
            raise ValueError(f"suncet: expected {local_size} rows, got {z.shape[0]}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (local_size,):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"suncet: labels must have shape ({local_size},) to match z, got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"suncet: labels must be integer class ids, got {labels.dtype}")
        if z.device != self_mask.device:
            raise ValueError(f"suncet: z is on {z.device} but the loss was built for {self_mask.device}")
        # 1. normalise and gather rows; gather labels (no gradient)
        zg = _normalize_and_gather(z)
        yg = all_gather_no_grad(labels.to(z.device))
        _check_gathered("suncet", zg.shape[0], rows, world)
        # 2. same-class partners of each anchor, the anchor itself excluded
        same = (yg[:, None] == yg[None, :]) & ~self_mask
        has_partner = same.any(dim=1)
        # 3. per-anchor loss; an anchor without a partner gets a dummy finite
        #    numerator (all rows), so that its zero weight gives zero gradients, not NaN
        logits = (zg @ zg.T) * inv_t
        numerator = same | ~has_partner[:, None]
        log_den = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)
        log_num = torch.logsumexp(logits.masked_fill(~numerator, float("-inf")), dim=1)
        # 4. mean over the anchors with a partner (device-side count: no host sync)
        weight = has_partner.to(logits.dtype)
        return ((log_den - log_num) * weight).sum() / weight.sum()

    return loss


def suncet(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SuNCEt of ``z`` (``[M, D]``) with class ids ``labels`` (``[M]``); see
    ``init_suncet_loss``. Returns a float32 (or float64) scalar, the same on
    every rank. Raises ``ValueError`` when no row has a same-class partner
    (this one-call version checks on the host; the closure does not)."""
    _check_embeddings(z, "suncet")
    value = init_suncet_loss(z.shape[0], temperature, device=z.device)(z, labels)
    gathered = all_gather_no_grad(labels.to(z.device))
    if gathered.unique().numel() == gathered.numel():
        raise ValueError(
            "suncet: no row has a same-class partner in the gathered batch "
            "(every class appears once); sample at least two rows per class"
        )
    return value
