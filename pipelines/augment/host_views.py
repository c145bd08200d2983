"""The planned views of one decoded image, made on the host: the torch backend's augmentation.

One decode, then for every view of every group: the planned crop box
(``pipelines.augment.draws``) cut and resized by PIL (bilinear with
antialiasing, as torchvision's ``RandomResizedCrop``), and the planned flip
and colour applied in place by the compiled kernel
(``pipelines.augment.colour_kernels.finish_view``) on uint8. The loader
normalises whole batches afterwards (``batched.normalize_only``). This is
what solo-learn's PIL pipeline does per view, with the colour ops fused into
few passes and nothing converted to float in the worker.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from pipelines.augment.colour_kernels import finish_view
from pipelines.augment.draws import draw_rows, recipe_vector
from pipelines.augment.recipe import ViewGroup


class PlannedViews:
    """``groups``' views of one image from its image seed (see ``pipelines.plan``): a list with
    one uint8 ``[count, r, r, 3]`` array per group. ``first_view`` numbers the first view
    (``draws`` module docstring); ``colour=False`` leaves jitter, grayscale, blur and solarize to
    the training device."""

    def __init__(self, groups: Sequence[ViewGroup], first_view: int = 0, colour: bool = True):
        self.groups, self.first_view, self.colour = tuple(groups), first_view, colour
        self.vectors = [recipe_vector(g.recipe) for g in self.groups]  # built once, read per image

    def __call__(self, image: Image.Image, seed: int) -> list[np.ndarray]:
        width, height = image.size
        seeds = np.array([seed], dtype=np.uint64)
        heights, widths = np.array([height], np.int64), np.array([width], np.int64)
        out, first = [], self.first_view
        for group, vector in zip(self.groups, self.vectors):
            r = group.resolution
            boxes, colour = draw_rows(seeds, first, group.count, heights, widths, vector)
            views = np.empty((group.count, r, r, 3), np.uint8)
            for v in range(group.count):
                top, left, h, w = (int(x) for x in boxes[v])
                crop = image.resize((r, r), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
                views[v] = np.asarray(crop)
                finish_view(views[v], colour[v], group.recipe.blur_kernel_size, self.colour)
            out.append(views)
            first += group.count
        return out
