"""Render the Triton model repository for one deployment profile, from one source.

The source is ``model_repository/`` in this checkout: the ONNX graphs shipped by training
(``valid_area/1/model.onnx``, ``lesion/1/model.onnx``), the config templates (``templates/``), the
python-backend code (``ort_runner/model.py``, ``postprocess/1/model.py``) and ``ctscreen/postprocess.py``
(copied verbatim into the postprocess model). :func:`build_repository` renders a repository that
tritonserver loads as is:

========== ===================================================================================
profile    valid_area and lesion
========== ===================================================================================
``cpu``    python backend running ONNX Runtime on ``1/model.onnx`` (the embedded default: the
           tritonserver of the nvidia-pytriton wheel has only the python backend)
``gpu``    ``tensorrt_plan``; ``1/model.onnx`` is the TensorRT-ready graph (FP32 input) that
           ``scripts/build_trt_engines.sh`` turns into ``1/model.plan`` on the GPU node; an extra
           ``hu_cast`` model (onnxruntime, CPU) casts the INT16 slices to FP32 in the ensemble
``gpu-ort`` onnxruntime backend with the TensorRT execution provider (the fallback when no plan
           can be built ahead of time), on the same TensorRT-ready graph behind the same ``hu_cast``:
           with the INT16 input, ONNX Runtime ran the cast itself and gave TensorRT a subgraph whose
           input (the cast's output) the configured shape profile did not name
========== ===================================================================================

Every profile has ``postprocess`` (python backend) and the ``ct_screen`` ensemble with the names,
dtypes and shapes of :mod:`ctscreen.contracts`. The cpu profile also has ``ct_screen_fused``
(``fused/model.py``): the ensemble's inputs and outputs, its three steps run in one python stub per
instance, which on a CPU saves two stub round trips a request (docs/triton.md).

Errors
------
``RepositoryError(ValueError)``: a bad profile or setting, an ONNX graph that breaks the contract, or an
output folder that is not ours to overwrite. A missing source file raises ``FileNotFoundError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import string
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctscreen import contracts as c
from ctscreen import machine

logger = logging.getLogger(__name__)

PROFILES = ("cpu", "gpu", "gpu-ort")
SOURCE_DIR = Path(__file__).resolve().parent.parent / "model_repository"
"""The source repository of this checkout (override with ``CTSCREEN_MODEL_SOURCE``)."""

MARKER = ".ctscreen-repo.json"
"""Written at the top of every rendered repository: profile, settings and source digest."""

ONNX_OPSET = 17
_PACKAGE_DIR = Path(__file__).resolve().parent
_VENDORED = ("__init__.py", "contracts.py", "lungs.py", "postprocess.py")
"""Files of the ``ctscreen`` package copied verbatim into ``postprocess/1/ctscreen/``."""
_VENDORED_FUSED = (*_VENDORED, "machine.py", "reference.py")
"""... and into ``ct_screen_fused/1/ctscreen/`` (cpu profile), which runs the in-process reference."""


class RepositoryError(ValueError):
    """The repository cannot be rendered as asked (bad profile, setting, ONNX graph or output folder)."""


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    """The knobs of one profile; every field is rendered into the configs.

    Attributes
    ----------
    max_batch_size : int
        Most slices per batch for every model of the ensemble (the ensemble's own limit too).
    preferred_batch_sizes : tuple[int, ...]
        Dynamic-batcher preferred sizes of the segmentation models.
    max_queue_delay_us : int
        How long the segmentation batcher may hold a request to fill a preferred batch.
    instance_count : int
        Instances of each segmentation model (per GPU for the gpu profiles).
    intra_op_threads : int
        cpu profile: ONNX Runtime intra-op threads of each segmentation model. Both run at once, so
        ``2 * intra_op_threads`` should not exceed the cores given to Triton.
    run_batch : int
        cpu profile: the most slices per ONNX Runtime call inside a segmentation model; a dynamic batch
        is run in calls of this many (0: the whole batch in one call).
    fused_threads : int
        cpu profile: ONNX Runtime intra-op threads of each ``ct_screen_fused`` instance. It runs the two
        nets one after the other, so ``instance_count * fused_threads`` may take every core.
    postprocess_instances : int
        Instances of the python post-processing model (CPU).
    warmup_batch : int
        Batch size of the second warm-up request (the first is one all-air slice).
    opt_batch : int
        gpu profiles: the batch size TensorRT optimises for (min is 1, max is ``max_batch_size``).
    ort_trt_cache : str
        gpu-ort profile: folder of ONNX Runtime's TensorRT engine and timing caches.
    """

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    instance_count: int = 1
    intra_op_threads: int = 1
    run_batch: int = 0
    fused_threads: int = 1
    postprocess_instances: int = 1
    warmup_batch: int = 1
    opt_batch: int = 1
    ort_trt_cache: str = "/cache/ort-trt"

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise RepositoryError(f'Argument "max_batch_size" must be >= 1, got {self.max_batch_size}.')
        if not self.preferred_batch_sizes or any(
            not 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes
        ):
            raise RepositoryError(
                f'Argument "preferred_batch_sizes" must be non-empty values in [1, {self.max_batch_size}], '
                f"got {list(self.preferred_batch_sizes)}."
            )
        for name in ("max_queue_delay_us", "run_batch"):
            if getattr(self, name) < 0:
                raise RepositoryError(f'Argument "{name}" must be >= 0, got {getattr(self, name)}.')
        for name in (
            "instance_count",
            "intra_op_threads",
            "fused_threads",
            "postprocess_instances",
            "warmup_batch",
            "opt_batch",
        ):
            if getattr(self, name) < 1:
                raise RepositoryError(f'Argument "{name}" must be >= 1, got {getattr(self, name)}.')
        for name in ("warmup_batch", "opt_batch"):
            if getattr(self, name) > self.max_batch_size:
                raise RepositoryError(
                    f'Argument "{name}" must be <= max_batch_size ({self.max_batch_size}), '
                    f"got {getattr(self, name)}."
                )


def default_settings(profile: str) -> ProfileSettings:
    """The settings of ``profile`` (see docs/triton.md for the measurements behind them).

    cpu: one single-threaded ONNX Runtime instance of each model per usable core, up to 4 (more
    cores go to threads: ``cores // (2 * instances)`` each), and as many post-processing instances;
    as many fused instances, each with ``cores // instances`` threads (it runs the nets in turn).
    The lesion net does three quarters of the work: with one instance it could only ever use one
    core while the other waited for it; two instances let it take both (measured +14-20 % slices/s
    on 2 cores, docs/triton.md). With both cores busy, ONNX Runtime spends more CPU a slice on a
    call of 2 slices than on 2 calls of one (their activations leave the cache the other instance
    shares: the lesion net 41.0 against 45.6 ms a slice, docs/triton.md), so each model runs one slice
    per ONNX Runtime call (``run_batch`` 1); requests still travel in
    batches of 2 (the gateway sends 2 slices a request, the batcher pairs single-slice requests),
    which halves the round trips through the ensemble and the stubs.
    """
    _check_profile(profile)
    if profile == "cpu":
        cores = machine.cores()
        instances = max(1, min(4, cores))
        return ProfileSettings(
            max_batch_size=8,
            preferred_batch_sizes=(2,),
            max_queue_delay_us=2000,
            instance_count=instances,
            intra_op_threads=max(1, cores // (2 * instances)),
            run_batch=1,
            fused_threads=max(1, cores // instances),
            postprocess_instances=instances,
            warmup_batch=2,
        )
    return ProfileSettings(
        max_batch_size=32,
        preferred_batch_sizes=(8, 16, 32),
        max_queue_delay_us=1000,
        instance_count=1,
        postprocess_instances=4,
        warmup_batch=32,
        opt_batch=16,
    )


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise RepositoryError(f'Argument "profile" must be one of {", ".join(PROFILES)}, got {profile!r}.')


# --- ONNX ---------------------------------------------------------------------------------------


def check_onnx(path: Path) -> None:
    """Raise :class:`RepositoryError` unless ``path`` holds a graph with the wire contract.

    Input ``HU_SLICES`` INT16 ``[B, 1, 512, 512]`` and output ``PROB`` FP32 ``[B, 1, 512, 512]``
    (``B`` symbolic or any size).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    want = [
        ("input", inputs, c.HU_SLICES, onnx.TensorProto.INT16),
        ("output", list(graph.output), c.PROB, onnx.TensorProto.FLOAT),
    ]
    for kind, values, name, dtype in want:
        if [v.name for v in values] != [name]:
            raise RepositoryError(f"{path}: {kind}s must be [{name!r}], got {[v.name for v in values]}.")
        tensor = values[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.elem_type != dtype or dims[1:] != [1, c.SLICE_SIZE, c.SLICE_SIZE]:
            raise RepositoryError(
                f"{path}: {kind} {name!r} must be {onnx.TensorProto.DataType.Name(dtype)} "
                f"[B, 1, {c.SLICE_SIZE}, {c.SLICE_SIZE}], got "
                f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} {['B' if d is None else d for d in dims]}."
            )


def tensorrt_ready_onnx(src: Path, dst: Path) -> Path:
    """Write ``src`` with its INT16 input retyped FP32, for TensorRT (which has no INT16 tensors).

    Every consumer of ``HU_SLICES`` must be a ``Cast``: a cast of an integral FP32 value in the INT16
    range gives exactly what the cast of the INT16 value gives, so the graph computes the same maps.
    """
    import onnx

    model = onnx.load(str(src))
    consumers = [n for n in model.graph.node if c.HU_SLICES in n.input]
    not_cast = sorted({n.op_type for n in consumers if n.op_type != "Cast"})
    if not_cast:
        raise RepositoryError(
            f"{src}: input {c.HU_SLICES!r} feeds {', '.join(not_cast)}; TensorRT needs it to feed only "
            "Cast nodes (cast the INT16 HU to float first in the graph)."
        )
    (inp,) = [i for i in model.graph.input if i.name == c.HU_SLICES]
    inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def hu_cast_onnx(dst: Path) -> Path:
    """Write the one-node graph ``HU_SLICES`` INT16 -> ``HU_FLOAT`` FP32 of the gpu profile."""
    import onnx
    from onnx import TensorProto, helper

    shape: list[str | int] = ["B", 1, c.SLICE_SIZE, c.SLICE_SIZE]
    graph = helper.make_graph(
        [helper.make_node("Cast", [c.HU_SLICES], [c.HU_FLOAT], to=TensorProto.FLOAT)],
        c.HU_CAST_MODEL,
        [helper.make_tensor_value_info(c.HU_SLICES, TensorProto.INT16, shape)],
        [helper.make_tensor_value_info(c.HU_FLOAT, TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="ctscreen.repo"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


# --- rendering ----------------------------------------------------------------------------------


def model_provenance(onnx_path: Path) -> dict[str, str]:
    """``{"version", "sha256"}`` of a shipped ONNX file: the version from its ``model_card.json``
    (``"unknown"`` without one) and the sha256 of the file itself."""
    h = hashlib.sha256()
    with open(onnx_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    version = "unknown"
    card = onnx_path.parent / "model_card.json"
    if card.is_file():
        try:
            version = str(json.loads(card.read_text()).get("version") or "unknown")
        except (ValueError, AttributeError):
            logger.warning("unreadable model card %s", card)
    return {"version": version, "sha256": h.hexdigest()}


def _provenance_parameters(values: Mapping[str, str]) -> str:
    """Config ``parameters`` lines (a client reads them with ``get_model_config``)."""
    lines = ["# provenance of the shipped ONNX (model card version, sha256 of the file)"]
    for key, value in values.items():
        lines.append(
            f"parameters: {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }}"
        )
    return "\n".join(lines) + "\n"


def _render(template: Path, **values: object) -> str:
    try:
        return string.Template(template.read_text()).substitute(values)
    except KeyError as exc:  # a template names a value nobody gives: a bug in this module
        raise RepositoryError(f"{template}: no value for ${exc.args[0]}") from None


def _onnx_sources(source: Path, onnx_dir: Path | None) -> dict[str, Path]:
    root = source if onnx_dir is None else Path(onnx_dir)
    paths = {name: root / name / "1" / "model.onnx" for name in c.SEGMENTATION_MODELS}
    for name, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"ONNX model {name!r} not found at {path} (train and export it: see docs/training.md)"
            )
    return paths


def source_digest(
    profile: str,
    settings: ProfileSettings,
    *,
    source: Path | None = None,
    onnx_dir: Path | None = None,
) -> str:
    """A short digest of everything :func:`build_repository` reads: a cache key for the render."""
    source = Path(source or os.environ.get("CTSCREEN_MODEL_SOURCE") or SOURCE_DIR)
    h = hashlib.sha256(f"{profile}\n{dataclasses.asdict(settings)}\n".encode())
    files = sorted((source / "templates").glob("*.pbtxt")) + [
        source / "ort_runner" / "model.py",
        source / "postprocess" / "1" / "model.py",
        source / "fused" / "model.py",
        Path(__file__),
    ]
    files += [_PACKAGE_DIR / name for name in _VENDORED_FUSED]
    files += list(_onnx_sources(source, onnx_dir).values())
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_repository(
    profile: str,
    out: Path,
    *,
    source: Path | None = None,
    onnx_dir: Path | None = None,
    settings: ProfileSettings | None = None,
    overwrite: bool = True,
) -> Path:
    """Render the model repository of ``profile`` into ``out`` and return ``out``.

    Parameters
    ----------
    profile : str
        ``"cpu"``, ``"gpu"`` or ``"gpu-ort"`` (see the module docstring).
    out : Path
        Destination folder. It is replaced as a whole (rendered next to it, then renamed), but only
        when it is empty or was rendered by this function (it holds ``.ctscreen-repo.json``).
    source : Path, optional
        Source repository; default ``$CTSCREEN_MODEL_SOURCE`` or ``model_repository/`` of this checkout.
    onnx_dir : Path, optional
        Take ``<name>/1/model.onnx`` from here instead of ``source`` (a candidate model, a test graph).
    settings : ProfileSettings, optional
        Default :func:`default_settings` of ``profile``.
    overwrite : bool
        If False, an existing rendered ``out`` is an error.

    Raises
    ------
    RepositoryError
        Bad profile or settings, an ONNX graph off the contract, ``out`` not ours to replace.
    FileNotFoundError
        A source file or ONNX model is missing.
    """
    _check_profile(profile)
    source = Path(source or os.environ.get("CTSCREEN_MODEL_SOURCE") or SOURCE_DIR).resolve()
    templates = source / "templates"
    if not templates.is_dir():
        raise FileNotFoundError(f"model repository source has no templates/: {source}")
    settings = settings or default_settings(profile)
    onnx_paths = _onnx_sources(source, onnx_dir)
    for path in onnx_paths.values():
        check_onnx(path)
    out = Path(out).resolve()
    if out.exists():
        if not out.is_dir():
            raise RepositoryError(f'Argument "out" must be a folder, got the file {out}.')
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise RepositoryError(
                f"refusing to replace {out}: it is not empty and was not rendered by ctscreen"
            )
        if not overwrite and (out / MARKER).is_file():
            raise RepositoryError(f"{out} already holds a rendered repository")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _render_into(tmp, profile, settings, source, onnx_paths)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(trash / "repo")
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("rendered the %s repository into %s", profile, out)
    return out


def _vendor(model_py: Path, version: Path, names: Sequence[str]) -> None:
    """A python-backend model's ``model.py`` into ``version``, with a verbatim copy of ``names`` of the
    ``ctscreen`` package in ``version/ctscreen/`` (the stub puts its folder first on ``sys.path``)."""
    (version / "ctscreen").mkdir(parents=True)
    shutil.copyfile(model_py, version / "model.py")
    for name in names:
        shutil.copyfile(_PACKAGE_DIR / name, version / "ctscreen" / name)


def _render_into(
    dst: Path, profile: str, s: ProfileSettings, source: Path, onnx_paths: Mapping[str, Path]
) -> None:
    templates = source / "templates"
    common = {
        "profile": profile,
        "slice": c.SLICE_SIZE,
        "max_batch_size": s.max_batch_size,
        "input_name": c.HU_SLICES,
        "output_name": c.PROB,
        # the ensemble's models: an urgent study's requests go before the routine ones waiting (c.PRIORITY_LEVELS;
        # the cpu profile's fused template names none: docs/triton.md, "Priority")
        "priority_levels": c.PRIORITY_LEVELS,
        "default_priority_level": c.DEFAULT_PRIORITY_LEVEL,
    }
    gpu_plan = profile in ("gpu", "gpu-ort")  # TensorRT's FP32-input graph behind hu_cast
    seg_template = templates / f"segmentation.{profile}.pbtxt"
    seg_values = dict(
        common,
        preferred_batch_sizes=", ".join(map(str, s.preferred_batch_sizes)),
        max_queue_delay_us=s.max_queue_delay_us,
        instance_count=s.instance_count,
        intra_op_threads=s.intra_op_threads,
        run_batch=s.run_batch,
        warmup_batch=s.warmup_batch,
        opt_batch=s.opt_batch,
        ort_trt_cache=s.ort_trt_cache,
    )
    provenance = {name: model_provenance(path) for name, path in onnx_paths.items()}
    for name, onnx_path in onnx_paths.items():
        version = dst / name / "1"
        version.mkdir(parents=True)
        config = _render(seg_template, **seg_values, model_name=name)
        (dst / name / "config.pbtxt").write_text(config + _provenance_parameters(provenance[name]))
        if gpu_plan:
            tensorrt_ready_onnx(onnx_path, version / "model.onnx")
        else:
            shutil.copyfile(onnx_path, version / "model.onnx")
        if profile == "cpu":
            shutil.copyfile(source / "ort_runner" / "model.py", version / "model.py")
        for card in ("model_card.json", "model_card.md"):
            if (onnx_path.parent / card).is_file():
                shutil.copyfile(onnx_path.parent / card, version / card)

    pp = dst / c.POSTPROCESS_MODEL
    _vendor(source / "postprocess" / "1" / "model.py", pp / "1", _VENDORED)
    names = {
        "valid_prob": c.VALID_PROB,
        "lesion_prob": c.LESION_PROB,
        "lesion_boxes": c.LESION_BOXES,
        "box_count": c.BOX_COUNT,
        "valid_area_box": c.VALID_AREA_BOX,
    }
    (pp / "config.pbtxt").write_text(
        _render(
            templates / "postprocess.pbtxt",
            **common,
            **names,
            model_name=c.POSTPROCESS_MODEL,
            instance_count=s.postprocess_instances,
            max_queue_delay_us=0,
            prob_cutoff=c.PROB_CUTOFF,
            min_box_area=c.MIN_BOX_AREA,
        )
    )

    # the models a screening model is made of, read by the gateway for CaseResult.models
    screen_provenance = _provenance_parameters({"models": json.dumps(provenance, sort_keys=True)})
    if profile == "cpu":
        fused = dst / c.FUSED_MODEL / "1"
        _vendor(source / "fused" / "model.py", fused, _VENDORED_FUSED)
        for name in c.SEGMENTATION_MODELS:  # the very files the ensemble's steps load
            try:
                os.link(dst / name / "1" / "model.onnx", fused / f"{name}.onnx")
            except OSError:  # a file system without hard links
                shutil.copyfile(dst / name / "1" / "model.onnx", fused / f"{name}.onnx")
        (fused.parent / "config.pbtxt").write_text(
            _render(
                templates / "fused.cpu.pbtxt",
                **common,
                **names,
                model_name=c.FUSED_MODEL,
                ensemble_model=c.ENSEMBLE_MODEL,
                instance_count=s.instance_count,
                intra_op_threads=s.fused_threads,
                run_batch=s.run_batch,
                warmup_batch=s.warmup_batch,
                prob_cutoff=c.PROB_CUTOFF,
                min_box_area=c.MIN_BOX_AREA,
            )
            + screen_provenance
        )

    pre_steps, seg_input = "", c.HU_SLICES
    if gpu_plan:
        cast = dst / c.HU_CAST_MODEL
        hu_cast_onnx(cast / "1" / "model.onnx")
        (cast / "config.pbtxt").write_text(
            _render(
                templates / "hu_cast.gpu.pbtxt",
                **dict(common, output_name=c.HU_FLOAT),
                model_name=c.HU_CAST_MODEL,
                instance_count=s.postprocess_instances,
            )
        )
        pre_steps = (
            "    {\n"
            f'      model_name: "{c.HU_CAST_MODEL}"\n'
            "      model_version: -1\n"
            f'      input_map {{ key: "{c.HU_SLICES}" value: "{c.HU_SLICES}" }}\n'
            f'      output_map {{ key: "{c.HU_FLOAT}" value: "{c.HU_FLOAT}" }}\n'
            "    },\n"
        )
        seg_input = c.HU_FLOAT
    ens = dst / c.ENSEMBLE_MODEL
    (ens / "1").mkdir(parents=True)
    # an object store keeps files, not folders: published with `aws s3 sync`, an empty version folder was lost,
    # and Triton refused the ensemble ("at least one version must be available") and exited
    (ens / "1" / "README.txt").write_text("The ensemble's version 1: Triton needs the folder; an object store "
                                          "keeps it only with a file in it.\n")
    (ens / "config.pbtxt").write_text(
        _render(
            templates / "ct_screen.pbtxt",
            **common,
            **names,
            model_name=c.ENSEMBLE_MODEL,
            prob=c.PROB,
            valid_area_model=c.VALID_AREA_MODEL,
            lesion_model=c.LESION_MODEL,
            postprocess_model=c.POSTPROCESS_MODEL,
            pre_steps=pre_steps,
            segmentation_input=seg_input,
        )
        + screen_provenance
    )
    manifest = {
        "profile": profile,
        "settings": dataclasses.asdict(s),
        "source": str(source),
        "onnx": {name: str(p) for name, p in onnx_paths.items()},
        "digest": source_digest(
            profile, s, source=source, onnx_dir=next(iter(onnx_paths.values())).parents[2]
        ),
    }
    (dst / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")


def cache_root() -> Path:
    """``$CTSCREEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctscreen``, else ``~/.cache/ctscreen``."""
    if os.environ.get("CTSCREEN_CACHE_DIR"):
        return Path(os.environ["CTSCREEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ctscreen"


def cached_repository(
    profile: str = "cpu",
    *,
    source: Path | None = None,
    onnx_dir: Path | None = None,
    settings: ProfileSettings | None = None,
) -> Path:
    """The rendered repository of ``profile`` in the cache (``repo-<profile>-<digest>``), rendered once.

    The digest covers the templates, the python models, the vendored post-processing code, the ONNX
    files and the settings, so any change renders a fresh copy; concurrent callers are safe (each
    renders into a temporary folder and the first rename wins).
    """
    settings = settings or default_settings(profile)
    if onnx_dir is None and os.environ.get("CTSCREEN_ONNX_DIR"):
        onnx_dir = Path(os.environ["CTSCREEN_ONNX_DIR"])
    digest = source_digest(profile, settings, source=source, onnx_dir=onnx_dir)
    out = cache_root() / f"repo-{profile}-{digest}"
    if (out / MARKER).is_file():
        return out
    tmp = cache_root() / f".render-{profile}-{digest}-{os.getpid()}"
    build_repository(profile, tmp, source=source, onnx_dir=onnx_dir, settings=settings)
    try:
        tmp.rename(out)
    except OSError:  # another process rendered it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``ctscreen repo build --profile cpu|gpu|gpu-ort --out DIR``."""
    parser = argparse.ArgumentParser(prog="ctscreen repo", description="Render the Triton model repository.")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="render one profile into a folder")
    build.add_argument("--profile", choices=PROFILES, required=True)
    build.add_argument("--out", type=Path, required=True, help="destination folder (replaced if ours)")
    build.add_argument("--source", type=Path, help="source repository (default: model_repository/)")
    build.add_argument("--onnx-dir", type=Path, help="take <model>/1/model.onnx from here")
    build.add_argument("--max-batch-size", type=int)
    build.add_argument("--preferred-batch-sizes", help="comma-separated, e.g. 4,8")
    build.add_argument("--max-queue-delay-us", type=int)
    build.add_argument("--instances", type=int, help="instances of each segmentation model")
    build.add_argument("--threads", type=int, help="cpu: ONNX Runtime intra-op threads per model")
    build.add_argument("--run-batch", type=int,
                       help="cpu: most slices per ONNX Runtime call inside a model (0: the whole batch)")
    build.add_argument("--fused-threads", type=int, help="cpu: ONNX Runtime intra-op threads per ct_screen_fused instance")
    build.add_argument("--postprocess-instances", type=int)
    build.add_argument("--warmup-batch", type=int)
    build.add_argument("--opt-batch", type=int, help="gpu: TensorRT optimisation batch size")
    build.add_argument("--ort-trt-cache", help="gpu-ort: TensorRT engine cache folder in the pod")
    args = parser.parse_args(argv)
    try:
        base = default_settings(args.profile)
        changes: dict[str, Any] = {}  # dataclass field -> value from the command line
        for field, value in (
            ("max_batch_size", args.max_batch_size),
            ("max_queue_delay_us", args.max_queue_delay_us),
            ("instance_count", args.instances),
            ("intra_op_threads", args.threads),
            ("run_batch", args.run_batch),
            ("fused_threads", args.fused_threads),
            ("postprocess_instances", args.postprocess_instances),
            ("warmup_batch", args.warmup_batch),
            ("opt_batch", args.opt_batch),
            ("ort_trt_cache", args.ort_trt_cache),
        ):
            if value is not None:
                changes[field] = value
        if args.preferred_batch_sizes:
            try:
                changes["preferred_batch_sizes"] = tuple(
                    int(v) for v in args.preferred_batch_sizes.split(",")
                )
            except ValueError:
                raise RepositoryError(
                    f'Argument "--preferred-batch-sizes" must be integers like 4,8, got {args.preferred_batch_sizes!r}.'
                ) from None
        if "max_batch_size" in changes and "preferred_batch_sizes" not in changes:
            changes["preferred_batch_sizes"] = tuple(
                b
                for b in base.preferred_batch_sizes
                if b <= int(changes["max_batch_size"])
            ) or (int(changes["max_batch_size"]),)
        for field in ("warmup_batch", "opt_batch"):
            if "max_batch_size" in changes and field not in changes:
                changes[field] = min(getattr(base, field), int(changes["max_batch_size"]))
        settings = dataclasses.replace(base, **changes)
        out = build_repository(
            args.profile, args.out, source=args.source, onnx_dir=args.onnx_dir, settings=settings
        )
    except (RepositoryError, FileNotFoundError, OSError) as exc:
        sys.stderr.write(f"ctscreen repo: {exc}\n")
        return 2
    sys.stdout.write(f"ctscreen repo: rendered the {args.profile} profile into {out}\n")
    if args.profile == "gpu":
        sys.stdout.write(f"ctscreen repo: next, on the GPU node: scripts/build_trt_engines.sh --repo {out}\n")
    return 0
