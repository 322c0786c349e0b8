"""Analytic stand-ins for the two segmentation graphs, with answers known in advance (tests only).

They honour the wire contract (``HU_SLICES`` INT16 [B,1,512,512] -> ``PROB`` FP32 [B,1,512,512]) but
compute a smooth HU band instead of a trained UNet++:

* valid_area: ``sigmoid((hu + 980) / 20) * sigmoid((-400 - hu) / 20)``: aerated lung (about -850 HU);
* lesion: ``sigmoid((hu + 600) / 30) * sigmoid((100 - hu) / 30)``: ground glass and consolidation;

each followed by a 5 x 5 average pool. So :func:`known_slice` has a known number of lesion boxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctscreen.contracts import HU_SLICES, LESION_MODEL, PROB, SLICE_SIZE, VALID_AREA_MODEL

BANDS = {VALID_AREA_MODEL: (-980.0, -400.0, 20.0), LESION_MODEL: (-600.0, 100.0, 30.0)}


def write_analytic_models(root: Path) -> Path:
    """Write ``<root>/<model>/1/model.onnx`` for both segmentation models; return ``root``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    for name, (lo, hi, soft) in BANDS.items():
        nodes = [
            helper.make_node("Cast", [HU_SLICES], ["hu"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["hu", "lo"], ["a0"]),
            helper.make_node("Div", ["a0", "soft"], ["a1"]),
            helper.make_node("Sigmoid", ["a1"], ["a"]),
            helper.make_node("Sub", ["hi", "hu"], ["b0"]),
            helper.make_node("Div", ["b0", "soft"], ["b1"]),
            helper.make_node("Sigmoid", ["b1"], ["b"]),
            helper.make_node("Mul", ["a", "b"], ["m"]),
            helper.make_node(
                "AveragePool", ["m"], [PROB], kernel_shape=[5, 5], pads=[2, 2, 2, 2], count_include_pad=0
            ),
        ]
        consts = [
            numpy_helper.from_array(np.array(v, np.float32), k)
            for k, v in (("lo", lo), ("hi", hi), ("soft", soft))
        ]
        shape = ["B", 1, SLICE_SIZE, SLICE_SIZE]
        graph = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info(HU_SLICES, TensorProto.INT16, shape)],
            [helper.make_tensor_value_info(PROB, TensorProto.FLOAT, shape)],
            consts,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
        model.ir_version = 8
        onnx.checker.check_model(model)
        out = root / name / "1" / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out))
    return root


KNOWN_BOXES = 2
"""Lesion boxes :func:`known_slice` yields: 2 big blobs in the lungs; the tiny one (16 px <= 25) and
the one outside the lungs do not count."""


def known_slice() -> np.ndarray:
    """One INT16 slice [1, 512, 512]: air, a body (200 HU) holding two lung fields, four -300 HU blobs."""
    hu = np.full((1, SLICE_SIZE, SLICE_SIZE), -1000, np.int16)
    hu[0, 90:410, 50:470] = 200  # the body (outside both bands): lungs lie inside it (lung-field check)
    hu[0, 120:380, 80:240] = -850  # right lung
    hu[0, 120:380, 280:440] = -850  # left lung
    hu[0, 160:180, 120:140] = -300  # 20 x 20 blob in the right lung
    hu[0, 300:316, 330:346] = -300  # 16 x 16 blob in the left lung
    hu[0, 250:254, 150:154] = -300  # 4 x 4 blob: too small
    hu[0, 30:50, 30:50] = -300  # outside the valid area
    return hu
