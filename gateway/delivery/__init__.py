"""Results back where radiologists and the RIS look: SR and key images to PACS, FHIR or HL7 v2 to the RIS.

:mod:`~gateway.delivery.config` (the destinations file), :mod:`~gateway.delivery.payloads` (what is
sent, built once from the stored instances), :mod:`~gateway.delivery.iocm` (what a Rejection Note retracts of
the earlier readings), :mod:`~gateway.delivery.senders` (C-STORE, STOW-RS, FHIR, HL7 v2 over MLLP) and
:mod:`~gateway.delivery.deliverer` (durable tasks in the state store, retries, metrics).
"""

from gateway.delivery.config import DestinationsError, load_destinations, parse_destinations

__all__ = ["DestinationsError", "load_destinations", "parse_destinations"]
