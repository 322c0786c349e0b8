"""The state store (SQLite by default, PostgreSQL for clusters) and the blob store of instance bytes.

See :mod:`gateway.store.store` (tables, claims, leases), :mod:`gateway.store.blobs` (bytes, fsynced
before an acknowledgement) and :mod:`gateway.store.migrate` (Alembic migrations shipped here).
"""

from gateway.store.blobs import (
           BlobStore,
           FolderBlobs,
           S3Blobs,
           instance_sources,
           new_key,
           new_keys,
           open_blobs,
)
from gateway.store.store import (
           Claimed,
           KeyTaken,
           Store,
           StoreError,
           StoreUnreachable,
           StudyState,
           Swept,
           async_url,
           redact,
)

__all__ = ["BlobStore", "Claimed", "FolderBlobs", "KeyTaken", "S3Blobs", "Store", "StoreError", "StoreUnreachable", "StudyState",
           "Swept", "async_url", "instance_sources", "new_key", "new_keys", "open_blobs", "redact"]
