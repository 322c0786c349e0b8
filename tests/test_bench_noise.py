"""benchmarks.noise's added noise: the strength and texture its figure names (docs/models/real-ct.md)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.noise import TEXTURES, noisy


def _neighbour_corr(x: np.ndarray) -> float:
    c = x - x.mean()
    return float((c[:, 1:] * c[:, :-1]).mean() / (c * c).mean())


@pytest.mark.parametrize("sigma", [30, 90])
def test_the_added_noise_has_the_named_strength_and_texture(sigma: int) -> None:
    hu = np.full((256, 256), -800, np.int16)  # lung: no clipping at -1024 for these strengths
    white = noisy(hu, sigma, TEXTURES["white"], np.random.default_rng(0)).astype(np.float64) - hu
    textured = noisy(hu, sigma, TEXTURES["textured"], np.random.default_rng(0)).astype(np.float64) - hu
    for n in (white, textured):
        assert abs(n.std() - sigma) < 0.05 * sigma, n.std()
    assert abs(_neighbour_corr(white)) < 0.05 < 0.5 < _neighbour_corr(textured)


def test_the_noisy_slice_is_stored_as_a_scanner_stores_it() -> None:
    hu = np.array([[-1024, 3071], [0, 40]] * 64, np.int16)
    out = noisy(hu, 200, 0.0, np.random.default_rng(1))
    assert out.dtype == np.int16 and out.min() >= -1024 and out.max() <= 3071
    np.testing.assert_array_equal(noisy(hu, 0, 0.8, np.random.default_rng(1)), hu)  # no noise: the slice itself
