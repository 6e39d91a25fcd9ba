"""A fake of the Azure Key Vault keys REST API and of the token endpoints its clients use, for tests.

THIS IS A FAKE, NOT AZURE. No Key Vault emulator that signs is obtainable here
(shared/docs/next-wave-peers.md §1.1), so this one is written from Microsoft's public REST
reference and from what the official SDKs (Python azure-keyvault-keys/azure-identity, Go
azkeys/azidentity) send and expect. It keeps everything in memory. Its fidelity is checked by
tests/peers/test_azure_keyvault_fake.py (Microsoft's Python SDK, every signature verified with
`cryptography`) and by tests/spire/azure_*_test.go (Microsoft's Go SDK, and SPIRE's own built-in
azure_key_vault plugin).

Ports and TLS
- Vault API, Entra (AAD) token endpoint and test controls on --port P, HTTPS only: the SDKs
  refuse to send bearer tokens over plain HTTP.
- Managed identity endpoints (App Service, IMDS) on --token-port T, plain HTTP, as in Azure.
- `GET /_fake/health` answers 200 on both ports once the fake is ready.
- --certdir DIR holds a test CA and the server certificate it signed (IP SAN 127.0.0.1,
  DNS localhost), made on first start and reused afterwards:
    DIR/ca.pem         the CA certificate: clients trust it (SSL_CERT_FILE for Go,
                       connection_verify= or REQUESTS_CA_BUNDLE for Python)
    DIR/ca-key.pem     the CA's private key (0600, TEST ONLY): lets a test-side TLS proxy
                       (e.g. a fault proxy) issue its own 127.0.0.1 certificate from the same CA
    DIR/server.pem, DIR/server-key.pem

Authentication (Key Vault's challenge protocol)
- A vault request without `Authorization: Bearer <token>`, or with a token the fake did not
  issue or that has expired, gets 401 with
    WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
                      resource="https://0.0.1:<port>"
  where <port> comes from the request's Host header. The SDKs check that the vault's
  host:port ends with "." + the resource's host:port; "127.0.0.1:P" ends with ".0.0.1:P", so
  the check passes with its default (on), also behind a proxy on another port.
- A token is valid for the resource it was issued for: that challenge resource, or
  https://vault.azure.net (with or without "/.default"); otherwise 401.
- Tokens are random strings valid for --token-lifetime seconds. POST /_fake/tokens/expire
  revokes every issued token; a request with a revoked token then gets either the plain
  challenge above (mode "plain", what an expired token gets) or, by default (mode "cae"), a
  Continuous Access Evaluation claims challenge (error="insufficient_claims", claims=...),
  which makes the SDKs bypass their token caches and fetch a new token.

Vault API (api-version is accepted and ignored; JSON; binary values base64url without padding)
  POST   /keys/{name}/create                 kty EC|EC-HSM|RSA|RSA-HSM, crv P-256|P-384|P-521|P-256K,
                                             key_size 2048|3072|4096, key_ops, attributes, tags
                                             (an existing name gets a new version; a soft-deleted
                                             name is 409 Conflict; names ^[0-9a-zA-Z-]{1,127}$)
  GET    /keys/{name}[/[{version}]]          KeyBundle (empty version: the latest)
  PATCH  /keys/{name}[/[{version}]]          key_ops, attributes (enabled, nbf, exp), tags;
                                             bumps attributes.updated
  GET    /keys                               KeyItems of the latest versions (kid without version)
  GET    /keys/{name}/versions               KeyItems of every version (kid with version)
  DELETE /keys/{name}                        soft delete -> DeletedKeyBundle
  GET    /deletedkeys, GET|DELETE /deletedkeys/{name}, POST /deletedkeys/{name}/recover
  POST   /keys/{name}[/[{version}]]/sign     {alg, value: digest} -> {kid, value}
  POST   /keys/{name}[/[{version}]]/verify   {alg, digest, value} -> {value: bool}
  Lists take maxresults (1..25, default --page-size; outside that range 400 BadParameter) and
  answer {value, nextLink}: nextLink is an absolute https URL with a $skiptoken and the same
  maxresults. Names are case-insensitive, as in Azure.
  Signatures: ES256/ES384/ES512/ES256K raw r||s (fixed width); RS256/384/512 PKCS#1 v1.5;
  PS256/384/512 PSS with salt length = hash length. `value` is the digest; its length must
  match the algorithm and the algorithm must fit the key (400 BadParameter otherwise).
  Errors: {"error": {"code", "message"[, "innererror": {"code"}]}}: 404 KeyNotFound;
  403 Forbidden/KeyDisabled (sign on a disabled key; get and verify still work, as reported
  for Azure); 409 Conflict/ObjectIsDeletedButRecoverable; 400 BadParameter.

Token endpoints
  GET  T/msi/token?api-version=2019-08-01&resource=R       App Service managed identity
       (IDENTITY_ENDPOINT=http://127.0.0.1:T/msi/token); header X-IDENTITY-HEADER must equal
       --identity-header (any non-empty value without it)
       -> {access_token, expires_on (epoch seconds, string), resource, token_type}
  GET  T/metadata/identity/oauth2/token?api-version=2018-02-01&resource=R   IMDS; header
       Metadata: true (400 without). Python azure-identity/MSAL read its address from
       AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:T; Go azidentity has no override.
       -> {access_token, expires_in, expires_on, ext_expires_in, not_before, resource, token_type}
  POST P/{tenant}/oauth2/v2.0/token   Microsoft Entra client credentials: client_id +
       client_secret, or client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
       + client_assertion (workload identity), scope "<R>/.default".
       --client APPID:SECRET registers a client secret (once any is registered, only registered
       apps may use secrets); --client-assertion APPID:ASSERTION pins the assertion an app must
       present (otherwise any JWT-shaped assertion is accepted). Errors are AADSTS-style JSON.
  GET  P/{tenant}/v2.0/.well-known/openid-configuration and P/common/discovery/instance:
       what MSAL reads when AZURE_AUTHORITY_HOST=https://127.0.0.1:P/ (clients must disable
       instance discovery, which otherwise asks login.microsoftonline.com).

Test controls on P under /_fake/ (no authentication)
  GET  /_fake/health
  GET  /_fake/stats, POST /_fake/stats/reset   requests per operation (create, get, update,
       list, list_versions, delete, list_deleted, get_deleted, purge, recover, sign, verify;
       token, token_app_service, token_imds, token_entra, discovery; unauthorized = 401
       challenges). Vault operations count once authenticated (fault answers included).
  GET  /_fake/keys                            every key and deleted key with its versions
  POST /_fake/keys/{name}/attributes {"created": epoch, "updated": epoch, "enabled": bool,
       "version": V (default: every version)}   age a key (sweep tests)
  POST /_fake/faults [{"op": OP|"*", "status": 429|503|..., "retry_after": secs, "count": N
       (default 1, negative: forever), "latency_ms": ms, "drop": bool, "code": str}]
       appends rules; the first N matching requests are delayed, answered with the status (and
       Retry-After) or dropped (connection closed without an answer). "*" matches every vault
       operation (not tokens). DELETE /_fake/faults clears them.
  POST /_fake/tokens/expire {"mode": "cae"|"plain"}   revoke every issued token
  POST /_fake/rbac {"deny": [OP, ...]}      those operations answer 403 Forbidden/ForbiddenByRbac
  POST /_fake/bulk {"keys": [{"name", "kty", "crv", "key_size", "tags", "key_ops", "created",
       "updated"}, ...]}   creates keys directly (benchmark seeding, planted duplicates)

Usage: python azure_keyvault_fake.py --host 127.0.0.1 --port P --token-port T --certdir DIR
       [--token-lifetime SECONDS] [--page-size N] [--tenant TENANT] [--identity-header VALUE]
       [--client APPID:SECRET ...] [--client-assertion APPID:ASSERTION ...] [--verbose]
"""

from __future__ import annotations

import argparse
import base64
import bisect
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
MAX_PAGE = 25  # Key Vault's largest page
RECOVERABLE_DAYS = 90
RECOVERY_LEVEL = "Recoverable+Purgeable"

CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1, "P-256K": ec.SECP256K1}
CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521", "secp256k1": "P-256K"}
RSA_SIZES = (2048, 3072, 4096)
KTYS = ("EC", "EC-HSM", "RSA", "RSA-HSM")
DEFAULT_OPS = {
    "EC": ["sign", "verify"],
    "RSA": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
}
KNOWN_OPS = {"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export"}
# alg -> (family, hash class, curve for EC or None)
ALGORITHMS = {
    "ES256": ("ec", hashes.SHA256, "P-256"),
    "ES384": ("ec", hashes.SHA384, "P-384"),
    "ES512": ("ec", hashes.SHA512, "P-521"),
    "ES256K": ("ec", hashes.SHA256, "P-256K"),
    "RS256": ("pkcs1", hashes.SHA256, None),
    "RS384": ("pkcs1", hashes.SHA384, None),
    "RS512": ("pkcs1", hashes.SHA512, None),
    "PS256": ("pss", hashes.SHA256, None),
    "PS384": ("pss", hashes.SHA384, None),
    "PS512": ("pss", hashes.SHA512, None),
}
STANDARD_AUDIENCE = "https://vault.azure.net"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
STATUS_CODES = {
    400: "BadParameter",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "Throttled",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(value, field: str) -> bytes:
    if not isinstance(value, str):
        raise bad_parameter(f"'{field}' must be a base64url string.")
    s = value.replace("+", "-").replace("/", "_").rstrip("=")
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (ValueError, base64.binascii.Error):
        raise bad_parameter(f"'{field}' is not valid base64url.")


def int_bytes(n: int, length: int | None = None) -> bytes:
    return n.to_bytes(length or max(1, (n.bit_length() + 7) // 8), "big")


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner
        self.headers = headers or {}

    def body(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.inner:
            err["innererror"] = {"code": self.inner}
        return {"error": err}


def bad_parameter(message: str) -> ApiError:
    return ApiError(400, "BadParameter", message)


def key_not_found(name: str, version: str = "") -> ApiError:
    what = f"{name}/{version}" if version else name
    return ApiError(404, "KeyNotFound", f"A key with (name/id) {what} was not found in this key vault.")


class AadError(Exception):
    """An Entra (AAD) OAuth2 error: {error, error_description, error_codes, ...}."""

    def __init__(self, status: int, error: str, aadsts: int, description: str):
        super().__init__(description)
        self.status, self.error, self.aadsts, self.description = status, error, aadsts, description

    def body(self) -> dict:
        return {
            "error": self.error,
            "error_description": f"AADSTS{self.aadsts}: {self.description}",
            "error_codes": [self.aadsts],
            "timestamp": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        }


# ---------------------------------------------------------------------------------------------
# TLS material


def _write_private(path: str, data: bytes, mode: int = 0o644) -> None:
    """Writes atomically (two fakes sharing a directory never read half a file)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def ensure_tls(certdir: str) -> tuple[str, str]:
    """Makes (or reuses) the test CA and the server certificate; returns (cert, key) paths."""
    os.makedirs(certdir, exist_ok=True)
    ca_path, ca_key_path = os.path.join(certdir, "ca.pem"), os.path.join(certdir, "ca-key.pem")
    cert_path, key_path = os.path.join(certdir, "server.pem"), os.path.join(certdir, "server-key.pem")
    now = dt.datetime.now(dt.timezone.utc)
    if os.path.exists(ca_path) and os.path.exists(ca_key_path):
        with open(ca_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "azure_keyvault_fake test CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, _key_pem(ca_key), 0o600)
        _write_private(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    if os.path.exists(cert_path) and os.path.exists(key_path):
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        if cert.issuer == ca_cert.subject and cert.not_valid_after_utc > now + dt.timedelta(days=1):
            return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key), 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# ---------------------------------------------------------------------------------------------
# Keys


class KeyVersion:
    def __init__(self, name: str, version: str, kty: str, private_key, key_ops, attributes: dict, tags: dict):
        self.name, self.version, self.kty, self.private_key = name, version, kty, private_key
        self.key_ops = list(key_ops)
        self.attributes = attributes  # enabled, created, updated, nbf?, exp?
        self.tags = dict(tags)

    @property
    def is_ec(self) -> bool:
        return self.kty.startswith("EC")

    @property
    def crv(self) -> str | None:
        return CURVE_NAMES[self.private_key.curve.name] if self.is_ec else None

    def jwk(self, base: str) -> dict:
        jwk = {"kid": f"{base}/keys/{self.name}/{self.version}", "kty": self.kty, "key_ops": list(self.key_ops)}
        pub = self.private_key.public_key().public_numbers()
        if self.is_ec:
            width = (self.private_key.curve.key_size + 7) // 8
            jwk.update(crv=self.crv, x=b64u(int_bytes(pub.x, width)), y=b64u(int_bytes(pub.y, width)))
        else:
            jwk.update(n=b64u(int_bytes(pub.n)), e=b64u(int_bytes(pub.e)))
        return jwk

    def attrs_json(self) -> dict:
        out = {
            "enabled": self.attributes["enabled"],
            "created": int(self.attributes["created"]),
            "updated": int(self.attributes["updated"]),
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": RECOVERABLE_DAYS,
            "exportable": False,
        }
        for k in ("nbf", "exp"):
            if self.attributes.get(k) is not None:
                out[k] = int(self.attributes[k])
        return out

    def bundle(self, base: str) -> dict:
        out = {"key": self.jwk(base), "attributes": self.attrs_json()}
        if self.tags:
            out["tags"] = dict(self.tags)
        return out

    def item(self, base: str, with_version: bool) -> dict:
        kid = f"{base}/keys/{self.name}" + (f"/{self.version}" if with_version else "")
        out = {"kid": kid, "attributes": self.attrs_json()}
        if self.tags:
            out["tags"] = dict(self.tags)
        return out


class Key:
    """A key: its versions in creation order (the last is the latest)."""

    def __init__(self, name: str):
        self.name = name
        self.versions: list[KeyVersion] = []
        self.deleted_date: float | None = None

    def latest(self) -> KeyVersion:
        return self.versions[-1]

    def find(self, version: str) -> KeyVersion | None:
        if not version:
            return self.latest()
        for v in self.versions:
            if v.version == version.lower():
                return v
        return None

    def deleted_fields(self, base: str) -> dict:
        return {
            "recoveryId": f"{base}/deletedkeys/{self.name}",
            "deletedDate": int(self.deleted_date),
            "scheduledPurgeDate": int(self.deleted_date + RECOVERABLE_DAYS * 86400),
        }


def generate_key(kty: str, crv: str | None, size: int | None):
    if kty.startswith("EC"):
        return ec.generate_private_key(CURVES[crv]())
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def sign_digest(kv: KeyVersion, alg: str, digest: bytes) -> bytes:
    family, hash_cls, _ = ALGORITHMS[alg]
    prehashed = utils.Prehashed(hash_cls())
    if family == "ec":
        r, s = utils.decode_dss_signature(kv.private_key.sign(digest, ec.ECDSA(prehashed)))
        width = (kv.private_key.curve.key_size + 7) // 8
        return int_bytes(r, width) + int_bytes(s, width)
    if family == "pkcs1":
        return kv.private_key.sign(digest, padding.PKCS1v15(), prehashed)
    return kv.private_key.sign(digest, padding.PSS(padding.MGF1(hash_cls()), hash_cls.digest_size), prehashed)


def verify_digest(kv: KeyVersion, alg: str, digest: bytes, signature: bytes) -> bool:
    family, hash_cls, _ = ALGORITHMS[alg]
    prehashed = utils.Prehashed(hash_cls())
    public = kv.private_key.public_key()
    try:
        if family == "ec":
            width = (kv.private_key.curve.key_size + 7) // 8
            if len(signature) != 2 * width:
                return False
            der = utils.encode_dss_signature(int.from_bytes(signature[:width], "big"), int.from_bytes(signature[width:], "big"))
            public.verify(der, digest, ec.ECDSA(prehashed))
        elif family == "pkcs1":
            public.verify(signature, digest, padding.PKCS1v15(), prehashed)
        else:
            public.verify(signature, digest, padding.PSS(padding.MGF1(hash_cls()), hash_cls.digest_size), prehashed)
        return True
    except (InvalidSignature, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# State


class Token:
    def __init__(self, resource: str, expires: float, kind: str):
        self.resource, self.expires, self.kind = resource, expires, kind
        self.revoked: str | None = None  # revocation mode once revoked


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.keys: dict[str, Key] = {}  # lower-case name -> live key
        self.deleted: dict[str, Key] = {}  # lower-case name -> soft-deleted key
        self.tokens: dict[str, Token] = {}
        self.stats: dict[str, int] = {}
        self.faults: list[dict] = []
        self.denied: set[str] = set()
        self.clients = dict(c.split(":", 1) for c in args.client)
        self.assertions = dict(c.split(":", 1) for c in args.client_assertion)

    def count(self, op: str) -> None:
        with self.lock:
            self.stats[op] = self.stats.get(op, 0) + 1

    def issue_token(self, resource: str, kind: str) -> tuple[str, float]:
        token = secrets.token_urlsafe(32)
        expires = time.time() + self.args.token_lifetime
        with self.lock:
            # Forget long-expired tokens so the table stays small in long runs.
            now = time.time()
            for t in [t for t, v in self.tokens.items() if v.expires < now - 3600]:
                del self.tokens[t]
            self.tokens[token] = Token(resource, expires, kind)
        return token, expires

    def take_fault(self, op: str) -> dict | None:
        """The first rule matching op (consuming one of its count), or None."""
        with self.lock:
            for rule in self.faults:
                rop = rule.get("op", "*")
                if rop == op or (rop == "*" and not op.startswith("token")):
                    count = rule.get("count", 1)
                    if count is not None and count >= 0:
                        if count == 0:
                            continue
                        rule["count"] = count - 1
                    return dict(rule)
        return None


# ---------------------------------------------------------------------------------------------
# HTTP


class Dropped(Exception):
    """The connection is to be closed without an answer (a fault)."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "azure-keyvault-fake"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold every answer on a kept-alive connection for ~40 ms.
    disable_nagle_algorithm = True
    state: State = None  # set in main
    token_port = False  # True on the managed identity (plain HTTP) port

    def log_message(self, fmt, *args):
        if self.state.args.verbose:
            sys.stderr.write("%s %s\n" % (self.log_date_time_string(), fmt % args))

    # --- plumbing -----------------------------------------------------------------------------

    def _host(self) -> str:
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        if ":" not in host.rsplit("]", 1)[-1]:
            host += ":443"
        return host

    def _base(self) -> str:
        return "https://" + self._host()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self) -> dict:
        raw = self._body
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise bad_parameter("The request body is not valid JSON.")
        if not isinstance(body, dict):
            raise bad_parameter("The request body must be a JSON object.")
        return body

    def _send(self, status: int, body=None, headers=None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _apply_fault(self, op: str) -> None:
        rule = self.state.take_fault(op)
        if rule is None:
            return
        if rule.get("latency_ms"):
            time.sleep(rule["latency_ms"] / 1000.0)
        if rule.get("drop"):
            raise Dropped()
        status = rule.get("status")
        if status:
            headers = {}
            if rule.get("retry_after") is not None:
                headers["Retry-After"] = str(rule["retry_after"])
            code = rule.get("code") or STATUS_CODES.get(status, "Error")
            raise ApiError(status, code, f"Injected fault for {op} (azure_keyvault_fake).", headers=headers)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        self._query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self._body = self._read_body()
        path = url.path
        try:
            if path == "/_fake/health" and method == "GET":
                return self._send(200, {"status": "ok"})
            if self.token_port:
                return self._token_port(method, path)
            if path.startswith("/_fake/"):
                return self._control(method, path)
            if path.startswith("/common/discovery/") or "/oauth2/" in path or "/.well-known/" in path:
                return self._entra(method, path)
            return self._vault(method, path)
        except Dropped:
            self._drop()
        except ApiError as e:
            self._send(e.status, e.body(), e.headers)
        except AadError as e:
            self._send(e.status, e.body())
        except Exception as e:  # a bug in the fake: say so rather than hang the client
            self._send(500, {"error": {"code": "InternalServerError", "message": f"fake error: {e!r}"}})

    # --- test controls ------------------------------------------------------------------------

    def _control(self, method: str, path: str) -> None:
        st = self.state
        if path == "/_fake/stats" and method == "GET":
            with st.lock:
                return self._send(200, dict(st.stats))
        if path == "/_fake/stats/reset" and method == "POST":
            with st.lock:
                st.stats.clear()
            return self._send(200, {})
        if path == "/_fake/faults":
            if method == "DELETE":
                with st.lock:
                    st.faults.clear()
                return self._send(200, {})
            if method == "POST":
                body = json.loads(self._body or b"[]")
                rules = body if isinstance(body, list) else [body]
                for r in rules:
                    if not isinstance(r, dict) or not (r.get("status") or r.get("drop") or r.get("latency_ms")):
                        raise bad_parameter("a fault rule needs status, drop or latency_ms")
                with st.lock:
                    st.faults.extend(dict(r) for r in rules)
                    return self._send(200, {"faults": list(st.faults)})
        if path == "/_fake/tokens/expire" and method == "POST":
            mode = self._json_body().get("mode", "cae")
            if mode not in ("cae", "plain"):
                raise bad_parameter("mode must be 'cae' or 'plain'")
            with st.lock:
                for t in st.tokens.values():
                    t.revoked = t.revoked or mode
                n = len(st.tokens)
            return self._send(200, {"revoked": n})
        if path == "/_fake/rbac" and method == "POST":
            deny = self._json_body().get("deny", [])
            with st.lock:
                st.denied = set(deny)
            return self._send(200, {"deny": sorted(deny)})
        if path == "/_fake/keys" and method == "GET":
            base = self._base()
            with st.lock:
                out = {"keys": [], "deleted": []}
                for where, table in (("keys", st.keys), ("deleted", st.deleted)):
                    for key in sorted(table.values(), key=lambda k: k.name.lower()):
                        entry = {"name": key.name, "versions": [dict(v.bundle(base), kty=v.kty) for v in key.versions]}
                        if key.deleted_date is not None:
                            entry.update(key.deleted_fields(base))
                        out[where].append(entry)
            return self._send(200, out)
        if path == "/_fake/bulk" and method == "POST":
            return self._bulk()
        m = re.fullmatch(r"/_fake/keys/([^/]+)/attributes", path)
        if m and method == "POST":
            body = self._json_body()
            with st.lock:
                key = st.keys.get(m.group(1).lower()) or st.deleted.get(m.group(1).lower())
                if key is None:
                    raise key_not_found(m.group(1))
                targets = [v for v in key.versions if body.get("version") in (None, v.version)]
                if not targets:
                    raise key_not_found(m.group(1), body["version"])
                for v in targets:
                    for field in ("created", "updated", "nbf", "exp"):
                        if field in body:
                            v.attributes[field] = body[field]
                    if "enabled" in body:
                        v.attributes["enabled"] = bool(body["enabled"])
                return self._send(200, key.latest().bundle(self._base()))
        raise ApiError(404, "NotFound", f"no test control {method} {path}")

    def _bulk(self) -> None:
        """Creates keys behind the clients' backs (no authentication, not counted): many other
        servers' keys for a benchmark in one request, or a planted key (a duplicate) with the
        creation time a test needs. Each entry: name, kty (EC|EC-HSM|RSA|RSA-HSM, default EC),
        crv (default P-256), key_size (default 2048), tags, key_ops (default sign, verify),
        created/updated (epoch seconds, default now). A name already live gets a new version."""
        st = self.state
        body = json.loads(self._body or b"{}")
        entries = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise bad_parameter('the body must be {"keys": [{"name": ..., ...}, ...]}')
        made = []
        for e in entries:
            name, kty = e.get("name", ""), e.get("kty", "EC")
            if not NAME_RE.match(name) or kty not in KTYS:
                raise bad_parameter(f"bulk: invalid name {name!r} or kty {kty!r}")
            crv = e.get("crv", "P-256") if kty.startswith("EC") else None
            size = None if crv else e.get("key_size", 2048)
            if (crv and crv not in CURVES) or (size and size not in RSA_SIZES):
                raise bad_parameter(f"bulk: unsupported curve or size for {name}")
            now = time.time()
            made.append(KeyVersion(name, uuid.uuid4().hex, kty, generate_key(kty, crv, size),
                                   e.get("key_ops", ["sign", "verify"]),
                                   {"enabled": True, "created": e.get("created", now), "updated": e.get("updated", now),
                                    "nbf": None, "exp": None}, e.get("tags") or {}))
        with st.lock:
            for kv in made:
                if kv.name.lower() in st.deleted:
                    raise ApiError(409, "Conflict", f"bulk: {kv.name} is soft-deleted")
            for kv in made:
                key = st.keys.get(kv.name.lower())
                if key is None:
                    key = st.keys[kv.name.lower()] = Key(kv.name)
                key.versions.append(kv)
        return self._send(200, {"created": len(made), "kids": [kv.jwk(self._base())["kid"] for kv in made]})

    # --- managed identity (plain HTTP port) ---------------------------------------------------

    def _token_port(self, method: str, path: str) -> None:
        st = self.state
        if method != "GET":
            return self._send(405, {"error": "invalid_request", "error_description": "GET only"})
        resource = self._query.get("resource", "")
        if path == "/msi/token":
            st.count("token")
            st.count("token_app_service")
            self._apply_fault("token")
            header = self.headers.get("X-IDENTITY-HEADER", "")
            want = st.args.identity_header
            if not header or (want is not None and header != want):
                return self._send(401, {"statusCode": 401, "message": "Missing or wrong X-IDENTITY-HEADER."})
            if not resource:
                return self._send(400, {"statusCode": 400, "message": "The resource parameter is required."})
            token, expires = st.issue_token(resource, "app_service")
            return self._send(200, {
                "access_token": token,
                "expires_on": str(int(expires)),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": self._query.get("client_id", "fake-managed-identity"),
            })
        if path == "/metadata/identity/oauth2/token":
            st.count("token")
            st.count("token_imds")
            self._apply_fault("token")
            if self.headers.get("Metadata", "").lower() != "true":
                return self._send(400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
            if not resource:
                return self._send(400, {"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"})
            token, expires = st.issue_token(resource, "imds")
            lifetime = int(expires - time.time())
            return self._send(200, {
                "access_token": token,
                "client_id": self._query.get("client_id", "fake-managed-identity"),
                "expires_in": str(lifetime),
                "expires_on": str(int(expires)),
                "ext_expires_in": str(lifetime),
                "not_before": str(int(time.time())),
                "resource": resource,
                "token_type": "Bearer",
            })
        return self._send(404, {"error": "not_found", "error_description": f"no endpoint {path}"})

    # --- Microsoft Entra ----------------------------------------------------------------------

    def _entra(self, method: str, path: str) -> None:
        st = self.state
        base = self._base()
        tenant = st.args.tenant
        if path == "/common/discovery/instance" and method == "GET":
            st.count("discovery")
            host = self._host()
            return self._send(200, {
                "tenant_discovery_endpoint": f"{base}/{tenant}/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            })
        m = re.fullmatch(r"/([^/]+)/v2\.0/\.well-known/openid-configuration", path)
        if m and method == "GET":
            st.count("discovery")
            t = m.group(1)
            return self._send(200, {
                "issuer": f"{base}/{t}/v2.0",
                "authorization_endpoint": f"{base}/{t}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/{t}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/{t}/oauth2/v2.0/devicecode",
                "jwks_uri": f"{base}/{t}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "NA",
                "cloud_instance_name": "microsoftonline.com",
            })
        m = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", path)
        if m and method == "POST":
            st.count("token")
            st.count("token_entra")
            self._apply_fault("token")
            return self._entra_token(m.group(1))
        raise AadError(404, "invalid_request", 90002, f"No Entra endpoint {method} {path} in this fake.")

    def _entra_token(self, tenant: str) -> None:
        st = self.state
        form = {k: v[-1] for k, v in parse_qs(self._body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if tenant.lower() != st.args.tenant.lower():
            raise AadError(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            raise AadError(400, "unsupported_grant_type", 70003, "The grant type is not supported by this fake.")
        client_id = form.get("client_id", "")
        if not client_id:
            raise AadError(400, "invalid_request", 900144, "The request body must contain the following parameter: 'client_id'.")
        scope = form.get("scope", "")
        # MSAL adds the OpenID Connect scopes to every request; Entra accepts them alongside.
        scopes = [s for s in scope.split() if s not in ("openid", "offline_access", "profile")]
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise AadError(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid.")
        if "client_secret" in form:
            secret = form["client_secret"]
            if st.clients:
                if client_id not in st.clients:
                    raise AadError(400, "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.")
                if not secrets.compare_digest(st.clients[client_id], secret):
                    raise AadError(401, "invalid_client", 7000215, "Invalid client secret provided.")
            elif not secret:
                raise AadError(401, "invalid_client", 7000215, "Invalid client secret provided.")
        elif form.get("client_assertion_type") == JWT_BEARER:
            assertion = form.get("client_assertion", "")
            if assertion.count(".") != 2 or not all(assertion.split(".")[:2]):
                raise AadError(400, "invalid_client", 50027, "Invalid JWT token. The token is not in a valid format.")
            want = st.assertions.get(client_id)
            if want is not None and not secrets.compare_digest(want, assertion):
                raise AadError(401, "invalid_client", 700213, "No matching federated identity record found for presented assertion.")
        else:
            raise AadError(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
        resource = scopes[0][: -len("/.default")]
        token, expires = st.issue_token(resource, "entra")
        lifetime = int(expires - time.time())
        return self._send(200, {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        })

    # --- vault --------------------------------------------------------------------------------

    def _challenge_resource(self) -> str:
        port = self._host().rsplit(":", 1)[1]
        return f"https://0.0.1:{port}"

    def _authenticate(self) -> None:
        st = self.state
        resource = self._challenge_resource()
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else ""
        with st.lock:
            info = st.tokens.get(token) if token else None
            revoked = info.revoked if info else None
        challenge = f'Bearer authorization="https://login.microsoftonline.com/{st.args.tenant}", resource="{resource}"'
        if info is not None and revoked == "cae":
            claims = json.dumps({"access_token": {"nbf": {"essential": True, "value": str(int(time.time()))}}})
            st.count("unauthorized")
            raise ApiError(401, "Unauthorized", "The access token has been revoked (continuous access evaluation).",
                           headers={"WWW-Authenticate": 'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                                    f'error="insufficient_claims", claims="{base64.b64encode(claims.encode()).decode()}"'})
        if info is None or revoked or info.expires < time.time():
            st.count("unauthorized")
            message = "Unauthorized" if not token else "The access token is invalid or has expired."
            raise ApiError(401, "Unauthorized", message, headers={"WWW-Authenticate": challenge})
        audience = info.resource.rstrip("/")
        if audience.endswith("/.default"):
            audience = audience[: -len("/.default")].rstrip("/")
        if audience not in (resource, STANDARD_AUDIENCE):
            st.count("unauthorized")
            raise ApiError(401, "Unauthorized", f"Invalid audience: the token is for '{info.resource}', not '{resource}'.",
                           headers={"WWW-Authenticate": challenge})

    def _route(self, method: str, path: str):
        """(op, handler, args) for a vault path, or None."""
        parts = path.split("/")[1:]  # keep empty segments: /keys/n/ means version ""
        n = len(parts)
        if not parts or parts[0] not in ("keys", "deletedkeys"):
            return None
        if parts[0] == "keys":
            if n == 1 or (n == 2 and parts[1] == ""):
                return ("list", self._list_keys, ()) if method == "GET" else None
            name = parts[1]
            if n == 3 and parts[2] == "create" and method == "POST":
                return ("create", self._create, (name,))
            if n == 3 and parts[2] == "versions" and method == "GET":
                return ("list_versions", self._list_versions, (name,))
            if n == 2 and method == "DELETE":
                return ("delete", self._delete, (name,))
            if n in (3, 4) and parts[-1] in ("sign", "verify") and method == "POST":
                version = parts[2] if n == 4 else ""
                op = parts[-1]
                return (op, self._sign if op == "sign" else self._verify, (name, version))
            if n in (2, 3):
                version = parts[2] if n == 3 else ""
                if method == "GET":
                    return ("get", self._get, (name, version))
                if method == "PATCH":
                    return ("update", self._update, (name, version))
            return None
        if n == 1 or (n == 2 and parts[1] == ""):
            return ("list_deleted", self._list_deleted, ()) if method == "GET" else None
        name = parts[1]
        if n == 2 and method == "GET":
            return ("get_deleted", self._get_deleted, (name,))
        if n == 2 and method == "DELETE":
            return ("purge", self._purge, (name,))
        if n == 3 and parts[2] == "recover" and method == "POST":
            return ("recover", self._recover, (name,))
        return None

    def _vault(self, method: str, path: str) -> None:
        route = self._route(method, path)
        if route is None:
            raise ApiError(404, "NotFound", f"{method} {path} is not a Key Vault keys operation this fake knows.")
        op, handler, args = route
        self._authenticate()
        self.state.count(op)
        self._apply_fault(op)
        with self.state.lock:
            denied = op in self.state.denied
        if denied:
            raise ApiError(403, "Forbidden",
                           f"Caller is not authorized to perform action on resource (operation '{op}' denied by the fake's RBAC).",
                           inner="ForbiddenByRbac")
        handler(*args)

    # ---- operations ----

    def _live(self, name: str, version: str = "") -> KeyVersion:
        """The key version (caller holds the lock)."""
        key = self.state.keys.get(name.lower())
        if key is None:
            raise key_not_found(name, version)
        kv = key.find(version)
        if kv is None:
            raise key_not_found(name, version)
        return kv

    def _create(self, name: str) -> None:
        st = self.state
        if not NAME_RE.match(name):
            raise bad_parameter(f"The key name '{name}' is invalid: it must match ^[0-9a-zA-Z-]{{1,127}}$.")
        body = self._json_body()
        kty = body.get("kty")
        if kty not in KTYS:
            raise bad_parameter(f"Unsupported key type '{kty}': this fake supports {', '.join(KTYS)}.")
        crv = size = None
        if kty.startswith("EC"):
            crv = body.get("crv") or "P-256"
            if crv not in CURVES:
                raise bad_parameter(f"Unsupported curve '{crv}': this fake supports {', '.join(CURVES)}.")
        else:
            size = body.get("key_size") or 2048
            if size not in RSA_SIZES:
                raise bad_parameter(f"Unsupported RSA key size {size}: allowed {', '.join(map(str, RSA_SIZES))}.")
            if body.get("public_exponent") not in (None, 65537):
                raise bad_parameter("This fake supports only the public exponent 65537.")
        ops = body.get("key_ops")
        if ops is None:
            ops = DEFAULT_OPS["EC" if kty.startswith("EC") else "RSA"]
        if not isinstance(ops, list) or not all(o in KNOWN_OPS for o in ops):
            raise bad_parameter(f"Invalid key_ops {ops!r}: allowed {', '.join(sorted(KNOWN_OPS))}.")
        tags = body.get("tags") or {}
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise bad_parameter("tags must be an object of strings.")
        if len(tags) > 15:
            raise bad_parameter("A key can have at most 15 tags.")
        attributes = body.get("attributes") or {}
        # Generating outside the lock: RSA-4096 takes seconds.
        private_key = generate_key(kty, crv, size)
        now = time.time()
        with st.lock:
            lname = name.lower()
            if lname in st.deleted:
                raise ApiError(409, "Conflict",
                               f"Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can be recovered or purged.",
                               inner="ObjectIsDeletedButRecoverable")
            key = st.keys.get(lname)
            if key is None:
                key = st.keys[lname] = Key(name)
            kv = KeyVersion(key.name, uuid.uuid4().hex, kty, private_key, ops, {
                "enabled": attributes.get("enabled", True) is not False,
                "created": now,
                "updated": now,
                "nbf": attributes.get("nbf"),
                "exp": attributes.get("exp"),
            }, tags)
            key.versions.append(kv)
            return self._send(200, kv.bundle(self._base()))

    def _get(self, name: str, version: str) -> None:
        with self.state.lock:
            return self._send(200, self._live(name, version).bundle(self._base()))

    def _update(self, name: str, version: str) -> None:
        body = self._json_body()
        ops = body.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or not all(o in KNOWN_OPS for o in ops)):
            raise bad_parameter(f"Invalid key_ops {ops!r}: allowed {', '.join(sorted(KNOWN_OPS))}.")
        tags = body.get("tags")
        if tags is not None and (not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values())):
            raise bad_parameter("tags must be an object of strings.")
        attributes = body.get("attributes") or {}
        with self.state.lock:
            kv = self._live(name, version)
            if ops is not None:
                kv.key_ops = list(ops)
            if tags is not None:
                kv.tags = dict(tags)
            if "enabled" in attributes and attributes["enabled"] is not None:
                kv.attributes["enabled"] = bool(attributes["enabled"])
            for field in ("nbf", "exp"):
                if field in attributes:
                    kv.attributes[field] = attributes[field]
            kv.attributes["updated"] = max(time.time(), kv.attributes["updated"])
            return self._send(200, kv.bundle(self._base()))

    def _page(self, items: list[tuple[str, object]], path: str, render=lambda item: item) -> None:
        """Answers one page of (sort key, item), sorted, after the $skiptoken marker; render
        makes the JSON of an item, only for the items on the page (a vault of thousands of
        keys is listed in hundreds of pages: rendering each page alone keeps them cheap)."""
        raw = self._query.get("maxresults")
        if raw is None or raw == "":
            size = self.state.args.page_size
        else:
            try:
                size = int(raw)
            except ValueError:
                raise bad_parameter(f"maxresults must be an integer between 1 and {MAX_PAGE}.")
            # The REST reference bounds it to 1..25, and Key Vault refuses larger pages.
            if not 1 <= size <= MAX_PAGE:
                raise bad_parameter(f"Invalid maxresults {size}: it must be between 1 and {MAX_PAGE}.")
        items.sort(key=lambda kv: kv[0])
        marker = ""
        token = self._query.get("$skiptoken")
        if token:
            try:
                marker = json.loads(unb64u(token, "$skiptoken"))["NextMarker"]
            except (ValueError, KeyError, TypeError):
                raise bad_parameter("Invalid $skiptoken.")
            items = items[bisect.bisect_right([kv[0] for kv in items], marker):]
        page = items[:size]
        next_link = None
        if len(items) > size:
            skip = b64u(json.dumps({"NextMarker": page[-1][0]}).encode())
            query = {"api-version": self._query.get("api-version", "7.6"), "$skiptoken": skip, "maxresults": str(size)}
            next_link = f"{self._base()}{path}?{urlencode(query, quote_via=quote, safe='$')}"
        with self.state.lock:
            value = [render(item) for _, item in page]
        return self._send(200, {"value": value, "nextLink": next_link})

    def _list_keys(self) -> None:
        base = self._base()
        with self.state.lock:
            items = [(k.name.lower(), k.latest()) for k in self.state.keys.values()]
        return self._page(items, "/keys", lambda kv: kv.item(base, with_version=False))

    def _list_versions(self, name: str) -> None:
        base = self._base()
        with self.state.lock:
            key = self.state.keys.get(name.lower())
            if key is None:
                raise key_not_found(name)
            items = [(v.version, v.item(base, with_version=True)) for v in key.versions]
            path = f"/keys/{key.name}/versions"
        return self._page(items, path)

    def _delete(self, name: str) -> None:
        st = self.state
        base = self._base()
        with st.lock:
            key = st.keys.pop(name.lower(), None)
            if key is None:
                raise key_not_found(name)
            key.deleted_date = time.time()
            st.deleted[name.lower()] = key
            return self._send(200, dict(key.latest().bundle(base), **key.deleted_fields(base)))

    def _list_deleted(self) -> None:
        base = self._base()
        with self.state.lock:
            items = [
                (k.name.lower(), dict(k.latest().item(base, with_version=False), **k.deleted_fields(base)))
                for k in self.state.deleted.values()
            ]
        return self._page(items, "/deletedkeys")

    def _deleted(self, name: str) -> Key:
        key = self.state.deleted.get(name.lower())
        if key is None:
            raise ApiError(404, "KeyNotFound", f"Deleted Key not found: {name}")
        return key

    def _get_deleted(self, name: str) -> None:
        base = self._base()
        with self.state.lock:
            key = self._deleted(name)
            return self._send(200, dict(key.latest().bundle(base), **key.deleted_fields(base)))

    def _purge(self, name: str) -> None:
        with self.state.lock:
            self._deleted(name)
            del self.state.deleted[name.lower()]
        return self._send(204)

    def _recover(self, name: str) -> None:
        st = self.state
        with st.lock:
            key = self._deleted(name)
            if name.lower() in st.keys:  # cannot happen: create refuses deleted names
                raise ApiError(409, "Conflict", f"Key {name} exists.")
            del st.deleted[name.lower()]
            key.deleted_date = None
            st.keys[name.lower()] = key
            return self._send(200, key.latest().bundle(self._base()))

    def _crypto_args(self, kv: KeyVersion, op: str, body: dict, digest_field: str) -> tuple[str, bytes]:
        alg = body.get("alg")
        if alg not in ALGORITHMS:
            raise bad_parameter(f"Invalid algorithm '{alg}': allowed {', '.join(ALGORITHMS)}.")
        family, hash_cls, curve = ALGORITHMS[alg]
        if family == "ec" and (not kv.is_ec or kv.crv != curve):
            raise bad_parameter(f"Algorithm {alg} needs an EC key on {curve}; key {kv.name} is {kv.kty} {kv.crv or ''}".strip() + ".")
        if family != "ec" and kv.is_ec:
            raise bad_parameter(f"Algorithm {alg} needs an RSA key; key {kv.name} is {kv.kty}.")
        if op not in kv.key_ops:
            raise ApiError(403, "Forbidden", f"Operation {op} is not permitted on key {kv.name}.")
        digest = unb64u(body.get(digest_field), digest_field)
        if len(digest) != hash_cls.digest_size:
            raise bad_parameter(f"Invalid digest length {len(digest)} for {alg}: expected {hash_cls.digest_size} bytes.")
        return alg, digest

    def _sign(self, name: str, version: str) -> None:
        body = self._json_body()
        with self.state.lock:
            kv = self._live(name, version)
            enabled = kv.attributes["enabled"]
        if not enabled:
            raise ApiError(403, "Forbidden", "Operation sign is not allowed on a disabled key.", inner="KeyDisabled")
        alg, digest = self._crypto_args(kv, "sign", body, "value")
        signature = sign_digest(kv, alg, digest)
        return self._send(200, {"kid": kv.jwk(self._base())["kid"], "value": b64u(signature)})

    def _verify(self, name: str, version: str) -> None:
        body = self._json_body()
        with self.state.lock:
            kv = self._live(name, version)
        alg, digest = self._crypto_args(kv, "verify", body, "digest")
        signature = unb64u(body.get("value"), "value")
        return self._send(200, {"value": verify_digest(kv, alg, digest, signature)})


class TLSServer(ThreadingHTTPServer):
    """HTTPS with the handshake in the request thread (a slow client cannot stall accept)."""

    daemon_threads = True

    def __init__(self, addr, handler, context: ssl.SSLContext):
        self.context = context
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        # wrap_socket detaches the plain socket, so the TLS one is closed here.
        try:
            super().finish_request(tls, client_address)
        finally:
            try:
                tls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            tls.close()


def main(argv=None):
    p = argparse.ArgumentParser(description="Fake Azure Key Vault (keys) for tests. Not Azure.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="HTTPS port: vault API, Entra token endpoint, /_fake/")
    p.add_argument("--token-port", type=int, required=True, help="plain HTTP port: managed identity endpoints")
    p.add_argument("--certdir", required=True)
    p.add_argument("--token-lifetime", type=int, default=3600)
    p.add_argument("--page-size", type=int, default=MAX_PAGE)
    p.add_argument("--tenant", default="fake-tenant")
    p.add_argument("--identity-header", default=None, help="the X-IDENTITY-HEADER value App Service clients must send")
    p.add_argument("--client", action="append", default=[], metavar="APPID:SECRET")
    p.add_argument("--client-assertion", action="append", default=[], metavar="APPID:ASSERTION")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    for value, flag in [(c, "--client") for c in args.client] + [(c, "--client-assertion") for c in args.client_assertion]:
        if ":" not in value:
            p.error(f"{flag} takes APPID:VALUE")
    if not 1 <= args.page_size <= MAX_PAGE:
        p.error(f"--page-size must be 1..{MAX_PAGE}")

    cert, key = ensure_tls(args.certdir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    state = State(args)

    class VaultHandler(Handler):
        pass

    class TokenHandler(Handler):
        token_port = True

    VaultHandler.state = TokenHandler.state = state
    vault = TLSServer((args.host, args.port), VaultHandler, context)
    tokens = ThreadingHTTPServer((args.host, args.token_port), TokenHandler)
    tokens.daemon_threads = True
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    print(f"azure_keyvault_fake: vault https://{args.host}:{args.port} tokens http://{args.host}:{args.token_port} "
          f"CA {os.path.join(args.certdir, 'ca.pem')}", file=sys.stderr, flush=True)
    try:
        vault.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
