"""HTTP routers of the gateway: ``/v1`` (studies, jobs), ``/dicomweb`` (STOW-RS) and operations."""
