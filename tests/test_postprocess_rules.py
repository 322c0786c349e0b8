"""The post-processing's rules against plain, slow restatements of them (ctscreen/postprocess.py,
ctscreen/lungs.py).

The serving path computes region scores, a valid-area region's share on the lung field and the lung
field's coarse seed with shortcuts (sums over the foreground only, 32-bit words of four pixels); these
tests hold the shortcuts to the rules as written, on random maps of the serving size and odd sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctscreen.contracts import EMPTY_BOX, MIN_LUNG_SHARE
from ctscreen.lungs import any_per_cell
from ctscreen.postprocess import regions, valid_area_box

EIGHT = np.ones((3, 3), bool)


def _blobby(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A probability map with regions of many sizes (smoothed noise), values in [0, 1)."""
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=rng.uniform(1.5, 6.0))
    return ((noise - noise.min()) / (np.ptp(noise) + 1e-9) * 0.999).astype(np.float32)


def _slow_regions(prob: np.ndarray, cutoff: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    labels, n = ndimage.label(prob >= cutoff, structure=EIGHT)
    boxes, scores = [], []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        if (box[2] - box[0] + 1) * (box[3] - box[1] + 1) > min_area:
            boxes.append(box)
            scores.append(prob[labels == i].astype(np.float64).mean())
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32)


def _slow_valid_area(prob: np.ndarray, lungs: np.ndarray, cutoff: float, min_area: int) -> np.ndarray:
    labels, n = ndimage.label(prob >= cutoff, structure=EIGHT)
    kept = []
    for i in range(1, n + 1):
        region = labels == i
        ys, xs = np.nonzero(region)
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        big = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) > min_area
        if big and (region & lungs).sum() >= MIN_LUNG_SHARE * region.sum():
            kept.append(box)
    if not kept:
        return np.array(EMPTY_BOX, np.float32)
    b = np.array(kept)
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()], np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(512, 512), (97, 130)])
def test_region_scores_are_the_mean_probability_of_each_region(seed, shape):
    rng = np.random.default_rng(seed)
    prob = _blobby(rng, shape)
    cutoff = float(rng.uniform(0.4, 0.8))
    boxes, scores = regions(prob, cutoff, 25)
    want_boxes, want_scores = _slow_regions(prob, cutoff, 25)
    assert len(boxes) == len(want_boxes) > 0
    np.testing.assert_array_equal(boxes, want_boxes)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_valid_area_keeps_the_regions_that_lie_on_the_lung_field(seed):
    rng = np.random.default_rng(100 + seed)
    prob = _blobby(rng, (512, 512))
    lungs = _blobby(rng, (512, 512)) > 0.5
    lungs[:, 300:] = False  # no lung on the right: regions there must not count
    got = valid_area_box(prob, 0.6, 25, lungs)
    np.testing.assert_array_equal(got, _slow_valid_area(prob, lungs, 0.6, 25))
    assert not np.array_equal(got, valid_area_box(prob, 0.6, 25))  # the lung field mattered
    np.testing.assert_array_equal(valid_area_box(prob, 0.6, 25, lungs.astype(np.uint8)), got)  # a 0/1 mask too


@pytest.mark.parametrize("shape", [(512, 512), (128, 64), (9, 8), (510, 509), (13, 4)])
@pytest.mark.parametrize("step", [2, 4, 5])
def test_coarse_seed_marks_every_cell_holding_a_pixel(shape, step):
    rng = np.random.default_rng(sum(shape) + step)
    mask = rng.random(shape) > 0.995
    rows, cols = np.nonzero(mask)
    want = np.zeros((-(-shape[0] // step), -(-shape[1] // step)), bool)
    want[rows // step, cols // step] = True
    np.testing.assert_array_equal(any_per_cell(mask, step), want)
    assert want.shape == mask[::step, ::step].shape
