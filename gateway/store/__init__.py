"""The state store (SQLite by default, PostgreSQL for clusters) and the blob store of instance bytes.

See :mod:`gateway.store.store` (tables, claims, leases), :mod:`gateway.store.blobs` (bytes, fsynced
before an acknowledgement) and :mod:`gateway.store.migrate` (Alembic migrations shipped here).
"""

from gateway.store.blobs import BlobStore, FolderBlobs, instance_sources, new_key, new_keys
from gateway.store.store import Claimed, Store, StoreError, StudyState, Swept, async_url, redact

__all__ = ["BlobStore", "Claimed", "FolderBlobs", "Store", "StoreError", "StudyState", "Swept", "async_url",
           "instance_sources", "new_key", "new_keys", "redact"]
