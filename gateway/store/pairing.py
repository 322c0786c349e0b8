"""Whether the state store and the blob store belong together, checked before a gateway serves.

A replica started on a blob folder that was not mounted (``FolderBlobs`` creates a missing folder: an empty
one on the pod's own disk) acknowledged studies whose instances no other replica could read, and every
one failed ("an instance of the study is missing from the blob store"); one started on a mistyped
``CTSCREEN_DATABASE_URL`` built a fresh schema there (``CTSCREEN_DB_MIGRATE``) and served a second, empty
state store beside the cluster's (a review's runs on real PostgreSQL). Both are refused at start, in one
line, by what the two stores hold:

* the database names instances, and none of the newest of them (up to 20) is in the blob store: the
  volume is not mounted, or the folder, bucket or database is another cluster's;
* the database never recorded a study or a job, and the blob store holds blobs: the database is not the
  one those blobs belong to (a new cluster starts with both empty).

Anything else passes: a database whose instances retention removed, a blob store with orphans.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from gateway.store.blobs import BlobStore
from gateway.store.store import Store, StoreError, redact

logger = logging.getLogger(__name__)


class StorePairingError(RuntimeError):
    """The state store and the blob store do not belong together (the message says which check failed)."""


async def check_pairing(store: Store, blobs: BlobStore) -> None:
    """Raise :class:`StorePairingError` when ``store`` and ``blobs`` do not belong together (see the module
    docstring)."""
    used, keys = await store.pairing_facts()
    database, where = redact(store.url), blobs.root
    if keys:
        found = await asyncio.to_thread(lambda: sum(blobs.exists(k) for k in keys))
        if not found:
            raise StorePairingError(
                f"the state store {database} names stored instances, but none of the newest {len(keys)} is in the "
                f"blob store {where}: is the volume mounted, and are CTSCREEN_DATABASE_URL and the blob store "
                "(CTSCREEN_BLOB_DIR / CTSCREEN_BLOB_URL) the same cluster's? Refusing to accept studies whose "
                "instances no other replica could read")
        return
    if not used and not await asyncio.to_thread(blobs.empty):
        raise StorePairingError(
            f"the state store {database} has never recorded a study, but the blob store {where} holds instances: "
            "is CTSCREEN_DATABASE_URL the database these blobs belong to? (A new cluster starts with both empty; "
            "to start afresh on purpose, empty the blob store first.)")


async def checked_pairing(store: Store, blobs: BlobStore) -> None:
    """:func:`check_pairing` at a gateway's start: a state store or a blob store that cannot answer now is left
    to the start's other checks (the gateway starts not ready, and is refused nothing it did not check)."""
    try:
        await check_pairing(store, blobs)
    except (*StoreError, OSError) as exc:  # a bucket gone, a volume that fails: readiness says so
        logger.warning("the state store and the blob store could not be checked against each other now (%s)",
                       type(exc).__name__)


def check_pairing_now(database_url: str, blobs: BlobStore) -> None:
    """:func:`checked_pairing` from synchronous code (a command's or a server factory's checks before serving),
    in a thread of its own: uvicorn calls its ``--factory`` inside its running event loop."""

    async def go() -> None:
        store = Store(database_url)
        try:
            await checked_pairing(store, blobs)
        finally:
            await store.close()

    with ThreadPoolExecutor(1, thread_name_prefix="pairing") as pool:
        pool.submit(asyncio.run, go()).result()
