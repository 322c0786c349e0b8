"""Nets, training loop, ONNX export and the shipped model files.

The shipped-file tests need only onnx/onnxruntime (the serving path); the rest need torch and are
marked ``torch``. Torch tests use a tiny UNet++ at 64 x 64 so they stay fast on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ctscreen import contracts as c
from training.card import sha256_of

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {m: ROOT / "model_repository" / m / "1" / "model.onnx" for m in c.SEGMENTATION_MODELS}


# --- shipped files (no torch) ------------------------------------------------------------------


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("model", c.SEGMENTATION_MODELS)
def test_shipped_onnx_matches_the_wire_contract(model):
    proto = onnx.load(str(SHIPPED[model]))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == c.HU_SLICES and inp.type.tensor_type.elem_type == onnx.TensorProto.INT16
    assert out.name == c.PROB and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for vi in (inp, out):
        dims = _dims(vi)
        assert isinstance(dims[0], str) and dims[0], "batch dimension must be dynamic (a dim_param)"
        assert dims[1:] == [1, c.SLICE_SIZE, c.SLICE_SIZE]
    # The Triton repository builder applies the same check.
    from ctscreen.repo import check_onnx

    check_onnx(SHIPPED[model])


@pytest.mark.parametrize("model", c.SEGMENTATION_MODELS)
def test_shipped_onnx_runs_any_batch_and_returns_probabilities(model):
    sess = ort.InferenceSession(str(SHIPPED[model]), providers=["CPUExecutionProvider"])
    hu = np.full((3, 1, c.SLICE_SIZE, c.SLICE_SIZE), -1000, np.int16)
    hu[1, 0, 150:350, 100:400] = -800
    hu[2, 0] = 40
    (prob,) = sess.run([c.PROB], {c.HU_SLICES: hu})
    assert prob.shape == (3, 1, c.SLICE_SIZE, c.SLICE_SIZE) and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))
    (one,) = sess.run([c.PROB], {c.HU_SLICES: hu[1:2]})
    np.testing.assert_allclose(one[0], prob[1], atol=1e-5)


@pytest.fixture(scope="module")
def phantom_slice() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu, lung, lesion)`` of the phantom slice with the largest lesion (seed 11 is in no training set)."""
    import phantom

    study = phantom.make_study(seed=11, kind="covid", n_slices=12, matrix=c.SLICE_SIZE)
    k = int(np.argmax(study.lesion_mask.reshape(len(study.hu), -1).sum(1)))
    return study.hu[k].astype(np.int16), study.lung_mask[k], study.lesion_mask[k]


@pytest.mark.parametrize("model", c.SEGMENTATION_MODELS)
def test_shipped_onnx_finds_what_it_was_trained_for(model, phantom_slice):
    """The shipped weights are trained: random ones pass the test above, not this one."""
    hu, lung, lesion = phantom_slice
    sess = ort.InferenceSession(str(SHIPPED[model]), providers=["CPUExecutionProvider"])
    (prob,) = sess.run([c.PROB], {c.HU_SLICES: hu[None, None]})
    prob = prob[0, 0]
    if model == c.VALID_AREA_MODEL:  # target: the filled bounding rectangle of the lungs
        rows, cols = np.nonzero(lung)
        rect = np.zeros_like(lung)
        rect[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        found = prob > 0.5
        assert (found & rect).sum() / (found | rect).sum() > 0.85  # 0.94 with version 2.0.0
    else:  # lesion: high on the phantom's GGO, low on the lesion-free lung
        assert prob[lesion].mean() > 0.4 and prob[lung & ~lesion].mean() < 0.05  # 0.69 and 0.009 (2.0.0)


@pytest.mark.parametrize("model", c.SEGMENTATION_MODELS)
def test_shipped_model_card_matches_the_file(model):
    card = json.loads((SHIPPED[model].parent / "model_card.json").read_text())
    assert card["name"] == model
    assert card["sha256"] == sha256_of(SHIPPED[model])
    assert card["size_bytes"] == SHIPPED[model].stat().st_size
    assert card["inputs"][0]["name"] == c.HU_SLICES and card["outputs"][0]["name"] == c.PROB
    for key in ("version", "profile", "architecture", "training", "metrics"):
        assert key in card
    md = (SHIPPED[model].parent / "model_card.md").read_text()
    assert card["sha256"] in md


def test_shipped_onnx_fit_the_size_budget():
    assert sum(p.stat().st_size for p in SHIPPED.values()) <= 30 * 1024 * 1024


# --- torch -------------------------------------------------------------------------------------


def _tiny_spec():
    from training.nets import NetSpec

    return NetSpec("mobilenet_v2", 3, (16, 8, 8), 64)


def _volumes(n: int = 2, z: int = 6):
    """Synthetic volumes: a dark lung rectangle, a GGO square on some slices, an air 'bubble' finding."""
    from training.datasets import Volume

    rng = np.random.default_rng(7)
    out = []
    for v in range(n):
        hu = np.full((z, 512, 512), -1000, np.int16)
        hu[:, 60:460, 40:470] = 30  # body
        lesion = np.zeros(hu.shape, bool)
        boxes = np.full((z, 4), -1, np.int32)
        finding = [""] * z
        for i in range(z):
            hu[i, 120:380, 80 + 8 * v : 430] = -850
            boxes[i] = (80 + 8 * v, 120, 429, 379)
            if i % 2 == 0:
                y, x = rng.integers(150, 300, 2)
                lesion[i, y : y + 48, x : x + 48] = True
                hu[i][lesion[i]] = -450
            elif i % 3 == 0:
                hu[i, 400:440, 300:360] = -1000
                finding[i] = "stomach_bubble"
        out.append(Volume(f"syn{v}", hu, lesion, boxes, finding, kind="covid"))
    return out


@pytest.mark.torch
def test_a_few_training_steps_lower_the_loss(request):
    torch = pytest.importorskip("torch")
    from training.datasets import SliceBank
    from training.nets import HUSegmenter
    from training.train import bce_dice_loss

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, more OpenMP threads than free cores is 10x slower
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    bank = SliceBank("lesion", 64, _volumes(1))
    hu = torch.from_numpy(bank.hu[:, None]).float()
    tgt = torch.from_numpy(bank.target.astype(np.float32))
    model = HUSegmenter(_tiny_spec())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = bce_dice_loss(model.logits(hu), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.torch
def test_train_writes_checkpoints_and_resumes(tmp_path):
    pytest.importorskip("torch")
    from training.train import TrainConfig, train

    cfg = TrainConfig(task="lesion", out=tmp_path, steps=4, batch=2, val_every=2, spec=_tiny_spec(),
                      progress=False, threads=1)
    vols = _volumes(2, z=4)
    first = train(cfg, train_volumes=vols[:1], val_volumes=vols[1:])
    assert first["steps"] == 4
    assert {p.name for p in tmp_path.iterdir()} >= {"last.ckpt", "best.ckpt", "history.json"}
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 4] and "val_loss" in hist[0]
    cfg.steps, cfg.resume = 6, True
    second = train(cfg, train_volumes=vols[:1], val_volumes=vols[1:])
    assert second["steps"] == 6
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 4, 6]


@pytest.mark.torch
def test_export_parity_dynamic_batch_and_card(tmp_path):
    torch = pytest.importorskip("torch")
    from training.export import export_checkpoint, export_onnx, parity
    from training.nets import HUSegmenter

    torch.manual_seed(0)
    model = HUSegmenter(_tiny_spec()).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    hu = np.random.default_rng(1).integers(-1100, 300, (3, 1, 512, 512)).astype(np.int16)
    assert parity(model, path, hu) <= 1e-3
    # a checkpoint round trip through export_checkpoint writes the card beside the file
    from training.nets import NetSpec  # noqa: F401  (spec is stored as a dict)

    ckpt = {"task": "lesion", "profile": "lite", "spec": model.spec.to_dict(), "model": model.state_dict(),
            "step": 3, "training": {"source": "synthetic"}}
    torch.save(ckpt, tmp_path / "x.ckpt")
    info = export_checkpoint(task="lesion", checkpoint=tmp_path / "x.ckpt", out=tmp_path / "out" / "model.onnx")
    assert info["parity"] <= 1e-3
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["sha256"] == sha256_of(tmp_path / "out" / "model.onnx")
    assert card["trained"] is True and card["training"]["source"] == "synthetic"
    with pytest.raises(ValueError, match="not 'valid_area'"):
        export_checkpoint(task="valid_area", checkpoint=tmp_path / "x.ckpt", out=tmp_path / "y.onnx")


def test_cli_rejects_bad_arguments(capsys):
    from training.cli import export_main, train_main

    for argv in (["bogus"], ["lesion", "--profile", "huge"], ["lesion", "--steps", "0"],
                 ["lesion", "--data", "kaggle"], ["lesion", "--arch", "mobilenet_v2:4:48,32"],
                 ["lesion", "--arch", "mobilenet_v2:x:1"], ["lesion", "--arch", "mobilenet_v2:1:8@300"]):
        with pytest.raises(SystemExit) as exc:
            train_main(argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        export_main(["lesion"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        export_main(["lesion", "--checkpoint", "/nonexistent.ckpt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no such file" in err
    assert "needs 4 positive decoder widths" in err and "must look like ENCODER:DEPTH" in err
    assert "must divide 512" in err


@pytest.mark.torch
def test_arch_option_trains_the_candidate_it_names(tmp_path, monkeypatch):
    """``ctscreen train --arch`` reaches the trainer as that network (capacity candidates)."""
    pytest.importorskip("torch")
    import training.train
    from training.cli import train_main
    from training.nets import NetSpec

    seen = {}
    monkeypatch.setattr(training.train, "train", lambda cfg: seen.setdefault("spec", cfg.spec) and {})
    assert train_main(["lesion", "--arch", "mobilenet_v2:3:32,16,16", "--out", str(tmp_path)]) == 0
    assert seen["spec"] == NetSpec("mobilenet_v2", 3, (32, 16, 16), 256)
    monkeypatch.setattr(training.train, "train", lambda cfg: seen.setdefault("jpeg", cfg.jpeg) and {})
    assert train_main(["lesion", "--no-jpeg", "--out", str(tmp_path)]) == 0
    assert seen["jpeg"] is False


def test_card_only_puts_quality_metrics_into_the_card(tmp_path):
    """``ctscreen export --card-only`` keeps the ONNX file and its sha256, and takes the task's part."""
    import shutil

    from training.cli import export_main

    for name in ("model.onnx", "model_card.json"):
        shutil.copy(SHIPPED[c.LESION_MODEL].parent / name, tmp_path / name)
    report = {"valid_area": {"iou_median": 0.95}, "lesion_per_slice": {"sensitivity": {"value": 0.97}},
              "false_positive_rate_by_class": {"stomach_bubble": {"value": 0.0}}, "n_studies": 42}
    (tmp_path / "q.json").write_text(json.dumps(report))
    assert export_main(["lesion", "--card-only", "--metrics", str(tmp_path / "q.json"),
                        "--out", str(tmp_path / "model.onnx")]) == 0
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["sha256"] == sha256_of(SHIPPED[c.LESION_MODEL])
    assert card["metrics"]["lesion_per_slice"]["sensitivity"]["value"] == 0.97
    assert "valid_area" not in card["metrics"] and card["metrics"]["n_studies"] == 42
    assert "0.97" in (tmp_path / "model_card.md").read_text()
    # and the limitations are today's text for the card's training data, not the text of its export
    from training.card import limitations_for

    assert card["limitations"] == limitations_for(card.get("training")) and "split by file" in card["limitations"]


@pytest.mark.torch
def test_train_on_a_nifti_set(tmp_path):
    """The one-command retraining path for a centre's own data: a NIfTI set (written with nibabel)."""
    pytest.importorskip("torch")
    from tests.test_training_data import make_nifti_set
    from training.datasets import parse_source
    from training.train import TrainConfig, train

    make_nifti_set(tmp_path / "set", n_cases=2)
    cfg = TrainConfig(task="valid_area", source=parse_source(f"nifti:{tmp_path / 'set'}"), out=tmp_path / "run",
                      steps=2, batch=2, val_every=2, spec=_tiny_spec(), progress=False, threads=1)
    result = train(cfg)
    assert result["steps"] == 2 and (tmp_path / "run" / "best.ckpt").is_file()
    import torch

    ckpt = torch.load(tmp_path / "run" / "best.ckpt", weights_only=False)
    assert ckpt["training"]["source"].startswith("nifti:") and len(ckpt["training"]["train_cases"]) == 1
    from ctscreen.machine import machine_info

    assert ckpt["training"]["code"]["commit"] == machine_info()["commit"]  # the card names the training code


@pytest.mark.torch
@pytest.mark.slow
def test_paper_profile_trains_a_few_steps_on_the_real_recipe_and_exports(tmp_path):
    """The paper profile (ResNet-50 UNet++ at 512) runs the same recipe as the lite nets (real-CT
    loaders when the data is there, phantom otherwise, hard-negative mining, pseudo-label weights) and
    exports an ONNX file that meets the wire contract. On this CPU: 3 small steps, no accuracy claim."""
    pytest.importorskip("torch")
    from training import realct
    from training.datasets import phantom_volumes
    from training.export import export_checkpoint
    from training.train import TrainConfig, train

    try:
        real = [realct.medseg_volume("train", names={"0", "1"})]
    except realct.DataError:
        real = []  # the real-CT folder is absent here: phantom only (the loaders have their own tests)
    vols = real + list(phantom_volumes(1, 123_456, n_slices=4, kinds=("covid",)))
    cfg = TrainConfig(task="lesion", profile="paper", out=tmp_path / "run", steps=3, batch=1, crop=64,
                      val_every=3, progress=False, threads=2, hard_negatives=1.0, augment=True,
                      val_slices_per_volume=1)  # one 512 validation slice: the step runs, a quarter of the time
    result = train(cfg, train_volumes=vols, val_volumes=vols[-1:])
    assert result["steps"] == 3 and np.isfinite(result["final"]["val_loss"])
    info = export_checkpoint(task="lesion", checkpoint=Path(result["last"]), out=tmp_path / "paper.onnx",
                             check_parity=False)
    proto = onnx.load(str(tmp_path / "paper.onnx"), load_external_data=False)
    assert proto.graph.input[0].name == c.HU_SLICES and proto.graph.output[0].name == c.PROB
    assert info["size_bytes"] > 100e6  # ResNet-50 encoder: the paper's network, not the lite one


@pytest.mark.torch
def test_calibration_offset_moves_the_operating_point_to_the_fixed_cutoff(tmp_path):
    """A calibration chosen on validation data (cut-off t) goes into the graph as logit(t): a pixel the
    uncalibrated net scores t scores 0.50 in the exported file, so the case rule's 0.50 stays."""
    torch = pytest.importorskip("torch")
    import dataclasses
    import math

    from training.export import export_checkpoint
    from training.nets import HUSegmenter

    torch.manual_seed(0)
    model = HUSegmenter(_tiny_spec()).eval()
    ckpt = {"task": "lesion", "profile": "lite", "spec": model.spec.to_dict(), "model": model.state_dict(),
            "step": 1, "training": {}}
    torch.save(ckpt, tmp_path / "x.ckpt")
    hu = np.random.default_rng(2).integers(-1100, 300, (1, 1, 512, 512)).astype(np.int16)
    with torch.no_grad():
        raw = model(torch.from_numpy(hu)).numpy()
    cal = {"cutoff": 0.7, "logit_offset": math.log(0.7 / 0.3)}
    export_checkpoint(task="lesion", checkpoint=tmp_path / "x.ckpt", out=tmp_path / "c.onnx", calibration=cal)
    (out,) = ort.InferenceSession(str(tmp_path / "c.onnx")).run([c.PROB], {c.HU_SLICES: hu})
    # sigmoid(z - logit(t)) >= 0.5 exactly where sigmoid(z) >= t
    np.testing.assert_allclose(out, 1 / (1 + (1 / raw - 1) * 7 / 3), atol=1e-4)
    assert ((out >= 0.5) == (raw >= 0.7)).mean() > 0.999
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["architecture"]["logit_offset"] == pytest.approx(cal["logit_offset"])
    assert card["training"]["calibration"]["cutoff"] == 0.7
    assert dataclasses.replace(model.spec).logit_offset == 0.0  # training never sees it


def test_calibration_picks_the_lowest_cutoff_that_meets_every_goal():
    from training.calibrate import choose

    def acc(hit, false, fp):
        return {"pos": 10, "hit": hit, "boxes": 20, "false": false, "slices": 20, "fp": {"tb": (fp, 50)}}

    cutoff, table = choose({0.5: acc(10, 12, 0), 0.6: acc(10, 5, 0), 0.7: acc(9, 2, 0), 0.8: acc(8, 1, 0)})
    assert cutoff == 0.6 and [r["meets"] for r in table] == [False, True, True, False]
    # none meets: the best trade-off, hard negatives weighing most
    cutoff, _ = choose({0.5: acc(10, 2, 5), 0.6: acc(9, 2, 0)})
    assert cutoff == 0.6


def test_jpeg_round_trip_degrades_with_quality() -> None:
    """The JPEG export of the augmentation: near the 8-bit window's step at quality 95, clearly worse
    at 40, and the same answer twice."""
    from training.train import jpeg_round_trip

    rng = np.random.default_rng(3)
    hu = np.full((128, 128), -850.0, np.float32)  # lung with vessels and noise
    hu[rng.random((128, 128)) < 0.05] = 40.0
    hu += rng.normal(0, 30, hu.shape).astype(np.float32)
    step = 1600 / 255
    err = {q: float(np.abs(jpeg_round_trip(hu, -1400.0, 1600.0, q) - np.clip(hu, -1400, 200)).mean())
           for q in (95, 40)}
    assert err[95] < 4 * step < err[40], err
    np.testing.assert_array_equal(jpeg_round_trip(hu, -1400.0, 1600.0, 60), jpeg_round_trip(hu, -1400.0, 1600.0, 60))


def test_augment_sends_some_exports_through_jpeg(monkeypatch) -> None:
    """Same generator seed, JPEG replaced by the identity: some items change, not all (only part of
    the batch is exported, half of that as JPEG). Seen failing with the JPEG branch removed."""
    import torch

    from training import train

    hu = torch.full((16, 1, 64, 64), -850.0)
    hu[:, :, 20:40, 20:40] = 40.0
    target = torch.zeros((16, 1, 64, 64))
    with_jpeg, _ = train.augment(hu.clone(), target.clone(), torch.Generator().manual_seed(5))
    monkeypatch.setattr(train, "jpeg_round_trip", lambda x, lo, width, quality: x)
    without, _ = train.augment(hu.clone(), target.clone(), torch.Generator().manual_seed(5))
    changed = [i for i in range(16) if not torch.equal(with_jpeg[i], without[i])]
    assert 0 < len(changed) < 16, changed


def test_augment_without_jpeg_draws_nothing_for_it(monkeypatch) -> None:
    """``jpeg=False`` (``ctscreen train --no-jpeg``): no JPEG, and the generator ends where the augmentation
    of version 2.0.0 left it (it drew nothing for JPEG), so a 2.0.0 recipe replays its random stream."""
    import torch

    from training import train

    def refuse(*_args):
        raise AssertionError("JPEG round trip with jpeg=False")

    hu, target = torch.full((8, 1, 64, 64), -850.0), torch.zeros((8, 1, 64, 64))
    plain, with_jpeg = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    train.augment(hu.clone(), target.clone(), with_jpeg)
    monkeypatch.setattr(train, "jpeg_round_trip", refuse)
    train.augment(hu.clone(), target.clone(), plain, jpeg=False)
    assert torch.rand(1, generator=plain) != torch.rand(1, generator=with_jpeg)  # it drew less


def test_augment_textures_the_noise_of_some_slices_only_when_asked() -> None:
    """``--textured-noise``: about half of a batch gets noise correlated between neighbouring pixels (as a
    reconstruction kernel makes low-dose CT noise); without it only the softer kernel (p 0.3) correlates
    neighbours, and the generator draws nothing for the choice (an older recipe replays its random stream).
    Seen failing with the textured branch removed."""
    import torch

    from training import train

    def correlated(x: torch.Tensor) -> int:  # slices whose left-right neighbours' noise correlates above 0.5
        c = x[:, 0, 16:48, 16:48]
        c = c - c.mean(dim=(1, 2), keepdim=True)
        return sum(float((s[:, 1:] * s[:, :-1]).mean() / (s * s).mean()) > 0.5 for s in c)

    hu, target = torch.full((64, 1, 64, 64), -850.0), torch.zeros((64, 1, 64, 64))
    textured, _ = train.augment(hu.clone(), target.clone(), torch.Generator().manual_seed(3), jpeg=False,
                                noise_hu=90.0, textured_noise=True)
    white, _ = train.augment(hu.clone(), target.clone(), torch.Generator().manual_seed(3), jpeg=False, noise_hu=90.0)
    # expected: 0.3 of 64 (19) softened without; 0.5 + 0.5 x 0.3 of 64 (42) with
    assert correlated(white) < 29 < 33 < correlated(textured), (correlated(white), correlated(textured))
    plain, asked = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    train.augment(hu.clone(), target.clone(), plain, jpeg=False)
    train.augment(hu.clone(), target.clone(), asked, jpeg=False, textured_noise=True)
    assert torch.rand(1, generator=plain) != torch.rand(1, generator=asked)  # the textured choice drew numbers
