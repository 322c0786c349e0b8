"""The MONAI Deploy App SDK peer: a screening app whose models are the SDK's own Triton client.

Runs **inside the peer's virtual environment** (``scripts/setup_monai_peer.sh`` makes ``.venv-monai``:
monai-deploy-app-sdk 4.0.0 needs ``tritonclient[all]>=2.53`` and numpy 2, ctscreen pins tritonclient
2.51.0, whose wheel ships perf_analyzer, and numpy < 2), started by :mod:`benchmarks.monai_sdk`.

What it does, the way an app built on the SDK does it:

* the client workspace is a model folder per model with its ``config.pbtxt`` (fetched from the Triton
  serving it: an app ships the same files), loaded by the SDK's ``AppContext`` (``ModelFactory`` ->
  ``NamedModel`` of ``TritonModel``), each connected to the server (``TritonModel.connect``);
* a study's DICOM files are read with pydicom and sorted into an HU volume along the slice normal, as the
  SDK's ``DICOMSeriesToVolumeOperator`` does (:func:`benchmarks.dicom_volume.decode_series`);
* every slice goes, as a torch tensor ``[1, 1, 512, 512]``, through the SDK's
  ``TritonRemoteModel.__call__`` of ``valid_area`` and then of ``lesion``: one synchronous HTTP request
  each, input as JSON, the one output (``PROB``) binary, returned as a torch tensor. The SDK's client
  sends one input and asks for one output, so it cannot call the ``ct_screen`` ensemble (three outputs);
  it calls the two segmentation models the ensemble is made of, and the app post-processes in process
  (``ctscreen.postprocess.postprocess_batch``) and applies the case rule (``aggregator.case.decide``);
* studies run one after another (one app instance).

Output: one JSON line per study on stdout (slices, decode_s, infer_s, post_s, wall_s, verdict) and a last
line ``{"summary": ...}``.

    .venv-monai/bin/python benchmarks/monai_sdk_app.py --netloc 127.0.0.1:8000 STUDY_DIR [STUDY_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the checkout's ctscreen, aggregator, benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ("valid_area", "lesion")


def client_workspace(netloc: str, folder: Path) -> Path:
    """``folder/<model>/config.pbtxt`` for each model, from the server's own configs (what an app ships)."""
    import tritonclient.http as httpclient
    from google.protobuf import json_format, text_format
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    client = httpclient.InferenceServerClient(url=netloc)
    try:
        for name in MODELS:
            cfg = json_format.ParseDict(client.get_model_config(name), ModelConfig(), ignore_unknown_fields=True)
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    finally:
        client.close()
    return folder


def connect(netloc: str, workspace: Path) -> dict[str, Any]:
    """The SDK's ``TritonRemoteModel`` of each model, loaded and connected by the SDK's ``AppContext``."""
    from monai.deploy.core import AppContext

    ctx = AppContext({"model": str(workspace), "triton_server_netloc": netloc})
    if ctx.models is None:
        raise RuntimeError(f"the SDK found no model under {workspace}")
    return {name: ctx.models.get(name).predictor for name in MODELS}


def screen(models: dict[str, Any], files: list[tuple[str, bytes]]) -> dict[str, object]:
    """One study: decode, two SDK calls per slice, post-processing, case rule; times of each part."""
    import numpy as np
    import torch

    from aggregator.case import CaseRule, SliceInput, decide
    from benchmarks.dicom_volume import decode_series
    from ctscreen.postprocess import postprocess_batch, unpack_outputs

    t0 = time.perf_counter()
    hu, meta = decode_series(files)
    t_decode = time.perf_counter() - t0
    t_infer = t_post = 0.0
    inputs = []
    for i, (uid, pos) in enumerate(meta):
        t1 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(hu[i][None, None]))
        valid = models["valid_area"](x)
        lesion = models["lesion"](x)
        t2 = time.perf_counter()
        (out,) = unpack_outputs(*postprocess_batch(valid.cpu().numpy(), lesion.cpu().numpy(), x.numpy()))
        inputs.append(SliceInput(uid, pos, out.boxes, out.valid_area))
        t_infer += t2 - t1
        t_post += time.perf_counter() - t2
    t3 = time.perf_counter()
    verdict = decide(inputs, CaseRule()).verdict
    t_post += time.perf_counter() - t3
    return {"slices": len(hu), "decode_s": round(t_decode, 3), "infer_s": round(t_infer, 3),
            "post_s": round(t_post, 3), "wall_s": round(time.perf_counter() - t0, 3), "verdict": verdict}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("monai-deploy-app-sdk", "tritonclient", "numpy", "torch", "pydicom"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.studies import dicom_files

    p = argparse.ArgumentParser(prog="monai_sdk_app", description=__doc__.split("\n\n")[0])
    p.add_argument("--netloc", required=True, help="Triton HTTP host:port")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop after the study that passes this")
    p.add_argument("studies", nargs="+", type=Path, help="folders of DICOM files, one study each")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="monai-sdk-models-") as tmp:
        models = connect(args.netloc, client_workspace(args.netloc, Path(tmp)))
        t0 = time.perf_counter()
        runs = []
        for folder in args.studies:
            files = [(f.name, f.read_bytes()) for f in dicom_files(folder)]
            runs.append({"study": folder.name, **screen(models, files)})
            print(json.dumps(runs[-1]), flush=True)
            if time.perf_counter() - t0 > args.max_seconds:
                break
        wall = time.perf_counter() - t0
    slices = sum(r["slices"] for r in runs)
    print(json.dumps({"summary": {"studies": len(runs), "slices": slices, "wall_s": round(wall, 3),
                                  "studies_per_hour": round(len(runs) / wall * 3600, 2),
                                  "slices_per_s": round(slices / wall, 3), "versions": _versions()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
