"""Helpers of the gateway-app tests: small real CT DICOM series and a fake Triton client.

The fake client stands in for ``tritonclient.grpc.aio.InferenceServerClient`` in one-layer unit tests
only (pool scheduling, API plumbing); the end-to-end tests use the real embedded Triton. It "finds" a
lesion box in the top-left quadrant of every slice whose marker patch (rows 100-139, cols 100-139) is
brighter than 0 HU, and a valid area covering the whole slice, so a test knows the right verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctscreen.contracts import BOX_COUNT, HU_SLICES, LESION_BOXES, VALID_AREA_BOX
from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_dicom_factory import FOV_MM

MARK = (slice(100, 140), slice(100, 140))


def ct_series(
    n: int,
    lesion: Iterable[int] = (),
    *,
    size: int = 512,
    spacing: float = 5.0,
    study_uid: str | None = None,
    shuffle_seed: int | None = 0,
) -> tuple[str, list[tuple[str, bytes]]]:
    """``n`` axial CT slices as Part-10 bytes (in shuffled file order); slices in ``lesion`` are marked.

    Returns ``(study_instance_uid, [(filename, bytes), ...])``; slice ``i`` lies at z = i * spacing.
    """
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    lesion = set(lesion)
    files = []
    for i in range(n):
        hu = np.full((size, size), -1000, np.int16)
        hu[size // 8 : size - size // 8, size // 8 : size - size // 8] = -800  # "lung"
        if i in lesion:
            r = slice(MARK[0].start * size // 512, MARK[0].stop * size // 512)
            c = slice(MARK[1].start * size // 512, MARK[1].stop * size // 512)
            hu[r, c] = 40
        files.append((f"slice{i:04d}.dcm", _dataset(hu, i, spacing, study_uid, series_uid, frame_uid)))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(n)
        files = [files[j] for j in order]
    return study_uid, files


def _dataset(hu: np.ndarray, i: int, spacing: float, study: str, series: str, frame: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality = "CT"
    ds.PatientID, ds.PatientName = "TEST", "Test^Gateway"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-FOV_MM / 2, -FOV_MM / 2, float(i * spacing)]
    ds.PixelSpacing = [FOV_MM / hu.shape[0], FOV_MM / hu.shape[1]]  # a chest field of view at any matrix
    ds.SliceThickness = spacing
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.int16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def edited(files: Iterable[tuple[str, bytes]], edit: Any) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each file with ``edit(ds)`` applied to its data set."""
    out = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        edit(ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((name, buf.getvalue()))
    return out


def wait_job(client: Any, job_id: str, timeout: float = 20.0) -> dict:
    """The job's view once it is ``done`` or ``failed`` (``client``: a ``TestClient`` of the app)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["state"] in ("done", "failed"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {view}")


class FakeResult:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self._arrays.get(name)


class FakeError(Exception):
    """Looks like tritonclient's InferenceServerException (``status()``)."""

    def __init__(self, status: str, msg: str = "fake failure") -> None:
        super().__init__(msg)
        self._status = status

    def status(self) -> str:
        return self._status


class FakeTriton:
    """A fake ``InferenceServerClient`` for one endpoint (see the module docstring).

    ``fail_with`` makes every call raise that status; ``fail_first`` only the first n calls (with
    ``fail_with``, or ``UNAVAILABLE``); ``delay`` seconds per call; ``ready`` answers the readiness probes.
    ``events`` records ``("start" | "end", call number, requests in flight)`` in order.
    """

    def __init__(self, url: str, *, delay: float = 0.0, fail_with: str | None = None, fail_first: int = 0,
                 ready: bool = True) -> None:
        self.url = url
        self.delay = delay
        self.fail_with = fail_with
        self.fail_first = fail_first
        self.ready = ready
        self.calls = 0
        self.inflight = 0
        self.max_inflight_seen = 0
        self.slices = 0
        self.closed = False
        self.timeouts: list[float | None] = []
        self.events: list[tuple[str, int, int]] = []
        self.priorities: list[int] = []  # each call's Triton priority level, in the order the calls started

    async def infer(self, model_name, inputs, outputs=None, client_timeout=None, priority=0, **kw):
        self.calls += 1
        call = self.calls
        self.timeouts.append(client_timeout)
        self.priorities.append(priority)
        self.inflight += 1
        self.max_inflight_seen = max(self.max_inflight_seen, self.inflight)
        self.events.append(("start", call, self.inflight))
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            failing = call <= self.fail_first if self.fail_first else self.fail_with is not None
            if failing:
                status = self.fail_with or "StatusCode.UNAVAILABLE"  # tritonclient's texts name the address
                raise FakeError(status, f"[{status}] failed to connect to all addresses; last error: ipv4:{self.url}")
            inp = inputs[0]
            assert inp.name() == HU_SLICES and inp.datatype() == "INT16"
            shape = inp.shape()
            hu = np.frombuffer(inp._raw_content, dtype=np.int16).reshape(shape)
            b = shape[0]
            boxes = np.full((b, 1, 5), -1.0, np.float32)
            counts = np.zeros((b, 1), np.int32)
            valid = np.tile(np.array([0, 0, 511, 511], np.float32), (b, 1))
            for i in range(b):
                if hu[i, 0][MARK].mean() > 0:
                    boxes[i, 0] = (MARK[1].start, MARK[0].start, MARK[1].stop - 1, MARK[0].stop - 1, 0.9)
                    counts[i, 0] = 1
            self.slices += b
            return FakeResult({LESION_BOXES: boxes, BOX_COUNT: counts, VALID_AREA_BOX: valid})
        finally:
            self.inflight -= 1
            self.events.append(("end", call, self.inflight))

    async def is_server_ready(self, client_timeout=None, **kw):
        return self.ready

    async def is_model_ready(self, model_name, client_timeout=None, **kw):
        return self.ready

    async def get_model_metadata(self, model_name, client_timeout=None, **kw):
        class Meta:
            versions = ["1"]

        return Meta()

    async def close(self):
        self.closed = True


class FakeFleet:
    """Makes (and remembers) one :class:`FakeTriton` per endpoint; ``options[url]`` configures each."""

    def __init__(self, **options_by_url: dict) -> None:
        self.options = options_by_url
        self.clients: dict[str, FakeTriton] = {}

    def __call__(self, url: str) -> FakeTriton:
        client = FakeTriton(url, **self.options.get(url, {}))
        self.clients[url] = client
        return client


@contextlib.contextmanager
def served(settings: Settings, host: str) -> Iterator[int]:
    """The app of ``settings`` under a real uvicorn on ``host`` and a free port (yielded), in a thread."""
    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, client_factory=FakeFleet()), host=host, port=port,
                                           log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
            time.sleep(0.1)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
