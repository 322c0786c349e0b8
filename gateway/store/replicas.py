"""How many gateway replicas share the state store now (table ``replicas``, revision 0008).

A replica is alive while its sweeper has recorded it within ``alive_s``
(:attr:`gateway.settings.Settings.replica_alive_s`: ``max(lease_s, 4 * sweep_interval_s)``, the rule the
sweepers adopt a killed replica's jobs by); the replica asking always counts itself, even before its first
sweep recorded it. The upload limit of the cluster is the sum of the live replicas' limits
(:func:`gateway.api.studies.check_capacity`).
"""

from __future__ import annotations

from sqlalchemy import func, select

from gateway.store.models import Replica
from gateway.store.store import Store

__all__ = ["live_replicas"]


async def live_replicas(store: Store, alive_s: float) -> int:
    """The gateway replicas seen alive within ``alive_s`` on ``store``, this one included (at least 1)."""
    now = await store.now()
    async with store.read() as s:
        others = (await s.execute(select(func.count()).select_from(Replica).where(
            Replica.seen_at >= now - alive_s, Replica.owner != store.owner))).scalar()
    return 1 + int(others or 0)
