"""Where results go: the destinations file (YAML or JSON), validated once at start.

::

    destinations:
      - name: pacs                      # [A-Za-z0-9_-], unique; used in URLs, metrics and `ctscreen send --to`
        kind: dicom                     # C-STORE of the SR and the key images
        ae_title: ORTHANC
        host: pacs.example.org
        port: 4242
        calling_ae_title: CTSCREEN      # optional (default: the gateway's AE title)
        tls: {ca_file: /etc/ctscreen/ca.pem, cert_file: ..., key_file: ...}   # optional
        rule: {verdicts: [positive, indeterminate], except_reasons: [not_chest]}
      - name: pacs-web
        kind: stowrs                    # DICOMweb STOW-RS of the same objects
        url: https://pacs.example.org/dicom-web
        headers: {Authorization: "Bearer ${PACS_TOKEN}"}                       # ${VAR}: from the environment
      - name: ris
        kind: fhir                      # FHIR R4 transaction Bundle (DiagnosticReport + Observations)
        url: https://ris.example.org/fhir                                      # a FHIR base, or a webhook
        rule: {verdicts: all, calling_ae_titles: [CT_ROOM_1]}
      - name: ris-hl7
        kind: hl7                       # HL7 v2.5.1 ORU^R01 over MLLP, delivered on the RIS's AA
        host: ris.example.org
        port: 2575
        sending_application: CTSCREEN   # MSH-3 to MSH-6 (receiving_*: what the RIS's interface expects)
        sending_facility: RADIOLOGY
        receiving_application: RIS
        receiving_facility: HOSPITAL
        connect_timeout_s: 10           # optional; timeout_s (30): how long the ACK may take
        tls: {ca_file: /etc/ctscreen/ca.pem}                                   # optional, as a DICOM peer's

A **rule** selects results: ``verdicts`` is ``all`` (default) or a list of verdicts; ``except_reasons``
leaves out results with those reason codes (``[not_chest]``: the head and neck CTs a router sent on stay off a
reader's worklist of indeterminate studies); ``calling_ae_titles`` (optional) keeps only studies received by
C-STORE from those AE titles. ``objects`` of a DICOM
destination is ``[sr, key_images]`` by default; add ``kos`` for the Key Object Selection document, and
``rejection`` for the IHE IOCM Rejection Note that retracts, when a study is screened again, the objects this
destination acknowledged for the earlier readings (with at least one of the others: it retracts what they sent).

Header values are secrets: they are :class:`pydantic.SecretStr`, never logged nor shown by the API;
``${VAR}`` in a value, in a ``url`` or a ``host`` is replaced by the environment variable ``VAR`` (so a
Kubernetes Secret can provide it). AE titles are checked as DICOM AE titles; a STOW-RS ``url`` is the
DICOMweb base, without a query string or fragment; an HL7 destination's application and facility names are 1 to 64
printable ASCII characters without an HL7 delimiter (``| ^ ~ \\ &``). :func:`load_destinations` raises :class:`DestinationsError` with a one-line message.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from aggregator.fhir import IdentifierSystems
from aggregator.hl7v2 import DELIMITERS, Parties
from aggregator.schema import REASONS

__all__ = ["DestinationsError", "Destination", "DicomDestination", "FhirDestination", "Hl7Destination", "Rule",
           "StowDestination", "load_destinations", "parse_destinations"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

ObjectKind = Literal["sr", "key_images", "kos", "rejection"]
"""What a DICOM destination can be sent: the SR, the key images, the Key Object Selection document (KOS) that
flags the evidence slices and the key images in the study (not by default: a PACS must accept its SOP class),
and the Rejection Note (IHE IOCM; a KOS too) that retracts the objects of the earlier readings a re-screen replaces."""


def _default_objects() -> list[ObjectKind]:
    return ["sr", "key_images"]


def _retracts_something(value: list[ObjectKind]) -> list[ObjectKind]:
    if "rejection" in value and not set(value) - {"rejection"}:  # it would retract nothing, ever
        raise ValueError("rejection retracts the earlier readings' objects sent here; list at least one of sr, "
                         "key_images, kos with it")
    return value


Objects = Annotated[list[ObjectKind], Field(default_factory=_default_objects, min_length=1),
                    AfterValidator(_retracts_something)]


def _ae_title(value: str) -> str:
    """A DICOM AE title (PS3.5 6.2, VR AE): 1 to 16 characters of the default repertoire (printable ASCII), no
    backslash, not all spaces; else every association was refused, or its A-ASSOCIATE-RQ never made, for a day."""
    if not value.strip(" ") or len(value) > 16 or "\\" in value or not all(" " <= c <= "~" for c in value):
        raise ValueError("not a DICOM AE title: 1 to 16 characters of printable ASCII (letters, digits, spaces, "
                         "punctuation), no backslash, not all spaces")
    return value


AeTitle = Annotated[str, AfterValidator(_ae_title)]


def _from_env(text: str, what: str) -> str:
    """``text`` with each ``${VAR}`` replaced by the environment variable ``VAR``.

    Raises
    ------
    ValueError
        An unset variable (named with ``what``, never the text).
    """
    missing = [v for v in _ENV.findall(text) if v not in os.environ]
    if missing:
        raise ValueError(f"{what} refers to unset environment variable {missing[0]}")
    return _ENV.sub(lambda m: os.environ[m.group(1)], text)


class DestinationsError(ValueError):
    """The destinations file is unreadable or invalid (one line, no secret in it)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Model):
    """Which results a destination receives."""

    verdicts: Literal["all"] | list[Literal["positive", "negative", "indeterminate"]] = "all"
    except_reasons: list[str] = Field(
        default_factory=list, description="results with these reason codes are not sent here (e.g. not_chest)")
    calling_ae_titles: list[str] | None = Field(
        None, description="only studies received by C-STORE from these AE titles (None: any source)")

    @field_validator("except_reasons")
    @classmethod
    def _known_reasons(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(REASONS))
        if unknown:  # a typo would let every such result through, silently
            raise ValueError(f"unknown reason code(s) {', '.join(unknown)}; a result's reason is one of "
                             f"{', '.join(sorted(REASONS))}")
        return value

    def admits(self, verdict: str, calling_ae_titles: set[str], reason: str = "") -> str | None:
        """None when the result goes; otherwise why not (a short sentence)."""
        if self.verdicts != "all" and verdict not in self.verdicts:
            return f"rule: {verdict} results are not sent here"
        if reason in self.except_reasons:
            return f"rule: {reason} results are not sent here"
        if self.calling_ae_titles is not None and not calling_ae_titles & set(self.calling_ae_titles):
            return "rule: the study did not come from one of the listed calling AE titles"
        return None


class Tls(_Model):
    """TLS of a DICOM association or an MLLP connection."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_hostname: str | None = None

    def context(self) -> ssl.SSLContext:
        """The client's TLS context (its CA, and its certificate when given).

        Raises
        ------
        ssl.SSLError, OSError
            A file that holds no certificate or key, or cannot be read.
        """
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


class _Base(_Model):
    name: str = Field(pattern=_NAME)
    rule: Rule = Field(default_factory=Rule)
    timeout_s: float = Field(30.0, gt=0, le=600)


class _Peer(_Base):
    """A peer reached by host and port (TCP), with optional TLS."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: Tls | None = None

    @field_validator("host", mode="before")
    @classmethod
    def _host_from_env(cls, value: object) -> object:
        return _from_env(value, "host") if isinstance(value, str) else value


class DicomDestination(_Peer):
    """A DICOM C-STORE peer (a PACS)."""

    kind: Literal["dicom"]
    ae_title: AeTitle
    calling_ae_title: AeTitle | None = None
    objects: Objects

    @property
    def where(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
"""An HTTP header name (RFC 9110 token)."""


class _Http(_Base):
    url: str = Field(pattern=r"^https?://[^\s]+$")
    headers: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("url", mode="before")
    @classmethod
    def _url_from_env(cls, value: object) -> object:
        return _from_env(value, "url") if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        import httpx

        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ValueError(f"url is no usable URL ({type(exc).__name__}: {str(exc)[:80]})") from None
        if not url.host:
            raise ValueError("url names no host")
        if url.userinfo:  # it would be in every delivery error: the log, the deliveries API, the web page
            raise ValueError("url must hold no user name or password: give credentials as a header "
                             "(e.g. Authorization: Basic ${VAR}, from an environment variable)")
        if url.port is not None and not 1 <= url.port <= 65535:  # else every delivery failed, retried for a day
            raise ValueError(f"url's port must be 1 to 65535, got {url.port}")
        return value

    @field_validator("headers", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        out = {}
        for key, raw in value.items():
            value_text = _from_env(str(raw), f"header {key!r}")
            # checked here, not at each delivery (every one failed, retried for a day); the value is never quoted
            if not _TOKEN.match(str(key)):
                raise ValueError(f"header name {str(key)[:40]!r} is no HTTP header name")
            if not value_text.isascii() or any(c in value_text for c in "\r\n\x00"):
                raise ValueError(f"header {key!r}: its value must be ASCII on one line")
            out[key] = value_text
        return out

    @property
    def where(self) -> str:
        return self.url.split("?", 1)[0]

    def header_values(self) -> dict[str, str]:
        """The headers in clear (for the request only)."""
        return {k: v.get_secret_value() for k, v in self.headers.items()}


class StowDestination(_Http):
    """A DICOMweb STOW-RS endpoint: ``url`` is the DICOMweb base (``.../studies`` is appended)."""

    kind: Literal["stowrs"]
    objects: Objects

    @field_validator("url")
    @classmethod
    def _base(cls, value: str) -> str:
        if "?" in value or "#" in value:  # `.../dicom-web?apikey=abc` was posted to `...?apikey=abc/studies`
            raise ValueError("url must hold no query string or fragment: it is the DICOMweb base that /studies is "
                             "appended to (give credentials as a header, e.g. Authorization: Bearer ${VAR})")
        return value


class FhirDestination(_Http):
    """A FHIR R4 server (transaction at its base URL) or a webhook taking the same Bundle.

    ``patient_id_system``, ``issuer_systems`` (Issuer of Patient ID -> system) and ``accession_system`` are
    the site's identifier systems: with them the report's subject and order are conditional references the
    server resolves to its own Patient and ServiceRequest; without them, identifiers it stores unresolved.
    """

    kind: Literal["fhir"]
    patient_id_system: str | None = Field(None, pattern=r"^\S+:\S+$")
    issuer_systems: dict[str, Annotated[str, Field(pattern=r"^\S+:\S+$")]] = Field(default_factory=dict)
    accession_system: str | None = Field(None, pattern=r"^\S+:\S+$")

    def systems(self) -> IdentifierSystems:
        return IdentifierSystems(self.patient_id_system, dict(self.issuer_systems), self.accession_system)


def _hl7_name(value: str) -> str:
    """An HL7 v2 application or facility name (HD's namespace id, MSH-3 to MSH-6): an HL7 delimiter in it would
    shift every field after it, and the RIS refused, or misfiled, every message."""
    if len(value) > 64 or any(c in DELIMITERS for c in value) or not all(" " <= c <= "~" for c in value):
        raise ValueError("not an HL7 application or facility name: at most 64 characters of printable ASCII, none of "
                         "the HL7 delimiters | ^ ~ \\ &")
    return value


Hl7Name = Annotated[str, AfterValidator(_hl7_name)]


class Hl7Destination(_Peer):
    """A RIS that takes HL7 v2.5.1 ORU^R01 results over MLLP (one connection a delivery); ``timeout_s`` is how long
    its ACK may take, ``connect_timeout_s`` the connection (and TLS handshake)."""

    kind: Literal["hl7"]
    sending_application: Hl7Name = Field("CTSCREEN", min_length=1)
    sending_facility: Hl7Name = ""
    receiving_application: Hl7Name = ""
    receiving_facility: Hl7Name = ""
    connect_timeout_s: float = Field(10.0, gt=0, le=600)

    @property
    def where(self) -> str:
        return f"MLLP {self.host}:{self.port}"

    def parties(self) -> Parties:
        return Parties(self.sending_application, self.sending_facility, self.receiving_application,
                       self.receiving_facility)


Destination = Annotated[DicomDestination | StowDestination | FhirDestination | Hl7Destination,
                        Field(discriminator="kind")]


class _File(_Model):
    destinations: list[Destination] = Field(default_factory=list)


def _one_line(exc: ValidationError, data: object) -> str:
    """The first error: where (``destinations.0.ae_title``, with the destination's name when it has a valid one)
    and why."""
    first = exc.errors()[0]
    path = first.get("loc", ())
    loc = ".".join(str(p) for p in path if p not in ("dicom", "stowrs", "fhir", "hl7"))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if len(path) > 1 and path[0] == "destinations" and isinstance(path[1], int) and isinstance(data, dict):
        listed = data.get("destinations")
        entry = listed[path[1]] if isinstance(listed, list) and path[1] < len(listed) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and re.match(_NAME, name):
            loc = f"destination {name!r} ({loc})"
    return f"{loc}: {first.get('msg', 'invalid')}{more}"


def parse_destinations(data: object, source: str = "destinations") -> list[Destination]:
    """Validate already-parsed data (a mapping with ``destinations``, or a list of destinations).

    Raises
    ------
    DestinationsError
        With a one-line reason (never a header value).
    """
    if isinstance(data, list):
        data = {"destinations": data}
    if data is None:
        data = {}
    try:
        parsed = TypeAdapter(_File).validate_python(data)
    except ValidationError as exc:
        raise DestinationsError(f"{source}: {_one_line(exc, data)}") from None
    names = [d.name for d in parsed.destinations]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DestinationsError(f"{source}: destination names must be unique, {dup[0]!r} appears twice")
    for d in parsed.destinations:
        if isinstance(d, _Peer) and d.tls is not None:
            for f in (d.tls.ca_file, d.tls.cert_file, d.tls.key_file):
                if f is not None and not Path(f).is_file():
                    raise DestinationsError(f"{source}: destination {d.name!r}: TLS file {f} does not exist")
            try:  # a file that holds no certificate failed every delivery with a traceback, retried for a day
                d.tls.context()
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise DestinationsError(f"{source}: destination {d.name!r}: its TLS files do not make a TLS context "
                                        f"({type(exc).__name__}: {getattr(exc, 'reason', None) or 'unreadable'})") from None
    return list(parsed.destinations)


def load_destinations(path: Path | str) -> list[Destination]:
    """Read and validate a destinations file (``.json``, or YAML otherwise).

    Raises
    ------
    DestinationsError
        When the file cannot be read or parsed, or a destination is invalid (one line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DestinationsError(f"destinations file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:  # e.g. UTF-16, as Windows PowerShell writes by default
        raise DestinationsError(f"destinations file {path}: not UTF-8 text (save it as UTF-8)") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json / yaml errors: one line, no content
        raise DestinationsError(f"destinations file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                                f" ({type(exc).__name__})") from None
    return parse_destinations(data, f"destinations file {path}")
