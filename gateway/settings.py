"""Gateway configuration: one :class:`Settings`, read from ``CTSCREEN_*`` environment variables.

Every value is validated when the gateway starts, so a bad Triton URL or a zero timeout stops the
process with a one-line error instead of failing the first study.

>>> Settings(triton_urls="a:8001, b:8001").triton_urls
['a:8001', 'b:8001']
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ctscreen.contracts import ENSEMBLE_MODEL
from ctscreen.lungs import CHEST_BODY_CM2, CHEST_LUNG_FIELD_CM2

_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.\-_]*[A-Za-z0-9])?):(\d{1,5})$")


def check_endpoint(url: str) -> str:
    """Validate one Triton gRPC endpoint ``host:port`` (no scheme) and return it stripped.

    >>> check_endpoint(" triton-0.triton:8001 ")
    'triton-0.triton:8001'
    """
    url = url.strip()
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            raise ValueError(f'Triton endpoint "{url}" must be host:port without a scheme.')
    match = _HOST_PORT.match(url)
    if match is None:
        raise ValueError(f'Triton endpoint "{url}" must look like host:port.')
    port = int(match.group(2))
    if not 0 < port < 65536:
        raise ValueError(f'Triton endpoint "{url}" has port {port} outside 1..65535.')
    return url


def secure_url(url: str) -> bool:
    """https, or http to a loopback host (a local test provider).

    >>> secure_url("https://id.example.org/realms/x"), secure_url("http://127.0.0.1:8080"), secure_url("http://idp")
    (True, True, False)
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost"))
def setting_error(exc: ValidationError) -> str:
    """The first problem of ``exc`` in one line for the operator, naming its ``CTSCREEN_*`` variable.

    >>> try:
    ...     Settings(triton_grpc_port=0)
    ... except ValidationError as exc:
    ...     print(setting_error(exc))
    CTSCREEN_TRITON_GRPC_PORT: Input should be greater than or equal to 1
    >>> try:
    ...     Settings(dicom_allowed_peers="CT1")
    ... except ValidationError as exc:
    ...     print(setting_error(exc))
    CTSCREEN_DICOM_ALLOWED_PEERS: DICOM peer 'CT1' must read AE@host, AE@cidr or AE@* (e.g. CT_SCANNER@10.0.0.5).
    """
    first = exc.errors()[0]
    loc, message = first.get("loc", ()), first.get("msg", "invalid")
    message = message.removeprefix("Value error, ")  # pydantic's, before the sentence a validator raised
    if not loc:  # a rule across settings: its message names the variables
        return message
    return f"CTSCREEN_{str(loc[0]).upper()}: {message}"


def default_data_dir() -> Path:
    """The user's data folder for ctscreen (``~/.local/share/ctscreen`` on Linux)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("ctscreen", appauthor=False))


NonCt = Literal["discard", "refuse"]
"""What the DICOM SCP does with a storage SOP class other than CT (``dicom_accept_non_ct``, :data:`gateway.dimse.NON_CT`)."""


class Settings(BaseSettings):
    """Gateway settings; each field reads ``CTSCREEN_<FIELD>`` from the environment.

    Lists (``CTSCREEN_TRITON_URLS``) take a comma-separated string or a JSON list.
    """

    # inf and nan are no number of seconds or bytes
    model_config = SettingsConfigDict(env_prefix="CTSCREEN_", extra="ignore", allow_inf_nan=False)

    # --- Triton -----------------------------------------------------------------------------
    triton_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:8001"],
        description="Triton gRPC endpoints (host:port); may be empty when discovery fills it.",
    )
    triton_model: str = Field(ENSEMBLE_MODEL, min_length=1, description="Triton model to call: the ct_screen ensemble, or the cpu "
                              "profile's ct_screen_fused (same inputs and outputs; ctscreen serve's choice "
                              "on its embedded Triton).")
    triton_timeout_s: float = Field(30.0, gt=0, le=600, description="Deadline of each gRPC call.")
    # cpu profile defaults (2 instances of each model on 2 cores): 4 requests of 2 slices in flight;
    # ONNX Runtime on a CPU costs more per slice in bigger batches (docs/triton.md); the Helm chart
    # sets its own for the gpu profiles
    triton_batch_size: int = Field(2, ge=1, le=64, description="Slices per inference request.")
    triton_max_inflight: int = Field(
        4, ge=1, le=64, description="Requests in flight per Triton endpoint."
    )
    triton_max_attempts: int = Field(
        6, ge=1, le=20, description="Tries per batch, on other endpoints when possible."
    )
    triton_ready_timeout_s: float = Field(2.0, gt=0, le=60, description="Deadline of readiness probes.")
    default_slices_per_second: float = Field(
        15.0, gt=0, description="Per-replica rate assumed for backlog seconds until one is measured."
    )

    # --- Triton discovery (gateway.discovery; the Helm chart sets these) -------------------------------
    triton_discovery: Literal["static", "endpointslice", "dns"] = Field(
        "static", description="static: keep triton_urls; endpointslice: watch the headless Service's "
                              "EndpointSlices (DNS outside a cluster); dns: resolve the Service name.",
    )
    triton_service: str = Field(
        "", validate_default=True, description="Headless Triton Service (needed unless discovery is static)."
    )
    triton_namespace: str = Field("", description="Namespace of that Service (default: the pod's own).")
    triton_port_name: str = Field("grpc", min_length=1, description="Service port the EndpointSlices name.")
    triton_grpc_port: int = Field(
        8001, ge=1, le=65535, description="Triton gRPC port (when a slice does not name it; always for DNS)."
    )
    triton_dns_interval_s: float = Field(5.0, gt=0, le=3600, description="Seconds between DNS resolutions.")

    # --- jobs and limits ---------------------------------------------------------------------
    max_concurrent_studies: int = Field(2, ge=1, le=256, description="Studies screened at once.")
    urgent_slots: int = Field(
        1, ge=0, le=64, description="Studies screened at once beyond max_concurrent_studies, urgent ones only: an urgent "
                                    "study starts at once while routine ones take every slot, and its batches go first.")
    priority_ageing_s: float = Field(
        3600.0, ge=0, description="How long a waiting study may be passed over by the studies of each higher rank that "
                                  "come after it: an urgent study goes before the routine ones queued less than this "
                                  "before it, a routine one before the low ones queued less than this before it (an "
                                  "urgent one, twice this), so no study waits for ever under a flood of more urgent "
                                  "ones. 0: first come, first served (the urgent slots still take urgent studies "
                                  "first); job_deadline_s or more: strict priority.")
    max_queued_studies: int = Field(
        4, ge=0, le=1024, description="Accepted studies waiting for a slot, per replica (the cluster takes the sum "
                                       "over its live replicas of this plus max_concurrent_studies); beyond: 429."
    )
    retry_after_s: int = Field(10, ge=1, le=3600, description="Retry-After of a 429 answer and of a 503 the intake gives when it can keep no more.")
    max_upload_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest request body (413 beyond)."
    )
    max_request_head_bytes: int = Field(
        64 * 1024, ge=8 * 1024, le=16 * 1024**2,
        description="Largest request line and headers of one request (431 and the connection closed beyond; "
                    "gateway.httpserver): uvicorn's httptools parser has no limit of its own.",
    )
    decode_workers: int = Field(2, ge=1, le=64, description="Threads decoding DICOM.")
    screen_ahead: bool = Field(
        True, description="Screen an upload's slices as they are parsed, before its job is accepted, while a "
        "slot is free (gateway.speculation); off: screening starts when the job is claimed.",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=3600,
        description="On shut-down, running studies and result deliveries being sent get this long to finish; the "
        "others are released to any replica.",
    )

    # --- state store and blob store (gateway.store) ------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the SQLite state store and the blob folder live by default.",
    )
    database_url: str | None = Field(
        None, description="postgresql://user:password@host/db for a cluster; default: SQLite in data_dir."
    )
    blob_dir: Path | None = Field(None, description="Folder of instance bytes (ReadWriteMany on Kubernetes); "
                                                    "default data_dir/blobs.")
    blob_url: str | None = Field(None, description="s3://bucket[/prefix]: instance bytes in an S3 bucket instead of "
                                                   "blob_dir; the bucket must exist. Credentials: AWS_ACCESS_KEY_ID and "
                                                   "AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, a web identity (IRSA) or "
                                                   "the node's role; permissions: s3:PutObject, s3:GetObject, "
                                                   "s3:DeleteObject, s3:ListBucket (and s3:GetBucketLocation without "
                                                   "s3_region).")
    s3_endpoint_url: str | None = Field(None, description="The S3 endpoint of a non-AWS store (MinIO, Ceph): "
                                                          "https://minio.example:9000 (scheme, host and port only); "
                                                          "default AWS.")
    s3_region: str | None = Field(None, description="The bucket's region (AWS_REGION is not read for it); default: "
                                                    "asked of the bucket once.")
    db_migrate: bool = Field(True, description="Upgrade the database schema at start.")
    db_start_wait_s: float = Field(
        90.0, ge=0, le=3600, description="How long a start waits for a PostgreSQL state store that cannot be reached "
                                         "yet (started after the gateway, a fail-over), trying every second; then it "
                                         "stops with one line. Within the chart's startup probe (120 s).")
    lease_s: float = Field(30.0, gt=0, le=3600, description="Lease of a claimed job, renewed while it runs.")
    progress_interval_s: float = Field(0.5, gt=0, le=60, description="Lease renewal and progress write period.")
    worker_poll_s: float = Field(0.5, gt=0, le=60, description="How often an idle worker looks for work.")
    sweep_interval_s: float = Field(0.5, gt=0, le=60, description="How often the sweeper runs.")
    gc_tuning: bool = Field(
        True, description="Freeze the start-up heap (gc.freeze) and run Python's youngest-generation collection "
                          "every 50,000 allocations, not 700: a study's DICOM headers are millions of short-lived "
                          "objects, and the default collector took about 5 % of the gateway's CPU. "
                          "False: Python's defaults.")
    malloc_tuning: bool = Field(
        True, description="Give the gateway's process the glibc malloc policy of Triton's (ctscreen.embedded.MALLOC_ENV, "
                          "by mallopt at start): a slice's decoded arrays come from the heap instead of fresh, "
                          "zero-filled mmaps. Names of it the environment sets (MALLOC_*_), or a GLIBC_TUNABLES naming "
                          "glibc.malloc. settings, are kept. False: glibc's defaults.")
    log_format: Literal["text", "json"] = Field(
        "text", description="The application log's lines (the gateway's and uvicorn's error and access logs, on "
                            "standard error): text, or json (one object a line: time, level, logger, message, "
                            "request_id, job_id, exception; gateway.logs). The Helm chart sets json.")
    job_deadline_s: float = Field(
        24 * 3600.0, gt=0, description="An accepted study that no Triton could take this long fails (instances kept)."
    )
    case_run_slices: int = Field(3, ge=1, le=50, description="Consecutive slices with lesions in one quadrant "
                                                               "that make a study positive (paper: 3).")
    case_run_mm: float | None = Field(
        None, gt=0, le=200, description="If set, the run must also cover this many millimetres "
                                        "(docs/case-rule.md, 6): three 0.625 mm slices cover 1.9 mm, three 5 mm ones 15 mm.")
    case_min_lung_field_cm2: float = Field(
        CHEST_LUNG_FIELD_CM2, ge=0, le=1000,
        description="A study whose widest lung field (cm², measured on the HU of up to 12 slices) is smaller, and "
                    "whose widest body section is smaller than case_min_body_cm2, is no chest CT (a head or a "
                    "limb): indeterminate, reason not_chest, whatever its boxes (docs/case-rule.md, 8). 0: no such "
                    "check.")
    case_min_body_cm2: float = Field(
        CHEST_BODY_CM2, ge=0, le=5000,
        description="The body section (cm²) below which a study with small lungs is no chest CT (a diseased adult "
                    "chest holds little air but is a chest's size). 0: the lung field alone decides.")
    retry_backoff_s: float = Field(2.0, gt=0, le=3600, description="First wait before a job is tried again.")
    retry_backoff_max_s: float = Field(60.0, gt=0, le=86400, description="Longest wait between two tries.")
    result_retention_s: float = Field(
        30 * 86400.0, gt=0, description="Finished jobs and their results are deleted this long after they finished."
    )
    instance_retention_s: float = Field(
        7 * 86400.0, gt=0, description="Instances of a finished job are deleted this long after it finished."
    )
    orphan_sweep_interval_s: float = Field(
        6 * 3600.0, ge=0, description="How often the blob folder is checked for blobs nothing names (0: never)."
    )
    orphan_keep_s: float = Field(
        7 * 86400.0, ge=0, description="Blobs the orphan sweep sets aside (orphans/ in the blob folder) are deleted "
                                       "this long after: a database restored to an earlier point names fewer blobs "
                                       "than the folder holds, and what it lost can be moved back until then.")
    orphan_grace_s: float = Field(
        3600.0, ge=300, description="A blob nothing names is removed once it is this old (a write and the row "
                                    "that names it take seconds apart)."
    )

    # --- DICOMweb STOW-RS -----------------------------------------------------------------------
    stow_quiet_period_s: float = Field(
        60.0, ge=0, le=86400,
        description="A STOW or C-STORE study is screened after this long without new instances (Orthanc's StableAge "
                    "and mercure's series timeout are 60 s too: a scanner sends its reconstructions of one study "
                    "tens of seconds apart, and each gap past it screens the study again and sends a second result "
                    "set). A sender that knows the study is whole says so: POST /v1/studies/{uid}/complete."
    )
    stow_max_pending_studies: int = Field(16, ge=1, description="STOW studies being received at once.")
    stow_max_pending_bytes: int = Field(
        4 * 1024**3, ge=1024, description="Bytes held for STOW studies not yet screened."
    )

    # --- DICOM C-STORE (gateway.dimse) ------------------------------------------------------------
    dicom_port: int | None = Field(
        None, ge=1, le=65535, description="If set, a DICOM Storage SCP (C-STORE, C-ECHO) listens on this port."
    )
    dicom_ae_title: str = Field("CTSCREEN", min_length=1, max_length=16, description="AE title of the SCP.")
    dicom_host: str = Field("0.0.0.0", min_length=1, description="Address the DICOM SCP listens on.")
    dicom_max_associations: int = Field(
        10, ge=1, le=1000, description="DICOM associations served at once; one more is rejected as transient "
                                       "(A-ASSOCIATE-RJ 2/3/2, local limit exceeded) and the sender retries."
    )
    dicom_acse_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait for a DICOM association's acceptance or release."
    )
    dicom_request_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="Longest wait for a DICOM connection's A-ASSOCIATE-RQ, while it holds one of "
                                        "the associations' places (a connection that sends nothing is closed then).",
    )
    dicom_max_connections_per_host: int = Field(
        4, ge=1, le=1000, description="DICOM connections one address holds at once; one more is closed as it is "
                                      "accepted (and audited), so one host cannot take every association's place.",
    )
    dicom_dimse_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait for an association's next DIMSE message."
    )
    dicom_network_timeout_s: float = Field(
        60.0, gt=0, le=86400, description="A DICOM association idle this long is aborted."
    )

    # --- security (issue 14): gateway.auth, gateway.admission, gateway.audit, gateway.dicom_security ---
    host: str = Field(
        "127.0.0.1", min_length=1,
        description="Address the HTTP server listens on; off loopback the gateway refuses to start without auth.",
    )
    auth_oidc_issuer: str | None = Field(None, description="OIDC issuer URL; bearer tokens are checked against it.")
    auth_oidc_audience: str | None = Field(None, description="Expected 'aud' of tokens (needed with an issuer).")
    auth_oidc_jwks_url: str | None = Field(None, description="JWKS URL (default: from the issuer's discovery).")
    auth_jwks_cache_s: float = Field(300.0, gt=0, le=86400, description="How long a fetched JWKS is used.")
    auth_api_keys_file: Path | None = Field(None, description="API key file (ctscreen keys); enables API keys.")
    auth_insecure: bool = Field(False, description="Serve without auth on a non-loopback address (--insecure).")
    # event streams (worklist and job events) open at once on this replica; beyond: 429 too_many_streams
    max_streams_per_caller: int = Field(8, ge=1, le=4096, description="Event streams one caller (API key name, "
                                        "token subject) holds open at once.")
    max_streams: int = Field(256, ge=1, le=65536, description="Event streams open at once, all callers together.")
    events_keepalive_s: float = Field(
        15.0, gt=0, le=30, description="An event stream with nothing to say sends a keep-alive comment this often "
        "(announced in its X-Keepalive-Interval header: the page takes a stream silent for 2.5 times as long for a "
        "dead connection).")
    auth_key_threads: int = Field(
        2, ge=1, le=64, description="Threads that hash API keys (scrypt); their own, not the pool probes and file "
        "I/O use.")
    auth_key_max_pending: int = Field(
        8, ge=1, le=4096, description="API key checks hashing or waiting for a thread at once; beyond: 429 auth_busy "
        "(a key already verified since the key file last changed needs no hash and is never refused).")
    auth_key_max_failures: int = Field(
        10, ge=1, description="Failed checks of one API key id within CTSCREEN_AUTH_KEY_FAILURE_WINDOW_S after which "
        "its keys are refused unhashed (429 auth_throttled) until that window ends.")
    auth_key_failure_window_s: float = Field(
        60.0, gt=0, le=86400, description="The window of CTSCREEN_AUTH_KEY_MAX_FAILURES, from an id's first failure.")
    audit_log_file: Path | None = Field(
        None, description="JSON-lines audit log (default: standard output)."
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="If set, /metrics is served on this port only (not on the API port)."
    )
    api_docs: bool = Field(
        True, description="Serve the API's schema (/openapi.json), open like the probes (it holds no data); "
                          "false: not served.")
    api_docs_pages: bool = Field(
        False, description="Serve /docs and /redoc too (with api_docs). Off by default: their pages load Swagger UI "
                           "and ReDoc from a CDN into this origin, where the web page keeps its sign-in "
                           "(sessionStorage), and a closed hospital network has no CDN anyway.")
    upload_budget_bytes: int = Field(
        4 * 1024**3, ge=1024, description="Request bodies (uploads, STOW) in flight at once; beyond: 429."
    )
    max_uploads_per_client: int = Field(4, ge=1, le=1024, description="Bodies one client sends at once.")
    upload_client_bytes: int | None = Field(
        None, ge=1024,
        description="Bytes of request bodies one client holds in flight at once; default: half the upload budget, "
        "or the largest upload if that is more (a client's first body is never refused by it).",
    )
    body_idle_timeout_s: float = Field(
        60.0, gt=0, le=3600,
        description="A request body from which no byte arrives for this long is dropped (408 body_stalled).",
    )
    upload_tmp_dir: Path | None = Field(None, description="Where request bodies are spooled (default: temp dir).")
    dicom_allowed_peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles allowed, as AE@host, AE@cidr or AE@* (comma-separated); empty: any.",
    )
    dicom_urgent_ae_titles: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles whose studies are urgent (comma-separated; an emergency department's scanner): "
                    "screened before routine ones whatever Priority their C-STORE requests carry.",
    )
    dicom_sop_classes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="CT SOP classes the SCP negotiates and stores (a subset of CT storage; "
                                          "empty: all); a CT class left out is not negotiated."
    )
    dicom_accept_non_ct: NonCt = Field(
        "discard", description="A storage SOP class other than CT (a dose SR, a secondary capture in a study a PACS "
                               "routes whole): discard (negotiated, each instance answered Success and dropped, "
                               "counted and audited) or refuse (not negotiated: a router forwarding the study fails).")
    dicom_tls_cert: Path | None = Field(None, description="PEM certificate of the DICOM SCP (enables TLS).")
    dicom_tls_key: Path | None = Field(None, description="PEM private key of that certificate.")
    dicom_tls_ca: Path | None = Field(None, description="CA bundle; if set, peers must present a certificate (mTLS).")
    dicom_tls_bind_ae_title: bool = Field(
        False, description="With mutual TLS, a calling AE title must be its certificate's subject CN or a DNS name "
                           "of its subjectAltName: a certificate then speaks for one sender only."
    )
    dicom_max_backlog_slices: int | None = Field(
        None, ge=1, description="C-STORE and STOW-RS refuse instances (0xA700), uploads 503, while this gateway counts more slices "
                                "than this waiting to be screened (a study being received is let finish)."
    )
    dicom_min_free_bytes: int | None = Field(
        None, ge=0, description="C-STORE and STOW-RS refuse instances (0xA700), uploads 503, while the blob folder's volume has "
                                "less free space than this."
    )

    @field_validator("triton_discovery", "triton_service", "triton_namespace", mode="before")
    @classmethod
    def _strip(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str):
            value = value.strip()
            if info.field_name == "triton_discovery":
                value = value.lower() or "static"
        return value

    @field_validator("triton_service")
    @classmethod
    def _check_service(cls, value: str, info: ValidationInfo) -> str:
        mode = info.data.get("triton_discovery", "static")
        if mode != "static" and not value:
            raise ValueError(f"CTSCREEN_TRITON_DISCOVERY={mode} needs CTSCREEN_TRITON_SERVICE (the headless Triton "
                             "Service).")
        return value

    @field_validator("data_dir", "blob_dir", "auth_api_keys_file", "audit_log_file", "upload_tmp_dir",
                     "dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca", "destinations_file", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        # CTSCREEN_DATA_DIR= put the state store in the working folder; CTSCREEN_AUTH_API_KEYS_FILE= named "."
        if isinstance(value, str) and not value.strip():
            raise PydanticUseDefault()
        return value

    @field_validator("dicom_allowed_peers", "dicom_sop_classes", "dicom_urgent_ae_titles", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        from gateway.dicom_security import check_sop_classes, parse_peers

        if self.auth_oidc_issuer and not self.auth_oidc_audience:
            raise ValueError("CTSCREEN_AUTH_OIDC_AUDIENCE must be set with CTSCREEN_AUTH_OIDC_ISSUER.")
        for name in ("auth_oidc_issuer", "auth_oidc_jwks_url"):
            url = getattr(self, name)
            if url and not secure_url(url):
                raise ValueError(f"CTSCREEN_{name.upper()} {url!r} must be an https:// URL (http:// only on loopback).")
        if self.progress_interval_s * 3 > self.lease_s:  # renewals must come well inside each lease
            raise ValueError(f"CTSCREEN_PROGRESS_INTERVAL_S ({self.progress_interval_s:g}) must be at most a third of "
                             f"CTSCREEN_LEASE_S ({self.lease_s:g}): the lease is renewed that often, and would lapse "
                             "between renewals, handing running jobs to other replicas.")
        if self.max_upload_bytes > self.upload_budget_bytes:
            raise ValueError(f"CTSCREEN_MAX_UPLOAD_BYTES ({self.max_upload_bytes}) must not exceed "
                             f"CTSCREEN_UPLOAD_BUDGET_BYTES ({self.upload_budget_bytes}): such an upload could never "
                             "be admitted.")
        if (self.dicom_tls_cert is None) != (self.dicom_tls_key is None):
            raise ValueError("CTSCREEN_DICOM_TLS_CERT and CTSCREEN_DICOM_TLS_KEY go together.")
        if self.dicom_tls_ca is not None and self.dicom_tls_cert is None:
            raise ValueError("CTSCREEN_DICOM_TLS_CA (mutual TLS) needs CTSCREEN_DICOM_TLS_CERT and CTSCREEN_DICOM_TLS_KEY.")
        if self.dicom_tls_bind_ae_title and self.dicom_tls_ca is None:
            raise ValueError("CTSCREEN_DICOM_TLS_BIND_AE_TITLE needs mutual TLS (CTSCREEN_DICOM_TLS_CA): without "
                             "a client certificate there is nothing to bind the AE title to.")
        # checked here (a rule of the model, whose errors name no field): the message names the variable
        for name, check in (("dicom_allowed_peers", parse_peers), ("dicom_sop_classes", check_sop_classes)):
            try:
                check(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"CTSCREEN_{name.upper()}: {exc}") from None
        return self
    # --- deliveries to PACS / RIS (gateway.delivery) -------------------------------------------------
    uid_root: str | None = Field(
        None, description="The organisation's DICOM UID root (e.g. 1.2.840.99999.7.): the SRs and key images "
                          "are made under it; empty: pydicom's root 1.2.826.0.1.3680043.8.498. Each result keeps the "
                          "root it was made under (its uid_root): a change applies to results made after it."
    )
    destinations_file: Path | None = Field(
        None, description="YAML or JSON file of destinations (DICOM C-STORE, STOW-RS, FHIR) and their rules; "
                          "validated at start (default: results are not sent anywhere).")
    delivery_backoff_s: float = Field(5.0, gt=0, le=3600, description="First wait before a delivery is tried again.")
    delivery_backoff_max_s: float = Field(300.0, gt=0, le=86400, description="Longest wait between two tries.")
    delivery_max_attempts: int = Field(
        300, ge=1, le=1000,
        description="Tries before a delivery is failed: with the default back-off (5 s doubling to 300 s), 300 "
                    "tries span about a day, so a PACS down for a maintenance window gets its results after it.")
    delivery_lease_s: float = Field(120.0, gt=0, le=3600, description="Lease of a delivery being sent.")
    delivery_poll_s: float = Field(0.5, gt=0, le=60, description="How often the deliverer looks for work.")
    delivery_concurrency: int = Field(2, ge=1, le=64, description="Deliveries sent at once to each destination, per replica.")
    delivery_backfill_s: float = Field(
        3600.0, gt=0, description="Done jobs finished this recently get deliveries to a newly added destination.")

    @field_validator("destinations_file")
    @classmethod
    def _check_destinations(cls, value: Path | None) -> Path | None:
        if value is None or not str(value).strip():
            return None
        from gateway.delivery.config import load_destinations

        load_destinations(value)  # DestinationsError (a ValueError) with a one-line reason
        return value

    def destinations(self) -> list:
        """The validated destinations (empty without ``destinations_file``)."""
        if self.destinations_file is None:
            return []
        from gateway.delivery.config import load_destinations

        return load_destinations(self.destinations_file)

    @field_validator("uid_root")
    @classmethod
    def _check_uid_root(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        root = value.strip().rstrip(".")
        arcs = r"([01]\.([0-9]|[1-3][0-9])|2\.(0|[1-9][0-9]*))(\.(0|[1-9][0-9]*))*"  # ISO/IEC 9834-1 (X.660)
        if not re.fullmatch(arcs, root) or len(root) > 40:  # as the chart's schema
            raise ValueError(f"{value.strip()!r} is not a DICOM UID root: digits in dot-separated parts without "
                             "leading zeros, at least two, the first 0, 1 or 2 (under 0 and 1 the second at most "
                             "39), at most 40 characters (the rest of the 64 carry each UID's own part).")
        return root + "."

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from gateway.store.store import async_url

        async_url(value.strip())  # raises ValueError with the reason
        return value.strip()

    @field_validator("blob_url")
    @classmethod
    def _check_blob_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from gateway.store.blobs import split_blob_url

        split_blob_url(value.strip())  # raises ValueError with the reason
        return value.strip()

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_s3_endpoint(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {value.strip()!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"is a scheme, a host and a port only (the client cannot send to a path), got "
                             f"{value.strip()!r}")
        try:
            parts.port  # noqa: B018 - raises on a port that is not one
        except ValueError as exc:
            raise ValueError(f"has a bad port: {exc}") from None
        return value.strip()

    def blob_store(self) -> Any:
        """The blob store in use: the S3 bucket of ``blob_url``, else the folder (:meth:`blobs`)."""
        from gateway.store.blobs import open_blobs

        return open_blobs(self.blobs(), self.blob_url, endpoint_url=self.s3_endpoint_url, region=self.s3_region)

    def database(self) -> str:
        """The database URL in use (SQLite in ``data_dir`` unless ``database_url``)."""
        return self.database_url or f"sqlite:///{self.data_dir / 'ctscreen.db'}"

    @property
    def replica_alive_s(self) -> float:
        """A replica whose sweeper has not run for this long is taken for gone: its waiting jobs are adopted,
        and its share of the upload limit no longer counts (``max(lease_s, 4 * sweep_interval_s)``)."""
        return max(self.lease_s, 4 * self.sweep_interval_s)

    def spool_dir(self) -> Path:
        """Where uploads are spooled while they are read and screened (``data_dir/spool``)."""
        return self.data_dir / "spool"

    def blobs(self) -> Path:
        """The blob folder in use."""
        return self.blob_dir or self.data_dir / "blobs"

    @field_validator("triton_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part for part in text.split(",") if part.strip()]
        return value

    @field_validator("triton_urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        urls = [check_endpoint(v) for v in value]
        if len(set(urls)) != len(urls):
            raise ValueError(f"Triton endpoints must be distinct, got {urls}.")
        return urls


OTHER_VARIABLES = frozenset({
    # the command-line client (`ctscreen screen`, `send`) and the embedded Triton (ctscreen.embedded, ctscreen.repo)
    "CTSCREEN_URL", "CTSCREEN_TOKEN", "CTSCREEN_CACHE_DIR", "CTSCREEN_TRITONSERVER", "CTSCREEN_TRITON_BACKENDS",
    "CTSCREEN_MODEL_SOURCE", "CTSCREEN_ONNX_DIR",
    # benchmarks, scripts and tests
    "CTSCREEN_BENCH_GATEWAY_APP", "CTSCREEN_MONAI_VENV", "CTSCREEN_TRITON_HOME", "CTSCREEN_COMMIT",
    "CTSCREEN_BUILD_ENGINES_IMPL", "CTSCREEN_TEST_WORKERS", "CTSCREEN_CHROMIUM", "CTSCREEN_UI_SCREENSHOTS",
    "CTSCREEN_RUN_DATA_PROBE",
})
"""``CTSCREEN_*`` variables that are no gateway setting but are read by ctscreen's other parts."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``CTSCREEN_*`` variable in ``environ`` that nothing reads, with the closest setting.

    :class:`Settings` ignores variables it does not know (the same prefix serves the client, the embedded
    Triton and the benchmarks), so a misspelt setting would silently keep its default; the gateway logs
    these lines at start.

    >>> unknown_variables({"CTSCREEN_TRITON_BATCHSIZE": "16", "CTSCREEN_URL": "http://x", "HOME": "/root"})
    ['CTSCREEN_TRITON_BATCHSIZE is no ctscreen setting and is ignored (did you mean CTSCREEN_TRITON_BATCH_SIZE?)']
    """
    import difflib

    known = {f"CTSCREEN_{name.upper()}" for name in Settings.model_fields}
    lines = []
    for name in sorted(environ):
        if not name.startswith("CTSCREEN_") or name in known or name in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(name, sorted(known | OTHER_VARIABLES), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is no ctscreen setting and is ignored{hint}")
    return lines
