"""Screen an upload's slices while it is still being read, before the study is decided or accepted.

An upload is accepted only once every file is parsed, the series is chosen from all the headers
(:func:`gateway.ingest.plan_study`), the instances are durable and the job is committed: a 300-slice
upload spends about a second on that on one core, and Triton waited for all of it (on 2 cores the other
core idled; issue 17). Inference of one slice does not depend on the others, so a :class:`Speculation`
decodes each CT object as soon as its header is parsed, in the parsing thread itself (:meth:`offer`), and
sends its frames to Triton in batches, keeping the answers by frame.

Decoding where the header was parsed, not in a pool of decode threads, saves a hand-off to another thread
and back for every object: with the event loop, the parsing thread and two decode threads taking turns at
the GIL, the gateway blocked about 40 times a slice in each decode thread, and a 300-slice study cost
about 1 ms of gateway CPU a slice more (paired runs, the README's performance section). Each multipart
upload has its own parsing thread, so concurrent uploads still decode side by side (a zip or single file is
parsed, and so decoded, in a thread of the decode pool). The parsing thread decodes only objects of the
series it guessed (the first with screenable frames, as the event loop guesses), once each. When the plan
is known the screening takes the answers of the chosen frames and asks Triton only for the rest
(:meth:`gateway.screening.Screener.screen`).

What it risks, and the bounds on it:

* only one series is guessed: the first CT series whose frames pass the header rules. An object of a
  second such series stops the speculation (nothing more is sent; the answers so far are kept and
  used if that series is chosen). An upload of several series wastes at most part of one series;
* its answers are never the only copy of anything: a batch is tried once, and one that fails stops the
  speculation (Triton is failing: the job, not a guess, should meet it); the screening asks again for
  what is not answered here, under its own retries, deadline and back-off (a speculation never raises);
* an object sent twice (a re-send: ingest keeps the later copy) makes the speculation unusable: its
  answers may be the earlier copy's;
* the upload route speculates only while the worker has a free slot, so it never runs ahead of
  studies already accepted; a study refused (its 4xx) or not accepted (no durable store) cancels it;
* the same window as :meth:`gateway.triton_pool.TritonPool.infer` bounds the batches it has sent.

Thread-safety: :meth:`offer` and :meth:`cancel` may be called from any thread; everything else runs on
the event loop that created the speculation.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from pydicom.dataset import Dataset

from gateway.dicom import FrameHeader, GridMapping
from gateway.ingest import Rejection, decode_frames
from gateway.series import SeriesRules, frame_exclusion
from gateway.triton_pool import InferStats, SliceOutput, TritonPool

logger = logging.getLogger(__name__)

__all__ = ["Decoded", "Speculation"]

Decoded = tuple[list[tuple[tuple[str, int], np.ndarray, GridMapping]], Rejection | None, dict[str, float]]
"""One object decoded: ``(frames as (key, 512-grid HU, grid), rejection or None, seconds spent)``."""


class Speculation:
    """Decodes and screens one upload's CT objects as they are parsed (see the module docstring).

    Parameters
    ----------
    pool : TritonPool
        Where the batches go (:meth:`~gateway.triton_pool.TritonPool.infer_batch`).
    rules : SeriesRules | None
        The header rules a frame must pass to be guessed at (the ingest's defaults).
    priority : int
        The Triton priority level of the batches (:func:`gateway.jobs.triton_priority`; 0, the default).
    """

    def __init__(self, pool: TritonPool, rules: SeriesRules | None = None, priority: int = 0) -> None:
        self.pool, self.rules, self.priority = pool, rules or SeriesRules(), priority
        self._loop = asyncio.get_running_loop()
        self.taken: set[str] = set()
        """SOP Instance UIDs of the objects taken on (decoded here)."""
        self.decodes: dict[str, asyncio.Future[Decoded]] = {}
        """Their decodes (done futures: a decode's result or its error), by SOP Instance UID, until the
        screening takes them (it pops them: the frames are then held once, by the study)."""
        self.answers: dict[tuple[str, int], SliceOutput] = {}
        """Frames Triton answered, by frame key."""
        self.stats = InferStats()
        self._unusable = False  # an object was offered twice: its answers may be the earlier copy's
        self._stopped = False  # no new object is taken on, no new batch sent
        self._closed = False  # the upload is parsed: a short last batch may go
        self._queue: list[tuple[tuple[str, int], np.ndarray]] = []  # decoded frames not yet sent
        self._sending: set[asyncio.Task[None]] = set()
        self._room = asyncio.Semaphore(max(1, pool.window()))
        self._offered: set[str] = set()  # the parsing thread's: objects offered so far
        self._guess: str | None = None  # the guessed series: the first with frames, set by the parsing thread
        # before it hands that object to the loop, so the loop reads it set (one decision, not two kept alike)

    # --- fed by the parsing thread --------------------------------------------------------------
    def offer(self, uid: str, ds: Dataset, headers: list[FrameHeader]) -> None:
        """An object was parsed (in the parsing thread): decode it here, unless its frames are all left out
        or the speculation has stopped, and hand it to the event loop, which screens it if it belongs to the
        guessed series. Never raises: a decode that fails is the screening's to meet (it gets the error)."""
        keys = frozenset(h.key for h in headers if frame_exclusion(h, self.rules) is None)
        series = headers[0].series_instance_uid
        fresh = uid not in self._offered  # the parsing thread's own records: a re-send or an object of
        self._offered.add(uid)  # another series than the guess is not decoded (the event loop stops on it)
        if keys and self._guess is None:
            self._guess = series
        decoded: Decoded | BaseException | None = None
        if keys and fresh and series == self._guess and not self._stopped:  # _stopped: a late stop wastes one decode
            try:
                decoded = decode_frames(ds, headers, keys)
            except Exception as exc:  # noqa: BLE001 - kept for the screening, as a decode thread's future would
                decoded = exc
        try:
            self._loop.call_soon_threadsafe(self._take, uid, headers, keys, decoded)
        except RuntimeError:  # the loop is closing: nothing to speculate for
            pass

    def _take(self, uid: str, headers: list[FrameHeader], keys: frozenset[tuple[str, int]],
              decoded: Decoded | BaseException | None) -> None:
        if uid in self.taken:  # a re-send: the plan keeps the later copy, whose pixels may differ
            self.decodes.pop(uid, None)
            self._unusable = True
            self.stop()
            return
        if self._stopped or not keys:
            return  # keys: localizers, other modalities, ...: the plan leaves them out too
        if headers[0].series_instance_uid != self._guess:
            logger.debug("a second CT series in the upload: no more speculation")
            self.stop()
            return
        if decoded is None:  # the parsing thread saw the speculation stopped, or had seen this object before
            return
        future: asyncio.Future[Decoded] = self._loop.create_future()
        if isinstance(decoded, BaseException):
            future.set_exception(decoded)
            future.exception()  # marked seen: a dropped one is never logged by asyncio (its message may quote a
            # patient's data), while the screening that takes it still meets the error
        else:
            future.set_result(decoded)
            frames, rejection, _ = decoded
            if rejection is None:
                self._queue.extend((key, arr) for key, arr, _ in frames)
        self.decodes[uid] = future
        self.taken.add(uid)
        self._send()

    # --- batches to Triton ------------------------------------------------------------------------
    def _send(self) -> None:
        size = self.pool.batch_size
        last = self._closed  # nothing more is coming: a short batch goes
        while not self._stopped and (len(self._queue) >= size or (last and self._queue)):
            batch, self._queue = self._queue[:size], self._queue[size:]
            task = self._loop.create_task(self._infer(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _infer(self, batch: list[tuple[tuple[str, int], np.ndarray]]) -> None:
        async with self._room:
            if self._stopped:
                return
            try:
                out = await self.pool.infer_batch(np.stack([arr for _, arr in batch]), self.stats, attempts=1,
                                                   priority=self.priority)
            except Exception as exc:  # noqa: BLE001 - the screening asks again for what is not answered here
                logger.debug("a speculative batch of %d was not answered: %s; no more speculation", len(batch), exc)
                self.stop()
                return
        for (key, _), answer in zip(batch, out, strict=True):
            self.answers[key] = answer

    # --- the screening's side -----------------------------------------------------------------
    def close(self) -> None:
        """The upload is parsed: nothing more will be offered; a short last batch is sent."""
        self._closed = True
        self._send()

    def stop(self) -> None:
        """Take on nothing more and send no more batches (those sent are answered; decodes go on)."""
        self._stopped = True
        self._queue.clear()

    @property
    def usable(self) -> bool:
        """False once an object was offered twice (its answers may be the earlier copy's)."""
        return not self._unusable

    def pending(self) -> int:
        """Batches not answered yet (0 once settled or cancelled); decodes end in the parsing thread."""
        return sum(not t.done() for t in self._sending)

    def busy(self) -> bool:
        """Whether it may still ask something of the cores or of Triton: the upload is still being parsed
        and decoded (and it has not stopped), or a batch has not ended."""
        return (not self._closed and not self._stopped) or self.pending() > 0

    def covers(self, uids: list[str]) -> bool:
        """Whether every one of these objects was taken on (is decoded here)."""
        return not self._unusable and self.taken.issuperset(uids)

    async def settle(self) -> dict[tuple[str, int], SliceOutput]:
        """Wait for the batches sent (and those still to send from what was decoded); the answers by frame key."""
        self.close()
        while True:
            self._send()
            if not self._sending:
                break
            await asyncio.wait(list(self._sending))
        return dict(self.answers)

    def cancel(self) -> None:
        """Stop and cancel what is pending (any thread): the upload was refused, not accepted, or is done."""
        try:
            self._loop.call_soon_threadsafe(self._cancel_now)
        except RuntimeError:  # the loop is closed: its tasks are gone with it
            pass

    def _cancel_now(self) -> None:
        self.stop()
        for task in list(self._sending):
            task.cancel()
        self.decodes.clear()  # nothing decoded is held past this (a decode still running in the parsing
        # thread is dropped when it reaches the stopped loop side)
        self.answers.clear()

