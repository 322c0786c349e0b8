"""Image noise: the measure (gateway.dicom.image_noise_hu) and the study warning above NOISY_HU (gateway.ingest).

The models' false boxes grow with image noise (python -m benchmarks noise, docs/models/real-ct.md); a study
noisier than they were measured on says so in its warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from benchmarks.noise import noisy
from gateway.dicom import NOISY_HU, decode_hu, image_noise_hu, read_headers, to_grid
from gateway.ingest import load_study, study_noise_hu
from tests.gateway_dicom_factory import chest_like, ct_dataset, to_bytes

EDGE = Path(__file__).parents[1].parent / "shared" / "data" / "dicom-edge-cases"
NEMA = "dwv/nema-ct1_jpll.dcm"


@pytest.mark.parametrize("sigma", [10, 30, 60, 90])
def test_the_measure_reads_the_noise_of_uniform_tissue(sigma: int) -> None:
    rng = np.random.default_rng(sigma)
    white = 40 + rng.normal(0, sigma, (256, 256))
    textured = ndimage.gaussian_filter(rng.normal(0, 1, (256, 256)), 0.8)
    textured = 40 + sigma * textured / textured.std()
    assert 0.7 * sigma < image_noise_hu(white.astype(np.int16)) < 0.95 * sigma  # the 25th percentile: ~0.8
    assert 0.55 * sigma < image_noise_hu(textured.astype(np.int16)) < 0.95 * sigma


def test_flat_tissue_and_air_are_not_measured() -> None:
    """Air alone: no measure. The flat body wall to_grid puts around a cut field of view is not read as a noiseless
    image: the noisy tissue beside it is what counts."""
    assert image_noise_hu(np.full((128, 128), -1000, np.int16)) is None
    hu = np.full((256, 256), 30.0)
    hu[:, 128:] += np.random.default_rng(0).normal(0, 50, (256, 128))
    assert 35 < image_noise_hu(hu.astype(np.int16)) < 50


def test_the_study_measure_is_the_median_of_slices_spread_over_the_middle() -> None:
    levels = [0, 10, 20, 80, 90, 100, 200]  # probes at 1/4, 1/2, 3/4 of 7 slices: 10... 80 ... 100
    rng = np.random.default_rng(1)
    slices = [(40 + rng.normal(0, s, (96, 96))).astype(np.int16) if s else np.full((96, 96), -1000, np.int16)
              for s in levels]
    got = study_noise_hu(lambda i: slices[i], len(slices))
    assert got is not None and 0.7 * 80 < got < 0.95 * 80
    assert study_noise_hu(lambda i: np.full((64, 64), -1000, np.int16), 4) is None


def _study(extra_sigma: float) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(7)
    files = []
    for i in range(5):
        hu = chest_like(512, 512, seed=i).astype(np.float32)
        hu = np.clip(np.rint(hu + rng.normal(0, extra_sigma, hu.shape)), -1024, 3071).astype(np.int16)
        files.append((f"s{i}.dcm", to_bytes(ct_dataset(hu, position=(0.0, 0.0, float(i)), instance_number=i + 1,
                                                       study_uid="2.25.7", series_uid="2.25.8"))))
    return files


def test_a_noisy_study_is_warned_about_and_a_usual_one_is_not() -> None:
    """chest_like's own noise is 15 HU (white); 60 HU more puts the study above NOISY_HU. Seen failing with the
    warning removed."""
    def noise_warnings(extra: float) -> list[str]:
        return [w for w in load_study(_study(extra)).warnings if w.startswith("Image noise")]

    assert noise_warnings(0.0) == []
    (warning,) = noise_warnings(60.0)
    assert f"above the {NOISY_HU:.0f} HU" in warning


@pytest.mark.skipif(not (EDGE / NEMA).is_file(), reason=f"{EDGE / NEMA} absent: the shared DICOM edge cases")
def test_the_threshold_lies_between_30_and_60_hu_added_to_a_real_chest() -> None:
    """The real NEMA CT1 chest slice on the grid: its own noise and 30 HU more (where the models' false boxes did not
    grow) read under NOISY_HU; 60 HU more, white or textured (where they grew), above it."""
    ds, headers = read_headers("nema.dcm", (EDGE / NEMA).read_bytes())
    hu, spacing = decode_hu(ds, headers, NEMA)[0], headers[0].pixel_spacing
    rng = np.random.default_rng(0)

    def measured(sigma: float, corr: float) -> float:
        value = image_noise_hu(to_grid(noisy(hu, sigma, corr, rng), spacing=spacing)[0])
        assert value is not None
        return value

    assert measured(0, 0.0) < measured(30, 0.0) < NOISY_HU and measured(30, 0.8) < NOISY_HU
    assert measured(60, 0.0) > NOISY_HU and measured(60, 0.8) > NOISY_HU
