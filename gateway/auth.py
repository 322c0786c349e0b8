"""Who may call the gateway: OIDC bearer tokens and API keys, checked per route by scope.

Two kinds of credential, both sent as ``Authorization: Bearer <credential>`` (an API key may also come
as ``X-API-Key``):

* **OAuth2 access tokens** (JWT) from an OpenID Connect provider. The issuer's JWKS is found through
  ``<issuer>/.well-known/openid-configuration`` (or ``CTSCREEN_AUTH_OIDC_JWKS_URL``), fetched with
  httpx and cached (``CTSCREEN_AUTH_JWKS_CACHE_S``); an unknown ``kid`` refetches it at most every
  10 s, so key rotation works without letting junk tokens hammer the provider. PyJWT verifies the
  signature and ``iss``, ``aud``, ``exp`` and ``nbf`` (30 s leeway); only RS256 and ES256 are accepted,
  so ``alg: none`` and HS256 signed with the public key (algorithm confusion) are refused before any
  key is looked at. Scopes come from the ``scope`` (space-separated) or ``scp`` claim. The issuer's ID,
  logout and refresh tokens are refused (401 ``unauthorized``, ``error="invalid_token"``): a ``typ`` header
  other than ``at+jwt`` or ``JWT`` (RFC 9068), Keycloak's ``typ`` claim other than ``Bearer``/``DPoP``, or a
  ``nonce``, ``at_hash``, ``c_hash`` or ``s_hash`` claim, or Cognito's ``token_use`` ``id`` (:func:`_not_an_access_token`).
* **API keys** for machines (:mod:`gateway.keys`), stored hashed. A key not verified since the key file
  last changed costs an scrypt (tens of ms of CPU), as does any key of an unknown id: :class:`KeyChecks`
  runs them on threads of their own (``CTSCREEN_AUTH_KEY_THREADS``), not the default pool that blob I/O
  waits on; at most ``CTSCREEN_AUTH_KEY_MAX_PENDING`` hash or wait at once, more are
  refused unhashed (429 ``auth_busy``, Retry-After 1); and an id that failed
  ``CTSCREEN_AUTH_KEY_MAX_FAILURES`` times within ``CTSCREEN_AUTH_KEY_FAILURE_WINDOW_S`` is refused
  unhashed until that window ends (429 ``auth_throttled`` with the seconds left, logged when it starts,
  audited with the reason). A key already verified is never refused by either (no hash): a flood of
  wrong secrets for a key's id does not lock out the caller who uses it, unless the key file changes
  meanwhile.

Scopes: ``studies:write`` (upload, STOW-RS, complete), ``results:read`` (jobs, studies, SR, events) and
``admin`` (implies both). Each route depends on :func:`require` with its scope; a missing or bad
credential is 401 (with ``WWW-Authenticate``), a valid one without the scope 403. ``GET /v1/me`` needs a
good credential and no scope (:func:`authenticated`): it tells the caller its scopes. ``/healthz``,
``/readyz`` and ``/readyz/triton`` stay open; ``/metrics`` needs ``admin`` on the API port and is
open on a port of its own (``CTSCREEN_METRICS_PORT``).

Without any credential source configured, every request is the anonymous principal with every scope:
allowed on loopback (``make demo``), refused at start-up on any other address unless ``--insecure``
(:func:`check_exposure`, which sees ``CTSCREEN_HOST``); and since ``uvicorn --host`` is not a setting the
app sees, each call that reaches a non-loopback address of the server is refused too (403
``auth_not_configured``), whatever address the server was told to bind. A call through a Unix socket (a
proxy in front of it) reaches no address this check can judge: such a gateway needs its authentication
configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import jwt
from fastapi import Depends, Request
from fastapi.responses import StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from gateway.audit import note_reason
from gateway.errors import (
    AuthBusy,
    AuthNotConfigured,
    AuthThrottled,
    AuthUnavailable,
    InsufficientScope,
    RetryLater,
    TooManyStreams,
    Unauthorized,
)
from gateway.keys import SCOPES, ApiKey, KeyStore, parse_key
from gateway.settings import Settings, secure_url

logger = logging.getLogger(__name__)

__all__ = [
    "ADMIN", "RESULTS_READ", "STUDIES_WRITE", "AuthConfigError", "Authenticator", "Caller", "KeyChecks", "OidcVerifier",
    "Principal", "StreamGuard", "StreamSlots", "check_exposure", "event_stream", "stream_slot", "local_address", "not_local", "reached_off_loopback", "require", "still_holds",
    "authenticated",
]

STUDIES_WRITE, RESULTS_READ, ADMIN = SCOPES
ALGORITHMS = ("RS256", "ES256")
"""Signature algorithms accepted on tokens (asymmetric only: no ``none``, no HS*)."""
LEEWAY_S = 30
MIN_REFETCH_S = 10.0


class AuthConfigError(ValueError):
    """The security settings do not allow the gateway to start (one line for the operator)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``subject`` (token ``sub`` or key name), how, and with which scopes."""

    subject: str
    kind: str  # "oidc" | "api_key" | "anonymous"
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        """Whether the principal may act with ``scope`` (``admin`` implies every scope)."""
        return scope in self.scopes or ADMIN in self.scopes


ANONYMOUS = Principal("anonymous", "anonymous", frozenset(SCOPES))


class TokenInvalid(Exception):
    """The token cannot be accepted; the message is safe to show the client."""


class ProviderUnavailable(Exception):
    """The OIDC provider's keys cannot be fetched and none are cached."""


class OidcVerifier:
    """Verifies OIDC access tokens against the issuer's JWKS.

    Parameters
    ----------
    issuer : str
        Expected ``iss`` (also where discovery looks).
    audience : str
        Expected ``aud``.
    jwks_url : str | None
        The JWKS; discovered from the issuer when None.
    cache_s : float
        How long a fetched JWKS is used before it is fetched again.
    timeout_s : float
        Deadline of each fetch.
    """

    def __init__(self, issuer: str, audience: str, *, jwks_url: str | None = None, cache_s: float = 300.0,
                 timeout_s: float = 5.0) -> None:
        self.issuer, self.audience = issuer, audience
        self.jwks_url = jwks_url
        self.cache_s, self.timeout_s = cache_s, timeout_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -1e9  # the last fetch that worked
        self._tried_at = -1e9  # the last fetch, whether or not it worked
        self._lock = asyncio.Lock()

    async def _get_json(self, client: httpx.AsyncClient, url: str, what: str) -> dict[str, Any]:
        """The JSON object at ``url``; ProviderUnavailable for an http URL off loopback, an HTTP error or a
        body that is not a JSON object."""
        if not secure_url(url):
            raise ProviderUnavailable(f"the {what} URL {url!r} is not https:// (http:// only on loopback)")
        response = await client.get(url)
        response.raise_for_status()
        body = response.json()
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"the {what} is not a JSON object")
        return body

    async def _fetch(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            url = self.jwks_url
            if url is None:
                doc = await self._get_json(client, self.issuer.rstrip("/") + "/.well-known/openid-configuration",
                                           "discovery document")
                if doc.get("issuer") != self.issuer:
                    raise ProviderUnavailable(f"the discovery document names issuer {str(doc.get('issuer'))[:200]!r}")
                url = doc.get("jwks_uri")
                if not isinstance(url, str):
                    raise ProviderUnavailable("the discovery document has no jwks_uri")
            listed = (await self._get_json(client, url, "JWKS")).get("keys")
        if not isinstance(listed, list):
            raise ProviderUnavailable("the JWKS has no list of keys")
        keys: dict[str, jwt.PyJWK] = {}
        for i, data in enumerate(listed):
            if not isinstance(data, dict) or data.get("use", "sig") != "sig" or data.get("kty") not in ("RSA", "EC"):
                continue
            try:
                keys[str(data.get("kid", f"#{i}"))] = jwt.PyJWK(data)
            except Exception as exc:  # noqa: BLE001 - PyJWK raises more than PyJWTError on an odd key ("alg": "none"
                # is NotImplementedError, a list-valued "alg" TypeError): one odd key must not cost the others
                logger.warning("JWKS key %s of %s ignored: %s: %s", str(data.get("kid"))[:64], url,
                               type(exc).__name__, str(exc)[:200])
        self._keys, self._fetched_at = keys, time.monotonic()
        logger.info("JWKS of %s fetched: %d signing keys", self.issuer, len(keys))

    async def _key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        now = time.monotonic()
        missing = kid is not None and kid not in self._keys
        # after a fetch that failed, the next waits MIN_REFETCH_S: a provider that hangs is asked once per
        # interval, not once per request in turn (each would wait its whole timeout behind the lock)
        due = now - self._fetched_at > self.cache_s or (missing and now - self._fetched_at > MIN_REFETCH_S)
        if due and now - self._tried_at > MIN_REFETCH_S:
            seen = self._tried_at
            async with self._lock:
                if self._tried_at == seen:  # nobody fetched while this one waited for the lock
                    self._tried_at = time.monotonic()
                    try:
                        await self._fetch()
                    except (httpx.HTTPError, ValueError, ProviderUnavailable) as exc:
                        logger.warning("JWKS of %s not fetched: %s", self.issuer, exc)
        if not self._keys:
            raise ProviderUnavailable("no signing keys could be fetched from the issuer")
        if kid is None:
            fitting = [k for k in self._keys.values() if k.algorithm_name == alg]
            if len(fitting) != 1:
                raise TokenInvalid("the token has no kid and the issuer has no single key for its algorithm")
            return fitting[0]
        key = self._keys.get(kid)
        if key is None:
            raise TokenInvalid("the token's signing key is not in the issuer's JWKS")
        return key

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims once signature, algorithm, ``iss``, ``aud``, ``exp`` and ``nbf`` hold and it is
        an access token (not an ID, logout or refresh token: :func:`_not_an_access_token`).

        Raises
        ------
        TokenInvalid
            With a reason safe to return to the client.
        ProviderUnavailable
            When the JWKS cannot be fetched and none is cached.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenInvalid("the credential is neither an API key nor a well-formed JWT") from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenInvalid(f"token algorithm {str(alg)[:10]!r} is not accepted (only {', '.join(ALGORITHMS)})")
        key = await self._key(header.get("kid"), alg)
        if key.algorithm_name != alg:
            raise TokenInvalid(f"the signing key is for {key.algorithm_name}, the token says {alg}")
        try:
            claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=[alg], audience=self.audience,
                                                issuer=self.issuer, leeway=LEEWAY_S,
                                                options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError as exc:
            raise TokenInvalid("the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:  # nbf or iat in the future
            raise TokenInvalid(f"the token is not valid yet ({_claim_of(exc)})") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenInvalid("the token is not for this audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenInvalid("the token is from another issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenInvalid(f"the token lacks the {exc.claim!r} claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenInvalid("the token's signature does not verify") from exc
        except jwt.InvalidTokenError as exc:  # a claim of the wrong type (sub not a string, exp not a number)
            raise TokenInvalid(f"the token's claims are malformed: {str(exc)[:120]}") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise TokenInvalid("the token's signature does not verify") from exc
        not_access = _not_an_access_token(header, claims)
        if not_access:
            raise TokenInvalid(not_access)
        return claims


ACCESS_TYPES = frozenset({"jwt", "at+jwt"})
"""``typ`` header values of an access token (RFC 9068 ``at+jwt``; ``JWT`` from providers that predate it)."""
ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash", "s_hash")
"""Claims only an OpenID Connect ID token carries (OIDC Core 2, 3.1.3.6, 3.3.2.11, FAPI): ``nonce`` is in every ID
token of a sign-in that sent one (each browser sign-in does; ``at_hash`` is optional in the code flow)."""


def _not_an_access_token(header: dict[str, Any], claims: dict[str, Any]) -> str | None:
    """Why a well-signed JWT of the issuer is not an access token (None: it may be one).

    An identity provider signs ID tokens, logout tokens and refresh tokens with the same keys as access
    tokens, and an ID token's audience is the client it was issued to: where that client id is also the API's
    audience (a single-page viewer registered as both), a browser's ID token would pass every other check.
    It names a person, not a grant; it is refused by its header type (RFC 8725 3.11), by the ``typ`` claim
    Keycloak writes (``ID``, ``Refresh``, ``Logout``; ``Bearer`` or ``DPoP`` on access tokens), by the ``token_use``
    claim AWS Cognito writes (``id``; ``access`` on access tokens) or by a claim only ID
    tokens carry (:data:`ID_TOKEN_CLAIMS`). ``nonce`` alone is not held against a token that grants scopes (``scope``
    or ``scp``; an ID token grants none) or that its Keycloak ``typ`` claim calls an access token: Azure AD B2C
    copies the sign-in's ``nonce`` into its access tokens, as Keycloak did before 25 (keycloak#26893). A scope-less
    ID token with only a ``nonce`` would get 403 on every route anyway; refused here, it is told what it is."""
    typ = header.get("typ")
    if typ is not None and str(typ).lower().removeprefix("application/") not in ACCESS_TYPES:
        return f"the token's type {str(typ)[:40]!r} is not an access token's (JWT or at+jwt)"
    kind = claims.get("typ")
    if kind is not None and str(kind).lower() not in ("bearer", "dpop"):  # Keycloak: DPoP-bound access tokens
        return f"the token is a {str(kind)[:20]!r} token, not an access token"
    use = claims.get("token_use")  # AWS Cognito: "id" or "access"
    if use is not None and str(use).lower() != "access":
        return f"the token is a {str(use)[:20]!r} token (token_use), not an access token"
    grants = claims.get("scope") is not None or claims.get("scp") is not None
    held = [name for name in ID_TOKEN_CLAIMS
            if name in claims and not (name == "nonce" and (kind is not None or grants))]
    if held:
        return f"the token is an ID token (it carries {held[0]}), not an access token"
    return None


def _claim_of(exc: Exception) -> str:
    """``iat`` or ``nbf``: which claim PyJWT found in the future."""
    return "iat" if "iat" in str(exc) else "nbf"


def _scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scp", ""))
    items = raw.split() if isinstance(raw, str) else [str(s) for s in raw] if isinstance(raw, list) else []
    return frozenset(s for s in items if s in SCOPES)


class KeyChecks:
    """API key checks, bounded: scrypt on threads of their own, a few at a time, and not at all for an id
    that failed too often lately.

    Parameters
    ----------
    keys : KeyStore
        The keys.
    threads : int
        Threads that hash.
    max_pending : int
        Checks hashing or waiting for a thread at once; more are refused (:class:`gateway.errors.AuthBusy`).
    max_failures : int
        Failures of one id within ``window_s`` (from its first) after which its keys are refused unhashed
        until the window ends (:class:`gateway.errors.AuthThrottled`).
    window_s : float
        That window.
    """

    MAX_IDS = 10_000
    """Ids whose failures are remembered at most (random ids would otherwise grow the table without end)."""

    def __init__(self, keys: KeyStore, *, threads: int = 2, max_pending: int = 8, max_failures: int = 10,
                 window_s: float = 60.0) -> None:
        self.keys, self.threads, self.max_pending = keys, threads, max_pending
        self.max_failures, self.window_s = max_failures, window_s
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0  # changed on the event loop only
        self._failures: dict[str, tuple[float, int]] = {}  # id -> (first failure of its window, failures)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="api-key-check")
        return self._pool

    def _throttled_for(self, key_id: str, now: float) -> float:
        """Seconds ``key_id`` stays refused unhashed (0: it may be checked)."""
        entry = self._failures.get(key_id)
        if entry is None or entry[1] < self.max_failures:
            return 0.0
        return max(0.0, entry[0] + self.window_s - now)

    def _failed(self, key_id: str, now: float) -> None:
        entry = self._failures.get(key_id)
        entry = (now, 1) if entry is None or now >= entry[0] + self.window_s else (entry[0], entry[1] + 1)
        self._failures[key_id] = entry
        if entry[1] == self.max_failures:
            logger.warning("API key id %s failed %d checks within %g s: its keys are refused unhashed for %.0f s",
                           key_id, entry[1], self.window_s, entry[0] + self.window_s - now)
        if len(self._failures) > self.MAX_IDS:
            self._failures = {k: v for k, v in self._failures.items() if now < v[0] + self.window_s}
            while len(self._failures) > self.MAX_IDS // 2:  # oldest first
                del self._failures[next(iter(self._failures))]

    async def verify(self, key: str) -> ApiKey | None:
        """The active record of ``key`` or None, as :meth:`gateway.keys.KeyStore.verify`.

        Raises
        ------
        gateway.errors.AuthThrottled
            The key's id failed too often lately (not hashed).
        gateway.errors.AuthBusy
            Too many checks are hashing or waiting (not hashed).
        ValueError
            The key file cannot be read.
        """
        record = await asyncio.to_thread(self.keys.cached, key)  # no scrypt: a file stat and a dict
        parsed = parse_key(key)
        if record is not None or parsed is None:
            return record
        key_id, now = parsed[0], time.monotonic()
        wait = self._throttled_for(key_id, now)
        if wait > 0:
            raise AuthThrottled(f"API key id {key_id} failed too many checks lately; its keys are refused for "
                                f"{math.ceil(wait)} s.", math.ceil(wait))
        if self._pending >= self.max_pending:
            raise AuthBusy("Too many API key checks are running; try again shortly.", 1)
        self._pending += 1
        try:
            record = await asyncio.get_running_loop().run_in_executor(self._executor(), self.keys.verify, key)
        finally:
            self._pending -= 1
        if record is None:
            self._failed(key_id, time.monotonic())
        return record


class Authenticator:
    """Turns a request's credential into a :class:`Principal` (held as ``app.state.auth``).

    Parameters
    ----------
    oidc : OidcVerifier | None
        Token verification, when an issuer is configured.
    keys : KeyStore | KeyChecks | None
        API keys, when a key file is configured (a bare store: checked with :class:`KeyChecks`' defaults).
    """

    def __init__(self, oidc: OidcVerifier | None = None, keys: KeyStore | KeyChecks | None = None, *,
                 anonymous_anywhere: bool = False) -> None:
        self.oidc = oidc
        self.keys = KeyChecks(keys) if isinstance(keys, KeyStore) else keys
        self.anonymous_anywhere = anonymous_anywhere  # no credential source and --insecure: off loopback too

    @property
    def enabled(self) -> bool:
        """Whether any credential source is configured (else everyone is anonymous)."""
        return self.oidc is not None or self.keys is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """The authenticator the ``auth_*`` settings describe."""
        oidc = None
        if settings.auth_oidc_issuer:
            if not settings.auth_oidc_audience:  # Settings refuses this; never verify tokens without an audience
                raise AuthConfigError("CTSCREEN_AUTH_OIDC_AUDIENCE must be set with CTSCREEN_AUTH_OIDC_ISSUER.")
            oidc = OidcVerifier(settings.auth_oidc_issuer, settings.auth_oidc_audience,
                                jwks_url=settings.auth_oidc_jwks_url, cache_s=settings.auth_jwks_cache_s)
        keys = None
        if settings.auth_api_keys_file:
            if not settings.auth_api_keys_file.exists():  # a typo, or a Secret not mounted: every key refused, 401
                logger.warning("CTSCREEN_AUTH_API_KEYS_FILE %s does not exist: no API key is accepted until it does "
                               "(ctscreen keys add --file %s creates it)", settings.auth_api_keys_file,
                               settings.auth_api_keys_file)
            keys = KeyChecks(KeyStore(settings.auth_api_keys_file), threads=settings.auth_key_threads,
                             max_pending=settings.auth_key_max_pending, max_failures=settings.auth_key_max_failures,
                             window_s=settings.auth_key_failure_window_s)
        return cls(oidc, keys, anonymous_anywhere=settings.auth_insecure)

    async def authenticate(self, credential: str | None, scope: Mapping[str, Any] | None = None) -> Principal:
        """The principal of ``credential`` (a bearer token or an API key), for the call of ASGI ``scope``.

        Raises
        ------
        gateway.errors.Unauthorized
            No or bad credential (401).
        gateway.errors.AuthNotConfigured
            No credential source is configured and the call is not a local one (403, :func:`not_local`): it
            reached a non-loopback address of this server (the startup check, :func:`check_exposure`, sees
            ``CTSCREEN_HOST``, not the address a process manager told uvicorn to bind), came through a proxy from
            another host, names another host (DNS rebinding) or is a browser's cross-site request.
        gateway.errors.AuthUnavailable
            The provider's keys or the API key file cannot be read now (503).
        gateway.errors.AuthThrottled, gateway.errors.AuthBusy
            An API key not checked: its id failed too often lately, or too many checks are running (429).
        """
        if not self.enabled:
            why = None if self.anonymous_anywhere or scope is None else not_local(scope)
            if why is None:
                return ANONYMOUS
            raise AuthNotConfigured(
                f"This gateway has no authentication configured and answers anonymous calls from this machine "
                f"only, and this call {why}: set CTSCREEN_AUTH_OIDC_ISSUER and CTSCREEN_AUTH_OIDC_AUDIENCE, or "
                f"CTSCREEN_AUTH_API_KEYS_FILE, or start it with --insecure (CTSCREEN_AUTH_INSECURE=true).")
        if not credential:
            raise Unauthorized("Authentication required: send 'Authorization: Bearer <token or API key>'.",
                               error=None)
        if credential.startswith("cts_"):
            record = None
            if self.keys is not None:
                try:
                    record = await self.keys.verify(credential)
                except ValueError as exc:  # unreadable key file: the operator's problem, not the client's
                    logger.error("%s", exc)
                    raise AuthUnavailable("API keys cannot be checked now.") from exc
            if record is None:
                raise Unauthorized("The API key is unknown or revoked.")
            return Principal(f"key:{record.name}", "api_key", frozenset(record.scopes))
        if self.oidc is None:
            raise Unauthorized("Bearer tokens are not accepted here (no OIDC issuer configured); use an API key.")
        try:
            claims = await self.oidc.verify(credential)
        except TokenInvalid as exc:
            raise Unauthorized(f"The bearer token is refused: {exc}.") from None
        except ProviderUnavailable as exc:
            raise AuthUnavailable("The identity provider's keys cannot be fetched now.") from exc
        subject = str(claims.get("sub") or claims.get("client_id") or claims.get("azp") or "unknown")[:128]
        return Principal(subject, "oidc", _scopes_of(claims))


_bearer = HTTPBearer(auto_error=False, scheme_name="bearer", bearerFormat="JWT",
                     description="An OIDC access token (RS256/ES256) or an API key (`cts_...`).")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                        description="An API key made with `ctscreen keys add`.")


async def authenticated(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Principal:
    """A route dependency: the caller's :class:`Principal`, whatever its scopes (401 without a good credential;
    403 ``auth_not_configured`` as :meth:`Authenticator.authenticate`). Left on ``request.state`` for the audit log."""
    auth: Authenticator = getattr(request.app.state, "auth", None) or Authenticator()
    principal = await auth.authenticate(bearer.credentials if bearer is not None else api_key, request.scope)
    request.state.principal = principal
    return principal


def require(scope: str) -> Any:
    """A route dependency: the caller's :class:`Principal`, which must hold ``scope`` (else 401/403).

    The principal and the scope are left on ``request.state`` for the audit log.
    """
    if scope not in SCOPES:
        raise ValueError(f'Argument "scope" must be one of {SCOPES}, got {scope!r}.')

    async def dependency(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key)],
    ) -> Principal:
        request.state.scope = scope
        principal = await authenticated(request, bearer, api_key)
        if not principal.has(scope):
            raise InsufficientScope(f"This needs the scope {scope!r}; the credential has "
                                    f"{sorted(principal.scopes) or 'none'}.", scope=scope)
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


STREAM_RECHECK_S = 30.0
"""How often an open event stream checks that its credential still holds (a revoked key, an expired token)."""


async def still_holds(request: Request, scope: str) -> bool:
    """Whether the credential an open stream was opened with still holds ``scope`` now.

    A key revoked, or a token expired, since the stream opened: False (the stream ends; the page's
    reconnect then gets its 401). A provider that cannot be asked now: True (an outage ends no stream).
    """
    auth: Authenticator | None = getattr(request.app.state, "auth", None)
    if auth is None or not auth.enabled:
        return True
    bearer = await _bearer(request)  # read as require() reads it: a bearer token first, else the key header
    credential = bearer.credentials if bearer is not None else await _api_key(request)
    try:
        principal = await auth.authenticate(credential, request.scope)
    except (AuthUnavailable, RetryLater):  # cannot be asked now (a throttled id, checks full): not ended
        return True
    except Unauthorized:
        return False
    return principal.has(scope)


class StreamGuard:
    """Asks :func:`still_holds` at most every :data:`STREAM_RECHECK_S` seconds (call :meth:`holds` in a
    stream's loop); a stream it ends is audited with reason ``credential_ended``."""

    def __init__(self, request: Request, scope: str) -> None:
        self.request, self.scope = request, scope
        self.every_s = STREAM_RECHECK_S
        """How often the credential is asked again: a stream must call :meth:`holds` at least as often."""
        self._next = time.monotonic() + self.every_s

    async def holds(self) -> bool:
        if time.monotonic() < self._next:
            return True
        self._next = time.monotonic() + self.every_s
        if await still_holds(self.request, self.scope):
            return True
        note_reason(self.request.scope, "credential_ended")
        return False


class StreamSlots:
    """Event streams open on this replica, per caller and all together (``app.state.stream_slots``).

    A stream holds no database connection between its polls (each step is one short session), but each
    one polls: a thousand streams of one key pushed the probes to seconds and, on PostgreSQL, took the pool
    that the worker and lease renewals need.

    Parameters
    ----------
    per_caller : int
        Streams one caller (:attr:`Principal.kind` and :attr:`Principal.subject`) may hold open.
    total : int
        Streams open at once, all callers together.
    """

    RETRY_AFTER_S = 5

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller, self.total = per_caller, total
        self.open: dict[str, int] = {}

    def take(self, principal: Principal) -> Callable[[], None]:
        """A slot for ``principal``'s stream; the returned function gives it back (once, however often called).

        Raises
        ------
        gateway.errors.TooManyStreams
            The caller, or the replica, holds as many as it may (429).
        """
        who = f"{principal.kind}:{principal.subject}"
        if self.open.get(who, 0) >= self.per_caller:
            raise TooManyStreams(f"This credential holds {self.per_caller} event streams open, as many as one caller "
                                 f"may; close one (or reuse it) first.", self.RETRY_AFTER_S)
        if sum(self.open.values()) >= self.total:
            raise TooManyStreams(f"This gateway holds {self.total} event streams open, as many as it serves at once.",
                                 self.RETRY_AFTER_S)
        self.open[who] = self.open.get(who, 0) + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                left = self.open.get(who, 1) - 1
                if left > 0:
                    self.open[who] = left
                else:
                    self.open.pop(who, None)

        return give_back


def event_stream(request: Request, principal: Principal, stream: AsyncIterator[bytes],
                 keepalive_s: float) -> StreamingResponse:
    """``stream`` (server-sent events) as the answer, holding one of ``principal``'s stream slots (:func:`stream_slot`).

    ``Cache-Control: no-store``, as every other answer that names a study: kept by nobody (``no-cache`` allowed a
    cache to store the events, study UIDs and all); ``X-Accel-Buffering: no``: a proxy that honours it (nginx)
    passes each event on at once; ``X-Keepalive-Interval``: the seconds between comments on a quiet stream."""
    return StreamingResponse(stream_slot(request, principal, stream), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no",
                                      "X-Keepalive-Interval": f"{keepalive_s:g}"})


def stream_slot(request: Request, principal: Principal, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``stream`` holding one of :class:`StreamSlots`' slots for ``principal`` until it ends, is closed or is
    dropped unstarted (a client gone before the answer began).

    Raises
    ------
    gateway.errors.TooManyStreams
        No slot is free (429): ``stream`` is closed unstarted.
    """
    slots: StreamSlots = request.app.state.stream_slots  # gateway.security.install
    give_back = slots.take(principal)
    draining: asyncio.Event = request.app.state.draining  # gateway.main: the process is going

    async def held() -> AsyncIterator[bytes]:
        # ends once the process drains (SIGTERM): uvicorn waits for open streams before it shuts the app down,
        # so one open worklist held every replica to its graceful timeout; the client follows elsewhere
        try:
            while not draining.is_set():
                step = asyncio.ensure_future(anext(stream))
                stop = asyncio.ensure_future(draining.wait())
                try:
                    await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    if not step.done():
                        step.cancel()
                        await asyncio.gather(step, return_exceptions=True)
                if step.cancelled():
                    return
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            aclose = getattr(stream, "aclose", None)  # an async generator's: its own finally runs now
            if aclose is not None:
                await aclose()
            give_back()

    wrapped = held()
    weakref.finalize(wrapped, give_back)
    return wrapped


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no credential, or a bad one (expired, wrong issuer or audience, unknown key)"},
    403: {"description": "the credential lacks the scope this route needs (insufficient_scope), or the gateway has no "
                         "authentication and was called from off the loopback (auth_not_configured)"},
    429: {"description": "the API key was not checked: its id failed too often lately (auth_throttled), or too many "
                         "checks are running (auth_busy); Retry-After"},
    503: {"description": "the identity provider's keys or the API key file cannot be read now (auth_unavailable); "
                         "Retry-After"},
}
"""The answers every protected route may give (for the OpenAPI document); a route's own 429 or 503 (admission,
the state store) replaces the description, not the status."""

studies_write = require(STUDIES_WRITE)
results_read = require(RESULTS_READ)
admin = require(ADMIN)
WriteAccess = Annotated[Principal, Depends(studies_write)]
"""A route parameter: the caller, who holds ``studies:write``."""
ReadAccess = Annotated[Principal, Depends(results_read)]
"""A route parameter: the caller, who holds ``results:read``."""
AdminAccess = Annotated[Principal, Depends(admin)]
"""A route parameter: the caller, who holds ``admin``."""
Caller = Annotated[Principal, Depends(authenticated)]
"""A route parameter: the caller, with whatever scopes its credential grants (``GET /v1/me``)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``.

    >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.1.2.3")]
    [True, True, True, False, False]
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def local_address(scope: Mapping[str, Any]) -> str | None:
    """The address of this server a connection reached (ASGI ``scope["server"]``'s host; None: unknown)."""
    server = scope.get("server")
    return str(server[0]) if server else None


def _loopback_name(host: str) -> bool:
    """Whether a ``Host`` header's or an ``Origin``'s host names this machine: ``localhost`` (or a name under it,
    RFC 6761) or a loopback IP address.

    >>> [_loopback_name(h) for h in ("localhost", "app.localhost", "127.0.0.1", "[::1]", "rebind.example", "10.0.0.1")]
    [True, True, True, True, False, False]
    """
    host = host.strip().lower().rstrip(".")
    return host.endswith(".localhost") or is_loopback(host)


def not_local(scope: Mapping[str, Any]) -> str | None:
    """Why the call of ASGI ``scope`` is not one from this machine (a phrase), or None when it is: the only calls
    a gateway without authentication answers anonymously.

    Not local: the connection reached a non-loopback address of this server; it came from another host through
    a proxy (the client address uvicorn took from ``X-Forwarded-For``); its ``Host`` header names another host
    (a page whose name the attacker points at 127.0.0.1: DNS rebinding); or a browser says a page of another
    site sent it (``Sec-Fetch-Site: cross-site``, or an ``Origin`` that is no loopback name: an HTML form posts
    across sites without asking), or a page of another origin on this machine (``Sec-Fetch-Site: same-site``,
    or an ``Origin`` other than the request's own scheme, host and port: a local development server's page). A test client's or a Unix socket's addresses are no IP addresses, and
    their ``Host`` is checked only on an IP address.

    >>> base = {"server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "headers": [(b"host", b"127.0.0.1:8000")]}
    >>> not_local(base) is None
    True
    >>> not_local({**base, "headers": [(b"host", b"rebind.example:8000")]})
    "names another host in its Host header ('rebind.example')"
    >>> not_local({**base, "headers": [*base["headers"], (b"origin", b"https://evil.example")]})
    'came from a page of another site'
    >>> not_local({**base, "client": ("203.0.113.9", 443)})
    'came from another host'
    >>> not_local({**base, "headers": [*base["headers"], (b"origin", b"http://localhost:3000")]})
    'came from a page of another origin on this machine'
    >>> not_local({**base, "headers": [*base["headers"], (b"origin", b"http://127.0.0.1:8000")]}) is None
    True
    """
    if reached_off_loopback(local_address(scope)):
        return "reached a non-loopback address of this server"
    client = scope.get("client")
    if client and reached_off_loopback(str(client[0])):
        return "came from another host"
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
    server = local_address(scope)
    if server is not None and is_loopback(server.strip("[]")):
        host = headers.get("host", "")  # none: an HTTP/1.0 client on this machine (a browser always sends one)
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if host and not _loopback_name(name):
            return f"names another host in its Host header ({name[:64]!r})"
    origin = headers.get("origin")
    origin_host = (urlsplit(origin).hostname or "") if origin and origin != "null" else ""
    if headers.get("sec-fetch-site") == "cross-site" or origin == "null" or (origin and not _loopback_name(origin_host)):
        return "came from a page of another site"
    if headers.get("sec-fetch-site") == "same-site" or (
            origin and headers.get("host") and _origin(origin) != _origin(f"{scope.get('scheme', 'http')}://{headers['host']}")):
        return "came from a page of another origin on this machine"  # a local dev server's page, another port
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of an origin or a URL, the port filled in for http and https."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a port: compares unequal to any origin
        port = -1
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def reached_off_loopback(address: str | None) -> bool:
    """Whether ``address`` is an IP address and not a loopback one (a Unix socket's path, a test client's
    ``testserver`` or no address are not: they reach no network interface).

    >>> [reached_off_loopback(a) for a in ("10.1.2.3", "::ffff:10.1.2.3", "127.0.0.1", "::1", "/run/gw.sock", None)]
    [True, True, False, False, False, False]
    """
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return not (mapped or ip).is_loopback


def check_exposure(settings: Settings, host: str, *, insecure: bool = False) -> None:
    """Refuse to serve on a non-loopback ``host`` without authentication, unless ``insecure``, or with an
    API key file that cannot be read.

    Raises
    ------
    AuthConfigError
        With one line saying what to configure.
    """
    if settings.auth_api_keys_file:  # a file that cannot be read would answer every keyed call 503
        try:
            KeyStore(settings.auth_api_keys_file).keys()
        except ValueError as exc:
            raise AuthConfigError(f"CTSCREEN_AUTH_API_KEYS_FILE: {exc}") from None
    if insecure or settings.auth_insecure:
        return
    if not is_loopback(host) and not (settings.auth_oidc_issuer or settings.auth_api_keys_file):
        raise AuthConfigError(
            f"refusing to listen on {host} without authentication: set CTSCREEN_AUTH_OIDC_ISSUER and "
            "CTSCREEN_AUTH_OIDC_AUDIENCE, or CTSCREEN_AUTH_API_KEYS_FILE (ctscreen keys add), or pass --insecure")
    dicom_host = settings.dicom_host
    if settings.dicom_port is not None and not is_loopback(dicom_host) and not settings.dicom_allowed_peers:
        raise AuthConfigError(
            f"refusing to accept DICOM on {dicom_host} from any AE title: set CTSCREEN_DICOM_ALLOWED_PEERS "
            "(AE@host,...), or pass --insecure")
