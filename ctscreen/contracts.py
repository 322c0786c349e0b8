"""Contracts shared by every layer: tensor names, shapes, model names and paper defaults.

Everything that crosses a process boundary (ONNX graph, Triton config, gRPC request) is named here
once, and the tests check ``model_repository/*/config.pbtxt`` and the exported ONNX files against it.

Wire format
-----------
``HU_SLICES``      INT16 [B, 1, 512, 512]  Hounsfield units, raw (no windowing; the graph does it).
``PROB``           FP32  [B, 1, 512, 512]  probability map; output of ``valid_area`` and ``lesion``,
                                           never leaves Triton.
``LESION_BOXES``   FP32  [B, K, 5]         (x0, y0, x1, y1, score) per box, 512-pixel coordinates,
                                           inclusive pixel indices; rows past ``BOX_COUNT`` are padding
                                           (all ``-1``); K >= 1 so the tensor is never empty.
``BOX_COUNT``      INT32 [B, 1]            number of real rows in ``LESION_BOXES`` per slice.
``VALID_AREA_BOX`` FP32  [B, 4]            (x0, y0, x1, y1) of the valid area; all ``-1`` when empty.
"""

from __future__ import annotations

from typing import Final

SLICE_SIZE: Final = 512
"""Every slice is sent to Triton at 512 x 512 (resampled by the gateway if needed)."""

# --- tensor names -----------------------------------------------------------------------------
HU_SLICES: Final = "HU_SLICES"
PROB: Final = "PROB"
VALID_PROB: Final = "VALID_PROB"  # ensemble-internal name of the valid-area map
LESION_PROB: Final = "LESION_PROB"  # ensemble-internal name of the lesion map
HU_FLOAT: Final = "HU_FLOAT"  # gpu profile, ensemble-internal: HU as FP32 (TensorRT has no INT16)
LESION_BOXES: Final = "LESION_BOXES"
BOX_COUNT: Final = "BOX_COUNT"
VALID_AREA_BOX: Final = "VALID_AREA_BOX"

# --- model names ------------------------------------------------------------------------------
VALID_AREA_MODEL: Final = "valid_area"
LESION_MODEL: Final = "lesion"
POSTPROCESS_MODEL: Final = "postprocess"
ENSEMBLE_MODEL: Final = "ct_screen"
FUSED_MODEL: Final = "ct_screen_fused"
"""cpu profile: the ensemble's inputs and outputs, its three steps run in one python stub per instance."""
HU_CAST_MODEL: Final = "hu_cast"  # gpu profile only: INT16 -> FP32 in front of the TensorRT plans
SEGMENTATION_MODELS: Final = (VALID_AREA_MODEL, LESION_MODEL)

# --- request priority -------------------------------------------------------------------------
PRIORITY_LEVELS: Final = 2
"""Priority levels of the ensemble's models (``dynamic_batching.priority_levels``; the cpu profile's fused model
has none, docs/triton.md says why): a request of level 1
(an urgent study's) is scheduled before every waiting request of level 2 (every other study's, also the level of
a request that names none). Triton passes an ensemble request's level to its steps. A low study is claimed after
the routine ones but, once screened, is not held behind them: a level of its own would starve it (and the worker
slot it holds) for as long as routine studies keep batches waiting, which a busy gateway always does."""
DEFAULT_PRIORITY_LEVEL: Final = 2
"""The level of a request that names none (a client other than the gateway: perf_analyzer, a peer)."""

# --- paper defaults (Chen et al., Sci Rep 2020, 10:19196) --------------------------------------
PROB_CUTOFF: Final = 0.50
"""A pixel (and a region) counts when its probability is >= this."""

MIN_BOX_AREA: Final = 25
"""A box counts when it covers strictly more than this many pixels (512-pixel grid)."""

MIN_LUNG_SHARE: Final = 0.05
"""ctscreen's addition to the paper: a valid-area region counts only when at least this share of its
pixels lies on the slice's classical lung field (:func:`ctscreen.lungs.coarse_lung_field`). A chest's
lung-field region overlaps it by 0.55-0.65 (the region also spans the mediastinum), a region at the
apex or the bases by 0.1-0.3 (the coarse field sees part of a small lung); bowel gas, a kidney and the
air on the CT table of a real abdomen slice by 0."""

RUN_SLICES: Final = 3
"""A study is positive when this many consecutive slices have a lesion in the same quadrant."""

PADDING_ROW: Final = (-1.0, -1.0, -1.0, -1.0, -1.0)
EMPTY_BOX: Final = (-1.0, -1.0, -1.0, -1.0)
