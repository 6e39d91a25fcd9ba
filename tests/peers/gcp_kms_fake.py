"""A fake of the Google Cloud KMS REST API (v1), for tests.

No Cloud KMS emulator that can sign is available, so this one is written from the public
API reference: resource names, HTTP paths, proto3 JSON encoding, enum numbers (from
google/cloud/kms/v1/resources.proto), Google's JSON error body and the IAM policy
compare-and-swap. It keeps everything in memory.

What it models (see tests/peers/test_gcp_kms_fake.py, which drives it with Google's official
Python client over REST):

- keyRings create/get/list; cryptoKeys create/get/list/patch (labels,
  versionTemplate.algorithm) with label and id validation; cryptoKeyVersions
  create/get/list/patch(state)/destroy/restore/getPublicKey/asymmetricSign;
  getIamPolicy/setIamPolicy (etag compare-and-swap)/testIamPermissions.
- Versions start in PENDING_GENERATION and turn ENABLED in the background after the key pair
  is generated and --generation-delay has passed.
- List filters (an AIP-160 subset: `AND`-joined `field = value`, `!=`, `field:*`), paging with
  opaque page tokens, `totalSize`.
- Enums as names, or as numbers when the query has `$alt=json;enum-encoding=int`.
- Service accounts and their credentials. A service account is registered with its public key
  (POST /_fake/service_accounts, or --service-account-key FILE at start-up). A caller presents a
  bearer credential that must verify against a registered key: RS256 only (`alg: none` and
  other algorithms are refused), the `kid` header (when set) naming a registered key (or the
  account has keys registered without an id),
  `iss` the service account and `sub` absent or equal to it, `iat` not in the future and
  `exp` not past, at most 1 hour apart (with 5 minutes' allowance for clock skew). Two shapes:
  - a self-signed JWT sent directly as the bearer token (what Google's auth libraries send
    for service account keys: google-cloud-auth for Rust always, google-auth for Python with
    the Cloud client libraries), whose `aud` names the service (https://cloudkms.googleapis.com/
    or the fake's own base URL) or whose `scope` lists OAuth scopes;
  - an access token from `POST /token` (JWT-bearer grant): the assertion verifies as above,
    its `aud` is the fake's /token URL or Google's token URI, its `scope` is not empty.
    `GET /tokeninfo` describes such tokens.
  A credential whose scopes include neither cloud-platform nor cloudkms gets PERMISSION_DENIED
  "Request had insufficient authentication scopes."
- IAM. Each API method needs the permission Google documents for it (METHOD_PERMISSIONS; none
  for testIamPermissions), on its resource: the parent for create and list, the CryptoKey for
  asymmetricSign, the named resource otherwise. A caller (`serviceAccount:EMAIL`, plus
  `allAuthenticatedUsers` and `allUsers`) holds a permission when a binding on the resource or
  an ancestor grants it a role containing it: CryptoKey, its KeyRing, and the project (a
  project-level policy exists only through the test controls). Roles: the predefined roles in
  PREDEFINED_ROLES (roles/owner, roles/cloudkms.admin, .viewer, .signerVerifier, .signer,
  .publicKeyViewer, .cryptoKeyEncrypterDecrypter; their Cloud KMS permissions as Google lists
  them) and custom roles made with POST /_fake/roles. Conditional bindings grant nothing
  (conditions are not evaluated). A denial is PERMISSION_DENIED "Permission 'P' denied on
  resource 'R' (or it may not exist)." and comes before NOT_FOUND, as in Cloud KMS.
  testIamPermissions answers with the requested permissions the caller holds on the resource.
  With IAM enforced, setIamPolicy refuses roles the fake cannot evaluate (unknown predefined
  roles; custom roles not made, or made in another project).
- Enforcement: with --require-auth every API call needs a valid credential (else
  UNAUTHENTICATED) and IAM is enforced. Without it calls may be anonymous, nothing is
  checked, testIamPermissions grants whatever is asked, and a credential that verifies only
  names the caller in /_fake/callers. There is no built-in identity: tests make their own
  admin identity by registering a service account key they generate and granting it a role
  (e.g. roles/owner on the project through POST /_fake/grant).
- Test controls under /_fake/ (not authenticated, not subject to IAM): health, faults, latency,
  calls, generation_delay, corrupt, seed, state, callers, and for identity and IAM:
  - POST service_accounts  {"key_file": {...service account JSON key file...}} (or the key
    file itself as the body; only the public key is kept), or {"email": E, "public_key_pem":
    PEM, "key_id": K (optional)} -> {"email", "keyId"}; GET service_accounts -> {email: [key ids]}
  - POST roles  {"name": "projects/P/roles/ID", "includedPermissions": [...]} (create or
    replace a custom role); GET roles -> {name: [permissions]}
  - POST grant  {"resource": R, "role": ROLE, "member": M} (or "members": [...]): adds the
    members to R's binding for ROLE; R is projects/P, a KeyRing or a CryptoKey name -> policy
  - POST iam_policy  {"resource": R, "policy": {"bindings": [...]}} replaces R's policy;
    GET iam_policy?resource=R -> policy

With --state-file PATH the key rings (CryptoKeys, versions with their key material, IAM
policies), custom roles and registered service accounts are loaded from PATH at start-up if it
exists and written to it on SIGTERM, so that a test can restart the fake and find the same
keys. Access tokens and test controls (faults, calls) are not kept.

Usage: python gcp_kms_fake.py --host 127.0.0.1 --port N [--generation-delay S] [--require-auth]
       [--service-account-key FILE ...] [--state-file PATH] [--verbose]
"""

from __future__ import annotations

import argparse
import base64
import copyreg
import datetime as dt
import json
import os
import pickle
import re
import secrets
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

# ---------------------------------------------------------------------------------------------
# CRC32C (Castagnoli, reflected polynomial 0x82F63B78)

_CRC32C_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)
del _i, _c


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Enums (numbers from google/cloud/kms/v1/resources.proto)

PURPOSE = {
    "CRYPTO_KEY_PURPOSE_UNSPECIFIED": 0,
    "ENCRYPT_DECRYPT": 1,
    "ASYMMETRIC_SIGN": 5,
    "ASYMMETRIC_DECRYPT": 6,
    "RAW_ENCRYPT_DECRYPT": 7,
    "MAC": 9,
    "KEY_ENCAPSULATION": 10,
    "AES_WRAPPING": 11,
}
STATE = {
    "CRYPTO_KEY_VERSION_STATE_UNSPECIFIED": 0,
    "ENABLED": 1,
    "DISABLED": 2,
    "DESTROYED": 3,
    "DESTROY_SCHEDULED": 4,
    "PENDING_GENERATION": 5,
    "PENDING_IMPORT": 6,
    "IMPORT_FAILED": 7,
    "GENERATION_FAILED": 8,
    "PENDING_EXTERNAL_DESTRUCTION": 9,
    "EXTERNAL_DESTRUCTION_FAILED": 10,
}
ALGORITHM = {
    "CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED": 0,
    "GOOGLE_SYMMETRIC_ENCRYPTION": 1,
    "RSA_SIGN_PSS_2048_SHA256": 2,
    "RSA_SIGN_PSS_3072_SHA256": 3,
    "RSA_SIGN_PSS_4096_SHA256": 4,
    "RSA_SIGN_PKCS1_2048_SHA256": 5,
    "RSA_SIGN_PKCS1_3072_SHA256": 6,
    "RSA_SIGN_PKCS1_4096_SHA256": 7,
    "RSA_DECRYPT_OAEP_2048_SHA256": 8,
    "RSA_DECRYPT_OAEP_3072_SHA256": 9,
    "RSA_DECRYPT_OAEP_4096_SHA256": 10,
    "EC_SIGN_P256_SHA256": 12,
    "EC_SIGN_P384_SHA384": 13,
    "RSA_SIGN_PSS_4096_SHA512": 15,
    "RSA_SIGN_PKCS1_4096_SHA512": 16,
    "RSA_DECRYPT_OAEP_4096_SHA512": 17,
    "EXTERNAL_SYMMETRIC_ENCRYPTION": 18,
    "AES_256_GCM": 19,
    "RSA_SIGN_RAW_PKCS1_2048": 28,
    "RSA_SIGN_RAW_PKCS1_3072": 29,
    "RSA_SIGN_RAW_PKCS1_4096": 30,
    "EC_SIGN_SECP256K1_SHA256": 31,
    "HMAC_SHA256": 32,
    "HMAC_SHA1": 33,
    "HMAC_SHA384": 34,
    "HMAC_SHA512": 35,
    "HMAC_SHA224": 36,
    "RSA_DECRYPT_OAEP_2048_SHA1": 37,
    "RSA_DECRYPT_OAEP_3072_SHA1": 38,
    "RSA_DECRYPT_OAEP_4096_SHA1": 39,
    "EC_SIGN_ED25519": 40,
    "AES_128_GCM": 41,
    "AES_128_CBC": 42,
    "AES_256_CBC": 43,
    "AES_128_CTR": 44,
    "AES_256_CTR": 45,
    "ML_KEM_768": 47,
    "ML_KEM_1024": 48,
    "PQ_SIGN_ML_DSA_65": 56,
    "PQ_SIGN_SLH_DSA_SHA2_128S": 57,
    "PQ_SIGN_HASH_SLH_DSA_SHA2_128S_SHA256": 60,
    "KEM_XWING": 63,
    "PQ_SIGN_ML_DSA_65_EXTERNAL_MU": 67,
    "PQ_SIGN_ML_DSA_44": 68,
    "PQ_SIGN_ML_DSA_87": 69,
    "PQ_SIGN_ML_DSA_44_EXTERNAL_MU": 70,
    "PQ_SIGN_ML_DSA_87_EXTERNAL_MU": 71,
    "AES_256_KWP": 73,
}
PROTECTION = {
    "PROTECTION_LEVEL_UNSPECIFIED": 0,
    "SOFTWARE": 1,
    "HSM": 2,
    "EXTERNAL": 3,
    "EXTERNAL_VPC": 4,
    "HSM_SINGLE_TENANT": 5,
}
ENUM_FIELDS = {
    "purpose": PURPOSE,
    "state": STATE,
    "algorithm": ALGORITHM,
    "protectionLevel": PROTECTION,
}
IMPORT_METHOD = {
    "IMPORT_METHOD_UNSPECIFIED": 0,
    "RSA_OAEP_3072_SHA1_AES_256": 1,
    "RSA_OAEP_4096_SHA1_AES_256": 2,
    "RSA_OAEP_3072_SHA256_AES_256": 3,
    "RSA_OAEP_4096_SHA256_AES_256": 4,
    "RSA_OAEP_3072_SHA256": 5,
    "RSA_OAEP_4096_SHA256": 6,
}
IMPORT_JOB_STATE = {
    "IMPORT_JOB_STATE_UNSPECIFIED": 0,
    "PENDING_GENERATION": 1,
    "ACTIVE": 2,
    "EXPIRED": 3,
}
# An ImportJob's "state" is its own enum (PENDING_GENERATION is 1 there, 5 for versions).
IMPORT_JOB_ENUM_FIELDS = {"importMethod": IMPORT_METHOD, "state": IMPORT_JOB_STATE,
                          "protectionLevel": PROTECTION}
# Import methods this fake implements: (wrapping key bits, OAEP hash, with an AES-256 key).
IMPORT_METHODS = {
    "RSA_OAEP_3072_SHA1_AES_256": (3072, "sha1", True),
    "RSA_OAEP_4096_SHA1_AES_256": (4096, "sha1", True),
    "RSA_OAEP_3072_SHA256_AES_256": (3072, "sha256", True),
    "RSA_OAEP_4096_SHA256_AES_256": (4096, "sha256", True),
    "RSA_OAEP_3072_SHA256": (3072, "sha256", False),
    "RSA_OAEP_4096_SHA256": (4096, "sha256", False),
}
IMPORT_JOB_LIFETIME = 3 * 86400.0

# Signing algorithms this fake can generate keys for: (kind, size or curve, hash, padding).
SIGN_ALGORITHMS = {
    "EC_SIGN_P256_SHA256": ("ec", ec.SECP256R1, "sha256", None),
    "EC_SIGN_P384_SHA384": ("ec", ec.SECP384R1, "sha384", None),
    "RSA_SIGN_PKCS1_2048_SHA256": ("rsa", 2048, "sha256", "pkcs1"),
    "RSA_SIGN_PKCS1_3072_SHA256": ("rsa", 3072, "sha256", "pkcs1"),
    "RSA_SIGN_PKCS1_4096_SHA256": ("rsa", 4096, "sha256", "pkcs1"),
    "RSA_SIGN_PKCS1_4096_SHA512": ("rsa", 4096, "sha512", "pkcs1"),
    "RSA_SIGN_PSS_2048_SHA256": ("rsa", 2048, "sha256", "pss"),
    "RSA_SIGN_PSS_3072_SHA256": ("rsa", 3072, "sha256", "pss"),
    "RSA_SIGN_PSS_4096_SHA256": ("rsa", 4096, "sha256", "pss"),
    "RSA_SIGN_PSS_4096_SHA512": ("rsa", 4096, "sha512", "pss"),
}
# Every ASYMMETRIC_SIGN algorithm Cloud KMS knows (to tell "wrong purpose" from "unsupported").
ALL_SIGN_ALGORITHMS = set(SIGN_ALGORITHMS) | {
    "RSA_SIGN_RAW_PKCS1_2048",
    "RSA_SIGN_RAW_PKCS1_3072",
    "RSA_SIGN_RAW_PKCS1_4096",
    "EC_SIGN_SECP256K1_SHA256",
    "EC_SIGN_ED25519",
    "PQ_SIGN_ML_DSA_44",
    "PQ_SIGN_ML_DSA_65",
    "PQ_SIGN_ML_DSA_87",
    "PQ_SIGN_SLH_DSA_SHA2_128S",
    "PQ_SIGN_HASH_SLH_DSA_SHA2_128S_SHA256",
    "PQ_SIGN_ML_DSA_44_EXTERNAL_MU",
    "PQ_SIGN_ML_DSA_65_EXTERNAL_MU",
    "PQ_SIGN_ML_DSA_87_EXTERNAL_MU",
}
SYMMETRIC_ALGORITHMS = {"GOOGLE_SYMMETRIC_ENCRYPTION"}
HASH_CLASSES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
HASH_LEN = {"sha256": 32, "sha384": 48, "sha512": 64}

# ---------------------------------------------------------------------------------------------
# Errors

HTTP_CODE = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class ApiError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        return {"error": {"code": HTTP_CODE[self.status], "message": self.message, "status": self.status}}


def invalid(message: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message)


def precondition(message: str) -> ApiError:
    return ApiError("FAILED_PRECONDITION", message)


def not_found(message: str) -> ApiError:
    return ApiError("NOT_FOUND", message)


# ---------------------------------------------------------------------------------------------
# proto3 JSON helpers


def now() -> float:
    return time.time()


def fmt_time(t: float | None) -> str | None:
    if t is None:
        return None
    d = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond:06d}Z"


def fmt_duration(seconds: float) -> str:
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.9f}".rstrip("0") + "s"


_DURATION_RE = re.compile(r"^(-?\d+)(\.\d{1,9})?s$")


def parse_duration(value, field: str) -> float:
    if not isinstance(value, str) or not _DURATION_RE.match(value):
        raise invalid(f"Invalid value at '{field}' (type.googleapis.com/google.protobuf.Duration), {json.dumps(value)}")
    return float(value[:-1])


def parse_bytes(value, field: str) -> bytes:
    if not isinstance(value, str):
        raise invalid(f"Invalid value at '{field}' (TYPE_BYTES), {json.dumps(value)}")
    s = value.replace("-", "+").replace("_", "/").rstrip("=")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, base64.binascii.Error):
        raise invalid(f"Invalid value at '{field}' (TYPE_BYTES), Base64 decoding failed for {json.dumps(value)}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parse_int64(value, field: str) -> int:
    if isinstance(value, bool):
        raise invalid(f"Invalid value at '{field}' (TYPE_INT64), {json.dumps(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    if isinstance(value, dict) and "value" in value:  # tolerate a wrapper written out as an object
        return parse_int64(value["value"], field)
    raise invalid(f"Invalid value at '{field}' (TYPE_INT64), {json.dumps(value)}")


def parse_enum(value, table: dict, field: str) -> str:
    if isinstance(value, bool):
        raise invalid(f"Invalid value at '{field}', {json.dumps(value)}")
    if isinstance(value, int):
        for name, num in table.items():
            if num == value:
                return name
    elif isinstance(value, str):
        if value in table:
            return value
        if re.fullmatch(r"\d+", value):
            return parse_enum(int(value), table, field)
    raise invalid(f"Invalid value at '{field}', {json.dumps(value)}")


def parse_bool(value, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise invalid(f"Invalid value at '{field}' (TYPE_BOOL), {json.dumps(value)}")


def encode_enums(obj, ints: bool):
    """Turns enum names into numbers in a response tree when the client asked for ints."""
    if not ints:
        return obj
    if isinstance(obj, dict):
        out = {}
        table = IMPORT_JOB_ENUM_FIELDS if "importMethod" in obj else ENUM_FIELDS
        for k, v in obj.items():
            if k in table and isinstance(v, str):
                out[k] = table[k][v]
            else:
                out[k] = encode_enums(v, ints)
        return out
    if isinstance(obj, list):
        return [encode_enums(v, ints) for v in obj]
    return obj


def prune(d: dict) -> dict:
    """proto3 JSON omits fields at their default value."""
    return {k: v for k, v in d.items() if v not in (None, "", [], {}, False, 0)}


# ---------------------------------------------------------------------------------------------
# Validation

ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
MAX_DESTROY_SCHEDULED = 120 * 86400


def validate_labels(labels, field: str) -> dict:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise invalid(f"Invalid value at '{field}', expected a map")
    if len(labels) > 64:
        raise invalid(f"{field}: a resource can have at most 64 labels, got {len(labels)}")
    for k, v in labels.items():
        if not isinstance(v, str):
            raise invalid(f"Invalid value at '{field}[{k}]' (TYPE_STRING), {json.dumps(v)}")
        if not LABEL_KEY_RE.match(k):
            raise invalid(f"{field}: invalid label key {k!r}: keys must start with a lowercase letter and contain only lowercase letters, digits, '_' and '-' (at most 63 characters)")
        if not LABEL_VALUE_RE.match(v):
            raise invalid(f"{field}: invalid value {v!r} for label {k!r}: values may contain only lowercase letters, digits, '_' and '-' (at most 63 characters)")
    return dict(labels)


def check_known(body: dict, allowed: set, where: str):
    for k in body:
        if k not in allowed:
            raise invalid(f'Invalid JSON payload received. Unknown name "{k}" at \'{where}\': Cannot find field.')


# ---------------------------------------------------------------------------------------------
# Filters (AIP-160 subset)

_TERM_RE = re.compile(
    r"""^\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*(!=|=|:)\s*("(?:[^"\\]|\\.)*"|[A-Za-z0-9_.*/-]+)\s*$"""
)


def parse_filter(text: str):
    """Returns a list of (path, op, value) terms, all of which must hold."""
    text = (text or "").strip()
    if not text:
        return []
    terms = []
    for part in re.split(r"\s+AND\s+", text):
        m = _TERM_RE.match(part)
        if not m or " OR " in part or part.strip().startswith(("NOT ", "-")):
            raise invalid(f"Invalid filter: {text!r}")
        path, op, value = m.groups()
        if value.startswith('"'):
            value = json.loads(value)
        terms.append((path, op, value))
    return terms


def filter_matches(terms, fields: dict, labels: dict, resource: str) -> bool:
    for path, op, value in terms:
        if path.startswith("labels."):
            key = path[len("labels."):]
            present = key in labels
            if op == ":" and value == "*":
                ok = present
            elif op == "!=":
                ok = labels.get(key) != value
            else:  # "=" or ":" with a value
                ok = present and labels[key] == value
        elif path in fields:
            actual = fields[path]
            table = ENUM_FIELDS.get(path.split(".")[-1])
            if table is not None and re.fullmatch(r"\d+", value):
                value = next((n for n, i in table.items() if str(i) == value), value)
            if op == ":" and value == "*":
                ok = actual not in (None, "")
            elif op == "!=":
                ok = actual != value
            elif op == ":" and path == "name":
                ok = value in (actual or "")
            else:
                ok = actual == value
        else:
            raise invalid(f"Invalid filter: unknown field {path!r} for {resource}")
        if not ok:
            return False
    return True


def encode_page_token(offset: int, filt: str) -> str:
    raw = json.dumps({"o": offset, "f": crc32c((filt or "").encode())}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filt: str) -> int:
    try:
        s = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(s))
        offset = int(data["o"])
        if data["f"] != crc32c((filt or "").encode()) or offset < 0:
            raise ValueError
        return offset
    except Exception:
        raise invalid(f"Invalid page token {token!r} (page tokens must come from the same list request)")


# ---------------------------------------------------------------------------------------------
# State


class Version:
    def __init__(self, key: "CryptoKey", number: int):
        self.key = key
        self.number = number
        self.name = f"{key.name}/cryptoKeyVersions/{number}"
        self.algorithm = key.algorithm
        self.protection = key.protection
        self.state = "PENDING_GENERATION"
        self.create_time = now()
        self.generate_time = None
        self.destroy_time = None
        self.destroy_event_time = None
        self.private_key = None
        self.pem = None
        self.import_job = None
        self.import_time = None

    def refresh(self):
        if self.state == "DESTROY_SCHEDULED" and self.destroy_time is not None and self.destroy_time <= now():
            self.state = "DESTROYED"
            self.destroy_event_time = self.destroy_time
            self.private_key = None

    def json(self) -> dict:
        self.refresh()
        return prune({
            "name": self.name,
            "state": self.state,
            "protectionLevel": self.protection,
            "algorithm": self.algorithm,
            "createTime": fmt_time(self.create_time),
            "generateTime": fmt_time(self.generate_time),
            "destroyTime": fmt_time(self.destroy_time),
            "destroyEventTime": fmt_time(self.destroy_event_time),
            "importJob": self.import_job,
            "importTime": fmt_time(self.import_time),
        })


class CryptoKey:
    def __init__(self, name, purpose, algorithm, protection, labels, destroy_duration):
        self.name = name
        self.purpose = purpose
        self.algorithm = algorithm
        self.protection = protection
        self.labels = labels
        self.destroy_duration = destroy_duration
        self.create_time = now()
        self.versions: dict[int, Version] = {}
        self.next_version = 1
        self.primary: int | None = None
        self.policy = Policy()

    def json(self) -> dict:
        out = {"name": self.name}
        if self.purpose == "ENCRYPT_DECRYPT" and self.primary in self.versions:
            out["primary"] = self.versions[self.primary].json()
        out["purpose"] = self.purpose
        out["createTime"] = fmt_time(self.create_time)
        out["versionTemplate"] = {"protectionLevel": self.protection, "algorithm": self.algorithm}
        if self.labels:
            out["labels"] = dict(self.labels)
        out["destroyScheduledDuration"] = fmt_duration(self.destroy_duration)
        return out


class ImportJob:
    """A key-wrapping key pair of a key ring: clients wrap key material with its public key;
    importCryptoKeyVersion unwraps it with the private key."""

    def __init__(self, name, method, protection):
        self.name = name
        self.method = method
        self.protection = protection
        self.create_time = now()
        self.generate_time = None
        self.expire_time = None
        self.state = "PENDING_GENERATION"
        self.private_key = None
        self.pem = None

    def refresh(self):
        if self.state == "ACTIVE" and self.expire_time is not None and self.expire_time <= now():
            self.state = "EXPIRED"
            self.private_key = None

    def json(self) -> dict:
        self.refresh()
        out = prune({
            "name": self.name,
            "importMethod": self.method,
            "protectionLevel": self.protection,
            "createTime": fmt_time(self.create_time),
            "generateTime": fmt_time(self.generate_time),
            "expireTime": fmt_time(self.expire_time),
            "expireEventTime": fmt_time(self.expire_time) if self.state == "EXPIRED" else None,
            "state": self.state,
        })
        if self.pem is not None and self.state == "ACTIVE":
            out["publicKey"] = {"pem": self.pem}
        return out


class KeyRing:
    def __init__(self, name):
        self.name = name
        self.create_time = now()
        self.keys: dict[str, CryptoKey] = {}
        self.import_jobs: dict[str, ImportJob] = {}
        self.policy = Policy()

    def json(self) -> dict:
        return {"name": self.name, "createTime": fmt_time(self.create_time)}


class Policy:
    EMPTY_ETAG = b"\x00\x20\x01"  # "ACAB", the etag Google returns for a never-set policy

    def __init__(self):
        self.bindings: list = []
        self.etag = self.EMPTY_ETAG

    def set(self, bindings: list):
        self.bindings = bindings
        self.etag = b"\x42\x77" + secrets.token_bytes(6)

    def json(self) -> dict:
        out = {}
        if self.bindings:
            has_conditions = any("condition" in b for b in self.bindings)
            out["version"] = 3 if has_conditions else 1
            out["bindings"] = self.bindings
        out["etag"] = b64(self.etag)
        return out


# ---------------------------------------------------------------------------------------------
# Identity: service accounts, signed JWTs, access tokens

# The token URIs Google's auth libraries put in `aud` of a JWT-bearer assertion (google-auth for
# Python always uses the first, whatever the key file's token_uri says).
GOOGLE_TOKEN_AUDIENCES = {
    "https://oauth2.googleapis.com/token",
    "https://www.googleapis.com/oauth2/v4/token",
    "https://accounts.google.com/o/oauth2/token",
}
# A self-signed JWT names the service in `aud` (AIP-4111) or carries OAuth scopes in `scope`.
SERVICE_AUDIENCES = {"https://cloudkms.googleapis.com/", "https://cloudkms.googleapis.com"}
# The scopes Cloud KMS methods accept.
KMS_SCOPES = {"https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/cloudkms"}
JWT_MAX_LIFETIME = 3600  # exp - iat, seconds
CLOCK_SKEW = 300  # tolerated on iat (future) and on the lifetime
ACCESS_TOKEN_LIFETIME = 3600


class AuthError(Exception):
    """A credential that does not verify; the message says why (for the fake's log and errors)."""


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def parse_jwt(token: str):
    """Splits a compact JWS: returns (header, claims, signing input, signature)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("not a JWT")
    try:
        header, claims = json.loads(_b64url(parts[0])), json.loads(_b64url(parts[1]))
        signature = _b64url(parts[2])
    except Exception:
        raise AuthError("malformed JWT")
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AuthError("malformed JWT")
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), signature


def load_service_account(body: dict):
    """Returns (email, key id, RSA public key) from a control body or a key file.

    Accepted: a whole service account key file ({"type": "service_account", "client_email",
    "private_key_id", "private_key", ...}), itself or under "key_file"; or {"email",
    "public_key_pem", "key_id" (optional)}. Only the public key is kept.
    """
    if isinstance(body.get("key_file"), dict):
        body = body["key_file"]
    if "private_key" in body:
        email, key_id = body.get("client_email"), body.get("private_key_id") or ""
        try:
            public_key = serialization.load_pem_private_key(body["private_key"].encode(), None).public_key()
        except Exception as e:
            raise invalid(f"private_key of {email!r} is not a PEM private key: {e}")
    elif "public_key_pem" in body:
        email, key_id = body.get("email"), body.get("key_id") or ""
        try:
            public_key = serialization.load_pem_public_key(body["public_key_pem"].encode())
        except Exception as e:
            raise invalid(f"public_key_pem of {email!r} is not a PEM public key: {e}")
    else:
        raise invalid("give a service account key file (as \"key_file\" or the body itself) or email and public_key_pem")
    if not isinstance(email, str) or "@" not in email:
        raise invalid(f"bad service account email {email!r}")
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise invalid("service account keys are RSA keys (RS256)")
    return email, key_id, public_key


# ---------------------------------------------------------------------------------------------
# IAM: the permission each method needs, the predefined roles the fake knows

# Method -> the permission Google documents for it ("Permissions and roles" in the Cloud KMS
# docs, and each method's reference page), checked on the method's resource: the parent for
# create and list, the named resource otherwise. testIamPermissions needs none.
METHOD_PERMISSIONS = {
    "keyRings.create": "cloudkms.keyRings.create",
    "keyRings.list": "cloudkms.keyRings.list",
    "keyRings.get": "cloudkms.keyRings.get",
    "keyRings.getIamPolicy": "cloudkms.keyRings.getIamPolicy",
    "keyRings.setIamPolicy": "cloudkms.keyRings.setIamPolicy",
    "keyRings.testIamPermissions": None,
    "cryptoKeys.create": "cloudkms.cryptoKeys.create",
    "cryptoKeys.list": "cloudkms.cryptoKeys.list",
    "cryptoKeys.get": "cloudkms.cryptoKeys.get",
    "cryptoKeys.patch": "cloudkms.cryptoKeys.update",
    "cryptoKeys.getIamPolicy": "cloudkms.cryptoKeys.getIamPolicy",
    "cryptoKeys.setIamPolicy": "cloudkms.cryptoKeys.setIamPolicy",
    "cryptoKeys.testIamPermissions": None,
    "cryptoKeyVersions.create": "cloudkms.cryptoKeyVersions.create",
    "cryptoKeyVersions.list": "cloudkms.cryptoKeyVersions.list",
    "cryptoKeyVersions.get": "cloudkms.cryptoKeyVersions.get",
    "cryptoKeyVersions.patch": "cloudkms.cryptoKeyVersions.update",
    "cryptoKeyVersions.destroy": "cloudkms.cryptoKeyVersions.destroy",
    "cryptoKeyVersions.restore": "cloudkms.cryptoKeyVersions.restore",
    "cryptoKeyVersions.getPublicKey": "cloudkms.cryptoKeyVersions.viewPublicKey",
    "cryptoKeyVersions.asymmetricSign": "cloudkms.cryptoKeyVersions.useToSign",
    "importJobs.create": "cloudkms.importJobs.create",
    "importJobs.get": "cloudkms.importJobs.get",
    "importJobs.list": "cloudkms.importJobs.list",
    # Google documents importCryptoKeyVersion as needing cloudkms.cryptoKeyVersions.create on
    # the key and cloudkms.importJobs.useToImport on the job; the key's permission is checked.
    "cryptoKeyVersions.import": "cloudkms.cryptoKeyVersions.create",
}

_LOCATIONS = {"cloudkms.locations.get", "cloudkms.locations.list", "resourcemanager.projects.get"}
# Predefined roles, from Google's "Cloud KMS roles and permissions" page, limited to the
# permissions of the resources this fake models (key rings, keys, versions, locations).
PREDEFINED_ROLES = {
    "roles/cloudkms.admin": _LOCATIONS | {
        "cloudkms.keyRings.create", "cloudkms.keyRings.get", "cloudkms.keyRings.list",
        "cloudkms.keyRings.getIamPolicy", "cloudkms.keyRings.setIamPolicy",
        "cloudkms.cryptoKeys.create", "cloudkms.cryptoKeys.get", "cloudkms.cryptoKeys.list",
        "cloudkms.cryptoKeys.update", "cloudkms.cryptoKeys.getIamPolicy", "cloudkms.cryptoKeys.setIamPolicy",
        "cloudkms.cryptoKeyVersions.create", "cloudkms.cryptoKeyVersions.get", "cloudkms.cryptoKeyVersions.list",
        "cloudkms.cryptoKeyVersions.update", "cloudkms.cryptoKeyVersions.destroy",
        "cloudkms.cryptoKeyVersions.restore",
        "cloudkms.importJobs.create", "cloudkms.importJobs.get", "cloudkms.importJobs.list",
        "cloudkms.importJobs.useToImport",
    },
    "roles/cloudkms.viewer": _LOCATIONS | {
        "cloudkms.keyRings.get", "cloudkms.keyRings.list", "cloudkms.cryptoKeys.get", "cloudkms.cryptoKeys.list",
        "cloudkms.cryptoKeyVersions.get", "cloudkms.cryptoKeyVersions.list",
    },
    "roles/cloudkms.signerVerifier": _LOCATIONS | {
        "cloudkms.cryptoKeyVersions.useToSign", "cloudkms.cryptoKeyVersions.useToVerify",
        "cloudkms.cryptoKeyVersions.viewPublicKey",
    },
    "roles/cloudkms.signer": _LOCATIONS | {"cloudkms.cryptoKeyVersions.useToSign"},
    "roles/cloudkms.importer": _LOCATIONS | {
        "cloudkms.importJobs.get", "cloudkms.importJobs.list", "cloudkms.importJobs.useToImport",
    },
    "roles/cloudkms.publicKeyViewer": _LOCATIONS | {"cloudkms.cryptoKeyVersions.viewPublicKey"},
    "roles/cloudkms.cryptoKeyEncrypterDecrypter": _LOCATIONS | {
        "cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeyVersions.useToDecrypt",
    },
}
# roles/owner holds every Cloud KMS permission, the cryptographic ones included.
PREDEFINED_ROLES["roles/owner"] = set().union(*PREDEFINED_ROLES.values()) | {
    "cloudkms.cryptoKeyVersions.useToVerify",
}
PERMISSION_RE = re.compile(r"^[a-z][a-zA-Z0-9]*\.[a-zA-Z0-9]+\.[a-zA-Z0-9]+$")
CUSTOM_ROLE_RE = re.compile(r"^(projects|organizations)/([^/]+)/roles/[a-zA-Z0-9_.]{3,64}$")


class Fake:
    def __init__(self, generation_delay: float, require_auth: bool):
        self.lock = threading.RLock()
        self.rings: dict[str, KeyRing] = {}
        self.generation_delay = generation_delay
        self.require_auth = require_auth
        self.latency = 0.0
        self.faults: dict[str, list] = {}
        self.corrupt: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.callers: dict[str, dict[str, int]] = {}
        # access token -> (email, expiry, scopes), from POST /token
        self.tokens: dict[str, tuple[str, float, frozenset]] = {}
        # email -> {key id: RSA public key}
        self.service_accounts: dict[str, dict] = {}
        # verified bearer JWT -> (email, exp, scopes or None when `aud` names the service)
        self.verified_jwts: dict[str, tuple[str, float, frozenset | None]] = {}
        # project id -> Policy (the ancestor of every key ring in that project)
        self.project_policies: dict[str, Policy] = {}
        # custom role name -> permissions
        self.custom_roles: dict[str, set] = {}

    # -- lookups (call with the lock held) ------------------------------------------------

    def ring(self, name: str) -> KeyRing:
        ring = self.rings.get(name)
        if ring is None:
            raise not_found(f"KeyRing {name} not found.")
        return ring

    def key(self, ring_name: str, key_id: str) -> CryptoKey:
        ring = self.ring(ring_name)
        key = ring.keys.get(key_id)
        if key is None:
            raise not_found(f"CryptoKey {ring_name}/cryptoKeys/{key_id} not found.")
        return key

    def version(self, ring_name: str, key_id: str, number: str) -> Version:
        key = self.key(ring_name, key_id)
        v = key.versions.get(int(number)) if number.isdigit() else None
        if v is None:
            raise not_found(f"CryptoKeyVersion {key.name}/cryptoKeyVersions/{number} not found.")
        v.refresh()
        return v

    # -- identity (call with the lock held) -------------------------------------------------

    def add_service_account(self, email: str, key_id: str, public_key):
        self.service_accounts.setdefault(email, {})[key_id] = public_key
        self.verified_jwts.clear()

    def verify_jwt(self, token: str):
        """Verifies an RS256 JWT signed by a registered service account key: signature, kid,
        iss/sub, iat/exp. Returns (header, claims); `aud` and `scope` are the caller's to check."""
        header, claims, signing_input, signature = parse_jwt(token)
        alg = header.get("alg")
        if alg != "RS256":
            raise AuthError(f"JWT alg {alg!r} is not accepted (service account keys sign RS256)")
        iss = claims.get("iss")
        keys = self.service_accounts.get(iss) if isinstance(iss, str) else None
        if not keys:
            raise AuthError(f"JWT issuer {iss!r} is not a known service account")
        kid = header.get("kid")
        if kid:
            # The key with that id, or else keys registered without an id.
            candidates = [keys[kid]] if kid in keys else [k for key_id, k in keys.items() if not key_id]
            if not candidates:
                raise AuthError(f"JWT kid {kid!r} is not a key of {iss}")
        else:
            candidates = list(keys.values())
        for key in candidates:
            try:
                key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
                break
            except Exception:
                continue
        else:
            raise AuthError("Invalid JWT Signature.")
        sub = claims.get("sub")
        if sub is not None and sub != iss:
            raise AuthError(f"JWT sub {sub!r} is not its issuer {iss!r} (domain-wide delegation is not modelled)")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (iat, exp)):
            raise AuthError("JWT iat and exp must be numbers")
        t = now()
        if iat > t + CLOCK_SKEW or exp <= t or exp <= iat or exp - iat > JWT_MAX_LIFETIME + CLOCK_SKEW:
            raise AuthError("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                            "timeframe. Check your iat and exp values in the JWT claim.")
        return header, claims

    def bearer_identity(self, token: str, service_audiences: set):
        """Returns (email, scopes or None) for an access token this fake issued or a
        self-signed JWT; raises AuthError otherwise. Scopes None: `aud` named the service."""
        entry = self.tokens.get(token)
        if entry is not None:
            if entry[1] <= now():
                raise AuthError("access token expired")
            return entry[0], entry[2]
        cached = self.verified_jwts.get(token)
        if cached is not None and cached[1] > now():
            return cached[0], cached[2]
        _, claims = self.verify_jwt(token)
        aud, scope = claims.get("aud"), claims.get("scope")
        if aud is not None:
            if aud not in service_audiences:
                raise AuthError(f"self-signed JWT aud {aud!r} is not this service")
            scopes = None
        elif isinstance(scope, str) and scope.split():
            scopes = frozenset(scope.split())
        else:
            raise AuthError("a self-signed JWT needs aud (the service) or scope")
        if len(self.verified_jwts) > 10000:
            self.verified_jwts.clear()
        self.verified_jwts[token] = (claims["iss"], float(claims["exp"]), scopes)
        return claims["iss"], scopes

    # -- IAM (call with the lock held) ------------------------------------------------------

    def policy_chain(self, resource: str) -> list:
        """The policies that apply to a resource: its project's, its key ring's, its
        CryptoKey's (CryptoKeyVersions have none; missing resources contribute nothing)."""
        segs = resource.split("/")
        chain = []
        if len(segs) >= 2 and segs[1] in self.project_policies:
            chain.append(self.project_policies[segs[1]])
        if len(segs) >= 6:
            ring = self.rings.get("/".join(segs[:6]))
            if ring is not None:
                chain.append(ring.policy)
                if len(segs) >= 8 and segs[7] in ring.keys:
                    chain.append(ring.keys[segs[7]].policy)
        return chain

    def role_permissions(self, role: str) -> set:
        return PREDEFINED_ROLES.get(role) or self.custom_roles.get(role) or set()

    def permissions_of(self, email, resource: str) -> set:
        """Everything the bindings on the resource and its ancestors grant the caller.
        Conditional bindings grant nothing (conditions are not evaluated)."""
        members = {"allUsers"}
        if email:
            members |= {"allAuthenticatedUsers", "serviceAccount:" + email}
        granted = set()
        for policy in self.policy_chain(resource):
            for b in policy.bindings:
                if "condition" not in b and members.intersection(b["members"]):
                    granted |= self.role_permissions(b["role"])
        return granted

    def check_role(self, role: str, resource: str, where: str):
        """With IAM enforced, a binding's role must be one the fake can evaluate."""
        if not self.require_auth or role in PREDEFINED_ROLES:
            return
        m = CUSTOM_ROLE_RE.match(role)
        if m is None:
            raise invalid(f"Role {role} is not supported for this resource. ({where}; this fake knows "
                          f"{', '.join(sorted(PREDEFINED_ROLES))} and custom roles made with /_fake/roles)")
        if role not in self.custom_roles or (m.group(1) == "projects" and m.group(2) != resource.split("/")[1]):
            raise invalid(f"Role ({role}) does not exist in the resource's hierarchy.")

    # -- key material ---------------------------------------------------------------------

    def start_generation(self, v: Version):
        delay = self.generation_delay

        def run():
            started = time.monotonic()
            try:
                private_key = generate_key(v.algorithm)
                pem = private_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode() if private_key is not None else None
            except Exception as e:  # pragma: no cover - defensive
                print(f"key generation failed for {v.name}: {e}", file=sys.stderr)
                with self.lock:
                    if v.state == "PENDING_GENERATION":
                        v.state = "GENERATION_FAILED"
                return
            remaining = delay - (time.monotonic() - started)
            if remaining > 0:
                time.sleep(remaining)
            with self.lock:
                v.private_key, v.pem = private_key, pem
                if v.state == "PENDING_GENERATION":
                    v.state = "ENABLED"
                    v.generate_time = now()

        threading.Thread(target=run, daemon=True).start()

    def start_import_job(self, job: ImportJob):
        """Generates the wrapping key pair off the request thread, like key versions."""
        delay = self.generation_delay
        bits = IMPORT_METHODS[job.method][0]

        def run():
            started = time.monotonic()
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
            pem = private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            remaining = delay - (time.monotonic() - started)
            if remaining > 0:
                time.sleep(remaining)
            with self.lock:
                job.private_key, job.pem = private_key, pem
                job.state = "ACTIVE"
                job.generate_time = now()
                job.expire_time = job.generate_time + IMPORT_JOB_LIFETIME

        threading.Thread(target=run, daemon=True).start()

    def new_version(self, key: CryptoKey) -> Version:
        v = Version(key, key.next_version)
        key.next_version += 1
        key.versions[v.number] = v
        if key.purpose == "ENCRYPT_DECRYPT":
            # Symmetric material is not modelled; such versions are usable at once.
            v.state = "ENABLED"
            v.generate_time = v.create_time
            if key.primary is None:
                key.primary = v.number
        else:
            self.start_generation(v)
        return v


def generate_key(algorithm: str):
    spec = SIGN_ALGORITHMS.get(algorithm)
    if spec is None:
        return None
    kind, param, _, _ = spec
    if kind == "ec":
        return ec.generate_private_key(param())
    return rsa.generate_private_key(public_exponent=65537, key_size=param)


def sign_digest(private_key, algorithm: str, digest: bytes) -> bytes:
    kind, _, hash_name, pad = SIGN_ALGORITHMS[algorithm]
    h = HASH_CLASSES[hash_name]()
    if kind == "ec":
        return private_key.sign(digest, ec.ECDSA(utils.Prehashed(h)))
    if pad == "pkcs1":
        return private_key.sign(digest, padding.PKCS1v15(), utils.Prehashed(h))
    return private_key.sign(
        digest,
        padding.PSS(mgf=padding.MGF1(HASH_CLASSES[hash_name]()), salt_length=HASH_LEN[hash_name]),
        utils.Prehashed(h),
    )


# ---------------------------------------------------------------------------------------------
# API handlers. Each takes (fake, ctx) and returns a JSON-able dict (enum names).


class Ctx:
    def __init__(self, http_method, segs, verb, query, body, caller=None):
        self.caller = caller  # the authenticated service account's email, or None
        self.http_method = http_method
        self.segs = segs
        self.verb = verb
        self.query = query
        self.body = body

    def q(self, name: str, default=None):
        vals = self.query.get(name)
        return vals[-1] if vals else default

    def q_any(self, *names, default=None):
        for n in names:
            v = self.q(n)
            if v is not None:
                return v
        return default

    def ring_name(self) -> str:
        return "/".join(self.segs[:6])

    def location(self) -> str:
        return "/".join(self.segs[:4])


def page(ctx: Ctx, items: list, field: str) -> dict:
    raw = ctx.q_any("pageSize", "page_size", default="0")
    try:
        size = int(raw)
    except ValueError:
        raise invalid(f"Invalid value at 'page_size' (TYPE_INT32), {raw!r}")
    if size < 0:
        raise invalid("page_size must not be negative")
    size = min(size or 100, 1000)
    filt = ctx.q("filter", "")
    token = ctx.q_any("pageToken", "page_token", default="")
    offset = decode_page_token(token, filt) if token else 0
    chunk = items[offset:offset + size]
    out = {}
    if chunk:
        out[field] = chunk
    if offset + size < len(items):
        out["nextPageToken"] = encode_page_token(offset + size, filt)
    if items:
        out["totalSize"] = len(items)
    return out


def order(ctx: Ctx, objs: list, key_fn_by_field: dict) -> list:
    spec = (ctx.q_any("orderBy", "order_by", default="") or "").strip()
    if not spec:
        return objs
    m = re.fullmatch(r"([A-Za-z_.]+)(\s+(asc|desc))?", spec)
    if not m or m.group(1) not in key_fn_by_field:
        raise invalid(f"Invalid order_by: {spec!r}")
    return sorted(objs, key=key_fn_by_field[m.group(1)], reverse=m.group(3) == "desc")


def h_keyring_create(fake: Fake, ctx: Ctx):
    ring_id = ctx.q_any("keyRingId", "key_ring_id", default="")
    if not ID_RE.match(ring_id):
        raise invalid(f"key_ring_id {ring_id!r} must match [a-zA-Z0-9_-]{{1,63}}")
    check_known(ctx.body, {"name", "createTime"}, "key_ring")
    name = f"{ctx.location()}/keyRings/{ring_id}"
    with fake.lock:
        if name in fake.rings:
            raise ApiError("ALREADY_EXISTS", f"KeyRing {name} already exists.")
        ring = fake.rings[name] = KeyRing(name)
        return ring.json()


def h_keyring_get(fake, ctx):
    with fake.lock:
        return fake.ring(ctx.ring_name()).json()


def h_keyring_list(fake, ctx):
    terms = parse_filter(ctx.q("filter", ""))
    prefix = ctx.location() + "/keyRings/"
    with fake.lock:
        rings = [r for n, r in fake.rings.items() if n.startswith(prefix)]
        rings = [r for r in rings if filter_matches(terms, {"name": r.name}, {}, "KeyRing")]
        rings = order(ctx, rings, {"name": lambda r: r.name, "createTime": lambda r: r.create_time})
        return page(ctx, [r.json() for r in rings], "keyRings")


def _template(body_tpl, field: str):
    if body_tpl is None:
        return None, None
    if not isinstance(body_tpl, dict):
        raise invalid(f"Invalid value at '{field}'")
    check_known(body_tpl, {"algorithm", "protectionLevel"}, field)
    alg = parse_enum(body_tpl["algorithm"], ALGORITHM, f"{field}.algorithm") if "algorithm" in body_tpl else None
    prot = parse_enum(body_tpl["protectionLevel"], PROTECTION, f"{field}.protection_level") if "protectionLevel" in body_tpl else None
    return alg, prot


def check_algorithm(purpose: str, algorithm: str):
    if purpose == "ASYMMETRIC_SIGN":
        if algorithm in (None, "CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED"):
            raise invalid("crypto_key.version_template.algorithm must be specified for purpose ASYMMETRIC_SIGN")
        if algorithm not in ALL_SIGN_ALGORITHMS:
            raise invalid(f"crypto_key.version_template.algorithm {algorithm} is not compatible with crypto_key.purpose ASYMMETRIC_SIGN")
        if algorithm not in SIGN_ALGORITHMS:
            raise invalid(f"crypto_key.version_template.algorithm {algorithm} is not supported by this fake")
    elif purpose == "ENCRYPT_DECRYPT":
        if algorithm not in SYMMETRIC_ALGORITHMS:
            raise invalid(f"crypto_key.version_template.algorithm {algorithm} is not compatible with crypto_key.purpose ENCRYPT_DECRYPT")


CRYPTO_KEY_FIELDS = {
    "name", "primary", "purpose", "createTime", "nextRotationTime", "rotationPeriod",
    "versionTemplate", "labels", "importOnly", "destroyScheduledDuration", "cryptoKeyBackend",
    "keyAccessJustificationsPolicy",
}


def h_key_create(fake: Fake, ctx: Ctx):
    key_id = ctx.q_any("cryptoKeyId", "crypto_key_id", default="")
    if not ID_RE.match(key_id):
        raise invalid(f"crypto_key_id {key_id!r} must match [a-zA-Z0-9_-]{{1,63}}")
    skip = parse_bool(ctx.q_any("skipInitialVersionCreation", "skip_initial_version_creation", default="false"),
                      "skip_initial_version_creation")
    body = ctx.body
    check_known(body, CRYPTO_KEY_FIELDS, "crypto_key")
    purpose = parse_enum(body.get("purpose", 0), PURPOSE, "crypto_key.purpose")
    if purpose == "CRYPTO_KEY_PURPOSE_UNSPECIFIED":
        raise invalid("crypto_key.purpose must be specified")
    if purpose not in ("ASYMMETRIC_SIGN", "ENCRYPT_DECRYPT"):
        raise ApiError("UNIMPLEMENTED", f"crypto_key.purpose {purpose} is not supported by this fake")
    alg, prot = _template(body.get("versionTemplate"), "crypto_key.version_template")
    if purpose == "ENCRYPT_DECRYPT" and alg in (None, "CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED"):
        alg = "GOOGLE_SYMMETRIC_ENCRYPTION"
    check_algorithm(purpose, alg)
    prot = prot or "SOFTWARE"
    if prot == "PROTECTION_LEVEL_UNSPECIFIED":
        prot = "SOFTWARE"
    if prot not in ("SOFTWARE", "HSM"):
        raise invalid(f"crypto_key.version_template.protection_level {prot} is not supported")
    if purpose != "ENCRYPT_DECRYPT" and ("rotationPeriod" in body or "nextRotationTime" in body):
        raise invalid("crypto_key.rotation_period and crypto_key.next_rotation_time can only be set for purpose ENCRYPT_DECRYPT")
    labels = validate_labels(body.get("labels"), "crypto_key.labels")
    duration = 30 * 86400.0
    if "destroyScheduledDuration" in body:
        duration = parse_duration(body["destroyScheduledDuration"], "crypto_key.destroy_scheduled_duration")
        if duration <= 0 or duration > MAX_DESTROY_SCHEDULED:
            raise invalid("crypto_key.destroy_scheduled_duration must be positive and at most 120 days")
    if parse_bool(body.get("importOnly", False), "crypto_key.import_only") and not skip:
        raise invalid("skip_initial_version_creation must be true when crypto_key.import_only is true")
    with fake.lock:
        ring = fake.ring(ctx.ring_name())
        if key_id in ring.keys:
            raise ApiError("ALREADY_EXISTS", f"CryptoKey {ring.name}/cryptoKeys/{key_id} already exists.")
        key = CryptoKey(f"{ring.name}/cryptoKeys/{key_id}", purpose, alg, prot, labels, duration)
        ring.keys[key_id] = key
        if not skip:
            fake.new_version(key)
        return key.json()


def h_key_get(fake, ctx):
    with fake.lock:
        return fake.key(ctx.ring_name(), ctx.segs[7]).json()


def key_filter_fields(key: CryptoKey) -> dict:
    return {
        "name": key.name,
        "purpose": key.purpose,
        "versionTemplate.algorithm": key.algorithm,
        "version_template.algorithm": key.algorithm,
        "versionTemplate.protectionLevel": key.protection,
        "version_template.protection_level": key.protection,
        "primary.state": key.versions[key.primary].state if key.primary in key.versions else None,
    }


def h_key_list(fake, ctx):
    terms = parse_filter(ctx.q("filter", ""))
    with fake.lock:
        ring = fake.ring(ctx.ring_name())
        keys = [k for k in ring.keys.values() if filter_matches(terms, key_filter_fields(k), k.labels, "CryptoKey")]
        keys = order(ctx, keys, {"name": lambda k: k.name, "createTime": lambda k: k.create_time,
                                 "create_time": lambda k: k.create_time})
        return page(ctx, [k.json() for k in keys], "cryptoKeys")


def update_mask(ctx: Ctx) -> list:
    raw = ctx.q_any("updateMask", "update_mask", default="")
    if isinstance(ctx.body, dict) and not raw and isinstance(ctx.body.get("updateMask"), str):
        raw = ctx.body["updateMask"]
    paths = [p.strip() for p in raw.split(",") if p.strip()]
    if not paths:
        raise invalid("update_mask must be set")
    return paths


def h_key_patch(fake, ctx):
    paths = update_mask(ctx)
    body = ctx.body
    check_known(body, CRYPTO_KEY_FIELDS, "crypto_key")
    for p in paths:
        if p not in ("labels", "versionTemplate.algorithm", "version_template.algorithm"):
            raise invalid(f"update_mask path {p!r} is not supported; supported paths: labels, version_template.algorithm")
    with fake.lock:
        key = fake.key(ctx.ring_name(), ctx.segs[7])
        if "name" in body and body["name"] != key.name:
            raise invalid(f"crypto_key.name {body['name']!r} does not match the resource in the URL")
        new_labels = key.labels
        new_alg = key.algorithm
        if "labels" in paths:
            new_labels = validate_labels(body.get("labels"), "crypto_key.labels")
        if "versionTemplate.algorithm" in paths or "version_template.algorithm" in paths:
            alg, _ = _template(body.get("versionTemplate"), "crypto_key.version_template")
            if alg is None:
                raise invalid("crypto_key.version_template.algorithm must be set when it is in update_mask")
            check_algorithm(key.purpose, alg)
            new_alg = alg
        key.labels, key.algorithm = new_labels, new_alg
        return key.json()


def h_version_create(fake, ctx):
    check_known(ctx.body, {"name", "state", "protectionLevel", "algorithm", "attestation", "createTime",
                           "generateTime", "destroyTime", "destroyEventTime", "importJob", "importTime",
                           "importFailureReason", "generationFailureReason", "externalDestructionFailureReason",
                           "externalProtectionLevelOptions", "reimportEligible"}, "crypto_key_version")
    with fake.lock:
        key = fake.key(ctx.ring_name(), ctx.segs[7])
        if key.purpose == "ASYMMETRIC_SIGN" and key.algorithm not in SIGN_ALGORITHMS:  # pragma: no cover
            raise precondition(f"{key.name} has an unsupported algorithm")
        return fake.new_version(key).json()


def h_version_get(fake, ctx):
    with fake.lock:
        return fake.version(ctx.ring_name(), ctx.segs[7], ctx.segs[9]).json()


def h_version_list(fake, ctx):
    terms = parse_filter(ctx.q("filter", ""))
    with fake.lock:
        key = fake.key(ctx.ring_name(), ctx.segs[7])
        vs = [v for _, v in sorted(key.versions.items())]
        for v in vs:
            v.refresh()
        vs = [v for v in vs if filter_matches(
            terms, {"name": v.name, "state": v.state, "algorithm": v.algorithm, "protectionLevel": v.protection,
                    "protection_level": v.protection}, {}, "CryptoKeyVersion")]
        vs = order(ctx, vs, {"name": lambda v: v.number, "createTime": lambda v: v.create_time,
                             "create_time": lambda v: v.create_time})
        return page(ctx, [v.json() for v in vs], "cryptoKeyVersions")


def h_version_patch(fake, ctx):
    paths = update_mask(ctx)
    for p in paths:
        if p != "state":
            raise invalid(f"update_mask path {p!r} is not supported; supported paths: state")
    if "state" not in ctx.body:
        raise invalid("crypto_key_version.state must be set when it is in update_mask")
    target = parse_enum(ctx.body["state"], STATE, "crypto_key_version.state")
    if target not in ("ENABLED", "DISABLED"):
        raise invalid(f"crypto_key_version.state can only be updated to ENABLED or DISABLED, not {target}")
    with fake.lock:
        v = fake.version(ctx.ring_name(), ctx.segs[7], ctx.segs[9])
        if v.state not in ("ENABLED", "DISABLED"):
            raise precondition(f"The request cannot be fulfilled. Resource {v.name} has value {v.state} in field crypto_key_version.state.")
        v.state = target
        return v.json()


def h_version_destroy(fake, ctx):
    with fake.lock:
        v = fake.version(ctx.ring_name(), ctx.segs[7], ctx.segs[9])
        if v.state not in ("ENABLED", "DISABLED", "PENDING_GENERATION", "IMPORT_FAILED", "GENERATION_FAILED"):
            raise precondition(f"The request cannot be fulfilled. Resource {v.name} has value {v.state} in field crypto_key_version.state.")
        v.state = "DESTROY_SCHEDULED"
        v.destroy_time = now() + v.key.destroy_duration
        if v.key.primary == v.number:
            v.key.primary = None
        return v.json()


def h_version_restore(fake, ctx):
    with fake.lock:
        v = fake.version(ctx.ring_name(), ctx.segs[7], ctx.segs[9])
        if v.state != "DESTROY_SCHEDULED":
            raise precondition(f"The request cannot be fulfilled. Resource {v.name} has value {v.state} in field crypto_key_version.state.")
        v.state = "DISABLED"
        v.destroy_time = None
        return v.json()


def _usable(v: Version):
    if v.state != "ENABLED":
        raise precondition(f"The request cannot be fulfilled. Resource {v.name} has value {v.state} in field crypto_key_version.state.")


def _take_corruption(fake: Fake, method: str) -> bool:
    with fake.lock:
        n = fake.corrupt.get(method, 0)
        if n > 0:
            fake.corrupt[method] = n - 1
            return True
    return False


def h_public_key(fake, ctx):
    with fake.lock:
        v = fake.version(ctx.ring_name(), ctx.segs[7], ctx.segs[9])
        if v.key.purpose not in ("ASYMMETRIC_SIGN", "ASYMMETRIC_DECRYPT"):
            raise precondition(f"The request cannot be fulfilled. Resource {v.key.name} has value {v.key.purpose} in field crypto_key.purpose.")
        _usable(v)
        pem, name, alg, prot = v.pem, v.name, v.algorithm, v.protection
    crc = crc32c(pem.encode())
    if _take_corruption(fake, "cryptoKeyVersions.getPublicKey"):
        crc ^= 0x1
    return {"pem": pem, "algorithm": alg, "pemCrc32c": str(crc), "name": name, "protectionLevel": prot}


def h_sign(fake, ctx):
    body = ctx.body
    check_known(body, {"name", "digest", "digestCrc32c", "data", "dataCrc32c"}, "")
    with fake.lock:
        v = fake.version(ctx.ring_name(), ctx.segs[7], ctx.segs[9])
        if v.key.purpose != "ASYMMETRIC_SIGN":
            raise precondition(f"The request cannot be fulfilled. Resource {v.key.name} has value {v.key.purpose} in field crypto_key.purpose.")
        _usable(v)
        private_key, name, alg, prot = v.private_key, v.name, v.algorithm, v.protection
    hash_name = SIGN_ALGORITHMS[alg][2]
    verified_digest = verified_data = False
    digest_field = body.get("digest")
    if digest_field is not None and "data" in body:
        raise invalid("Only one of digest and data may be set.")
    if digest_field is not None:
        if not isinstance(digest_field, dict) or len(digest_field) != 1:
            raise invalid("digest must set exactly one of sha256, sha384, sha512")
        (kind, value), = digest_field.items()
        if kind not in HASH_LEN:
            raise invalid(f'Invalid JSON payload received. Unknown name "{kind}" at \'digest\': Cannot find field.')
        digest = parse_bytes(value, f"digest.{kind}")
        if kind != hash_name:
            raise invalid(f"The digest type in field digest ({kind.upper()}) does not match the digest type of algorithm {alg} ({hash_name.upper()}).")
        if len(digest) != HASH_LEN[kind]:
            raise invalid(f"Length of digest.{kind} must be {HASH_LEN[kind]} bytes, got {len(digest)}.")
        if body.get("digestCrc32c") is not None:
            if parse_int64(body["digestCrc32c"], "digest_crc32c") != crc32c(digest):
                raise invalid("The checksum in field digest_crc32c did not match the data in field digest.")
            verified_digest = True
    elif "data" in body:
        data = parse_bytes(body["data"], "data")
        if body.get("dataCrc32c") is not None:
            if parse_int64(body["dataCrc32c"], "data_crc32c") != crc32c(data):
                raise invalid("The checksum in field data_crc32c did not match the data in field data.")
            verified_data = True
        h = hashes.Hash(HASH_CLASSES[hash_name]())
        h.update(data)
        digest = h.finalize()
    else:
        raise invalid("One of digest or data must be set.")
    signature = sign_digest(private_key, alg, digest)
    crc = crc32c(signature)
    if _take_corruption(fake, "cryptoKeyVersions.asymmetricSign"):
        crc ^= 0x1
    return prune({
        "signature": b64(signature),
        "signatureCrc32c": str(crc),
        "verifiedDigestCrc32c": verified_digest,
        "name": name,
        "verifiedDataCrc32c": verified_data,
        "protectionLevel": prot,
    })


# -- IAM -------------------------------------------------------------------------------------

MEMBER_RE = re.compile(r"^(allUsers|allAuthenticatedUsers|(user|serviceAccount|group|domain|principal|principalSet|deleted:user|deleted:serviceAccount|deleted:group):.+)$")


def _policy_holder(fake: Fake, ctx: Ctx):
    if len(ctx.segs) == 6:
        return fake.ring(ctx.ring_name())
    return fake.key(ctx.ring_name(), ctx.segs[7])


def h_get_iam(fake, ctx):
    requested = ctx.q_any("options.requestedPolicyVersion", "options.requested_policy_version")
    if requested is None and isinstance(ctx.body, dict):
        requested = (ctx.body.get("options") or {}).get("requestedPolicyVersion")
    requested = int(requested) if requested not in (None, "") else 0
    if requested not in (0, 1, 3):
        raise invalid(f"options.requested_policy_version {requested} is invalid; valid values are 0, 1 and 3")
    with fake.lock:
        policy = _policy_holder(fake, ctx).policy
        if requested < 3 and any("condition" in b for b in policy.bindings):
            raise invalid("The policy has conditional role bindings; request policy version 3 to read it.")
        return policy.json()


def parse_policy(p, where: str = "policy"):
    """Validates a Policy object; returns (version, bindings)."""
    if not isinstance(p, dict):
        raise invalid(f"{where} must be set")
    check_known(p, {"version", "bindings", "auditConfigs", "etag"}, where)
    version = int(p.get("version") or 0)
    if version not in (0, 1, 3):
        raise invalid(f"{where}.version {version} is invalid; valid values are 0, 1 and 3")
    bindings = []
    for i, b in enumerate(p.get("bindings") or []):
        if not isinstance(b, dict):
            raise invalid(f"{where}.bindings[{i}] must be an object")
        check_known(b, {"role", "members", "condition"}, f"{where}.bindings[{i}]")
        role, members = b.get("role", ""), b.get("members") or []
        if not isinstance(role, str) or not role.startswith(("roles/", "projects/", "organizations/")):
            raise invalid(f"{where}.bindings[{i}].role {role!r} is not a valid role")
        if not members:
            raise invalid(f"{where}.bindings[{i}].members must not be empty")
        for m in members:
            if not isinstance(m, str) or not MEMBER_RE.match(m):
                raise invalid(f"Invalid member {m!r} in {where}.bindings[{i}].members")
        nb = {"role": role, "members": list(members)}
        if b.get("condition"):
            if version != 3:
                raise invalid("Policies with conditional role bindings must set policy.version to 3.")
            nb["condition"] = b["condition"]
        bindings.append(nb)
    return version, bindings


def h_set_iam(fake, ctx):
    body = ctx.body
    check_known(body, {"policy", "updateMask"}, "")
    p = body.get("policy")
    _, bindings = parse_policy(p)
    etag = parse_bytes(p["etag"], "policy.etag") if p.get("etag") else None
    with fake.lock:
        holder = _policy_holder(fake, ctx)
        for i, b in enumerate(bindings):
            fake.check_role(b["role"], holder.name, f"policy.bindings[{i}].role")
        policy = holder.policy
        if etag is not None and etag != policy.etag:
            raise ApiError("ABORTED", "There were concurrent policy changes. Please retry the whole read-modify-write with exponential backoff.")
        policy.set(bindings)
        return policy.json()


def h_test_iam(fake, ctx):
    perms = ctx.body.get("permissions") or []
    if not isinstance(perms, list) or not all(isinstance(x, str) for x in perms):
        raise invalid("permissions must be a list of strings")
    with fake.lock:
        holder = _policy_holder(fake, ctx)
        if fake.require_auth:
            # What the caller holds on the resource, from the policies on it and its ancestors.
            held = fake.permissions_of(ctx.caller, holder.name)
            perms = [x for x in perms if x in held]
    return {"permissions": list(perms)} if perms else {}


def h_import_job_create(fake, ctx):
    job_id = ctx.q_any("importJobId", "import_job_id", default="")
    if not ID_RE.match(job_id):
        raise invalid(f"import_job_id {job_id!r} must match [a-zA-Z0-9_-]{{1,63}}")
    body = ctx.body
    check_known(body, {"name", "importMethod", "protectionLevel", "createTime", "generateTime", "expireTime",
                       "expireEventTime", "state", "publicKey", "attestation", "cryptoKeyBackend"}, "import_job")
    method = parse_enum(body.get("importMethod", 0), IMPORT_METHOD, "import_job.import_method")
    if method == "IMPORT_METHOD_UNSPECIFIED":
        raise invalid("import_job.import_method must be specified")
    prot = parse_enum(body.get("protectionLevel", 0), PROTECTION, "import_job.protection_level")
    if prot == "PROTECTION_LEVEL_UNSPECIFIED":
        raise invalid("import_job.protection_level must be specified")
    if prot not in ("SOFTWARE", "HSM"):
        raise invalid(f"import_job.protection_level {prot} is not supported")
    with fake.lock:
        ring = fake.ring(ctx.ring_name())
        if job_id in ring.import_jobs:
            raise ApiError("ALREADY_EXISTS", f"ImportJob {ring.name}/importJobs/{job_id} already exists.")
        job = ring.import_jobs[job_id] = ImportJob(f"{ring.name}/importJobs/{job_id}", method, prot)
        fake.start_import_job(job)
        return job.json()


def _import_job(fake, ring_name: str, job_id: str) -> ImportJob:
    job = fake.ring(ring_name).import_jobs.get(job_id)
    if job is None:
        raise not_found(f"ImportJob {ring_name}/importJobs/{job_id} not found.")
    return job


def h_import_job_get(fake, ctx):
    with fake.lock:
        return _import_job(fake, ctx.ring_name(), ctx.segs[7]).json()


def h_import_job_list(fake, ctx):
    terms = parse_filter(ctx.q("filter", ""))
    with fake.lock:
        ring = fake.ring(ctx.ring_name())
        jobs = [j for _, j in sorted(ring.import_jobs.items())]
        for j in jobs:
            j.refresh()
        jobs = [j for j in jobs if filter_matches(
            terms, {"name": j.name, "state": j.state, "importMethod": j.method, "import_method": j.method,
                    "protectionLevel": j.protection, "protection_level": j.protection}, {}, "ImportJob")]
        jobs = order(ctx, jobs, {"name": lambda j: j.name, "createTime": lambda j: j.create_time,
                                 "create_time": lambda j: j.create_time})
        return page(ctx, [j.json() for j in jobs], "importJobs")


def unwrap_import(job: ImportJob, wrapped: bytes) -> bytes:
    """Undoes the client's wrapping with the job's private key: RSA-OAEP of an AES-256 key
    followed by the key material under AES key wrap with padding (RFC 5649), or RSA-OAEP of
    the material itself for the methods without AES."""
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding
    bits, hash_name, with_aes = IMPORT_METHODS[job.method]
    h = HASH_CLASSES[hash_name]()
    oaep = padding.OAEP(mgf=padding.MGF1(HASH_CLASSES[hash_name]()), algorithm=h, label=None)
    rsa_len = bits // 8
    try:
        if not with_aes:
            return job.private_key.decrypt(wrapped, oaep)
        if len(wrapped) <= rsa_len:
            raise ValueError("too short")
        aes_key = job.private_key.decrypt(wrapped[:rsa_len], oaep)
        if len(aes_key) != 32:
            raise ValueError("not an AES-256 key")
        return aes_key_unwrap_with_padding(aes_key, wrapped[rsa_len:])
    except (ValueError, InvalidUnwrap):
        raise invalid(f"The wrapped key material could not be unwrapped with {job.name} ({job.method}).")


def _imported_matches(private_key, algorithm: str) -> bool:
    kind, param, _, _ = SIGN_ALGORITHMS[algorithm]
    if kind == "ec":
        return isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(private_key.curve, param)
    return isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size == param


def h_version_import(fake, ctx):
    body = ctx.body
    check_known(body, {"cryptoKeyVersion", "algorithm", "importJob", "wrappedKey", "rsaAesWrappedKey"},
                "import_crypto_key_version")
    algorithm = parse_enum(body.get("algorithm", 0), ALGORITHM, "algorithm")
    if algorithm not in SIGN_ALGORITHMS:
        raise invalid(f"algorithm {algorithm} cannot be imported into this fake; supported: "
                      + ", ".join(sorted(SIGN_ALGORITHMS)))
    if body.get("cryptoKeyVersion"):
        raise ApiError("UNIMPLEMENTED", "re-importing into an existing crypto_key_version is not supported by this fake")
    job_name = body.get("importJob", "")
    wrapped_field = "wrappedKey" if "wrappedKey" in body else "rsaAesWrappedKey"
    wrapped = parse_bytes(body.get(wrapped_field, ""), wrapped_field)
    if not wrapped:
        raise invalid("wrapped_key must be set")
    with fake.lock:
        key = fake.key(ctx.ring_name(), ctx.segs[7])
        if key.purpose != "ASYMMETRIC_SIGN":
            raise precondition(f"{key.name} has purpose {key.purpose}; this fake imports ASYMMETRIC_SIGN keys only")
        prefix = f"{ctx.ring_name()}/importJobs/"
        if not job_name.startswith(prefix):
            raise invalid(f"import_job {job_name!r} must be an ImportJob of {ctx.ring_name()}")
        job = _import_job(fake, ctx.ring_name(), job_name[len(prefix):])
        job.refresh()
        if job.state != "ACTIVE":
            raise precondition(f"The request cannot be fulfilled. Resource {job.name} has value {job.state} in field import_job.state.")
        if job.protection != key.protection:
            raise precondition(f"{job.name} has protection level {job.protection}, {key.name} {key.protection}")
    material = unwrap_import(job, wrapped)
    try:
        private_key = serialization.load_der_private_key(material, password=None)
    except ValueError:
        raise invalid("The unwrapped key material is not a PKCS#8 private key.")
    if not _imported_matches(private_key, algorithm):
        raise invalid(f"The imported key material does not match algorithm {algorithm}.")
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with fake.lock:
        v = Version(key, key.next_version)
        key.next_version += 1
        key.versions[v.number] = v
        v.algorithm = algorithm
        v.private_key, v.pem = private_key, pem
        v.import_job = job.name
        v.import_time = now()
        v.state = "ENABLED"
        return v.json()


# ---------------------------------------------------------------------------------------------
# Routing


def route(http_method: str, segs: list, verb: str | None):
    """Returns (api method name, handler) or None."""
    n = len(segs)
    if n < 4 or segs[0] != "projects" or segs[2] != "locations" or not segs[1] or not segs[3]:
        return None
    for i in range(5, n, 2):
        if not segs[i]:
            return None
    if n in (7, 8) and segs[4] == "keyRings" and segs[6] == "importJobs":
        if verb is None and n == 7 and http_method == "POST":
            return ("importJobs.create", h_import_job_create)
        if verb is None and n == 7 and http_method == "GET":
            return ("importJobs.list", h_import_job_list)
        if verb is None and n == 8 and http_method == "GET":
            return ("importJobs.get", h_import_job_get)
        return None
    names = ["projects", "locations", "keyRings", "cryptoKeys", "cryptoKeyVersions", "publicKey"]
    for i in range(0, n, 2):
        if segs[i] != names[i // 2]:
            return None
    if n > 11 or (n == 11 and verb is not None):
        return None
    m = http_method
    if verb is None:
        table = {
            (5, "POST"): ("keyRings.create", h_keyring_create),
            (5, "GET"): ("keyRings.list", h_keyring_list),
            (6, "GET"): ("keyRings.get", h_keyring_get),
            (7, "POST"): ("cryptoKeys.create", h_key_create),
            (7, "GET"): ("cryptoKeys.list", h_key_list),
            (8, "GET"): ("cryptoKeys.get", h_key_get),
            (8, "PATCH"): ("cryptoKeys.patch", h_key_patch),
            (9, "POST"): ("cryptoKeyVersions.create", h_version_create),
            (9, "GET"): ("cryptoKeyVersions.list", h_version_list),
            (10, "GET"): ("cryptoKeyVersions.get", h_version_get),
            (10, "PATCH"): ("cryptoKeyVersions.patch", h_version_patch),
        }
        if n == 11 and segs[10] == "publicKey" and m == "GET":
            return ("cryptoKeyVersions.getPublicKey", h_public_key)
        return table.get((n, m))
    if n == 9 and m == "POST" and verb == "import":
        return ("cryptoKeyVersions.import", h_version_import)
    if n == 10 and m == "POST":
        return {
            "destroy": ("cryptoKeyVersions.destroy", h_version_destroy),
            "restore": ("cryptoKeyVersions.restore", h_version_restore),
            "asymmetricSign": ("cryptoKeyVersions.asymmetricSign", h_sign),
        }.get(verb)
    if n in (6, 8):
        prefix = "keyRings" if n == 6 else "cryptoKeys"
        if verb == "getIamPolicy" and m in ("GET", "POST"):
            return (f"{prefix}.getIamPolicy", h_get_iam)
        if verb == "setIamPolicy" and m == "POST":
            return (f"{prefix}.setIamPolicy", h_set_iam)
        if verb == "testIamPermissions" and m == "POST":
            return (f"{prefix}.testIamPermissions", h_test_iam)
    return None


FAULT_ERRORS = {
    "resource_exhausted": ("RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Cryptographic requests' (injected by the fake)."),
    "unavailable": ("UNAVAILABLE", "The service is currently unavailable (injected by the fake)."),
    "internal": ("INTERNAL", "Internal error encountered (injected by the fake)."),
    "deadline_exceeded": ("DEADLINE_EXCEEDED", "Deadline exceeded (injected by the fake)."),
    "aborted": ("ABORTED", "The operation was aborted (injected by the fake)."),
    "permission_denied": ("PERMISSION_DENIED", "Permission denied (injected by the fake)."),
}
CORRUPTIBLE = {
    "asymmetricSign": "cryptoKeyVersions.asymmetricSign",
    "cryptoKeyVersions.asymmetricSign": "cryptoKeyVersions.asymmetricSign",
    "getPublicKey": "cryptoKeyVersions.getPublicKey",
    "cryptoKeyVersions.getPublicKey": "cryptoKeyVersions.getPublicKey",
}


def iam_resource(api_method: str, segs: list) -> str:
    """The resource a method's permission is checked on (and named in a denial): the parent for
    create and list, the named resource otherwise; asymmetricSign names the CryptoKey, as Cloud
    KMS does (IAM policies live on CryptoKeys, not on versions)."""
    if api_method == "cryptoKeyVersions.asymmetricSign":
        return "/".join(segs[:8])
    n = len(segs)
    return "/".join(segs[:n - n % 2])


def permission_denied(permission: str, resource: str) -> ApiError:
    return ApiError("PERMISSION_DENIED", f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).")


UNAUTHENTICATED_MISSING = ("Request is missing required authentication credential. Expected OAuth 2 access token, "
                           "login cookie or other valid authentication credential.")
UNAUTHENTICATED_INVALID = ("Request had invalid authentication credentials. Expected OAuth 2 access token, "
                           "login cookie or other valid authentication credential.")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gcp-kms-fake"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and
    # the client's delayed ACK add ~40 ms to every response.
    disable_nagle_algorithm = True
    fake: Fake = None  # set in main
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    # -- plumbing -------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload, headers=None):
        data = payload if isinstance(payload, bytes) else json.dumps(payload, indent=None).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError, headers=None):
        self._send(HTTP_CODE[err.status], err.body(), headers)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str):
        try:
            raw = self._read_body()
        except Exception:
            self.close_connection = True
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        path = unquote(url.path)
        try:
            if path.startswith("/_fake/"):
                return self._control(method, path, query, raw)
            if path == "/token" and method == "POST":
                return self._token(raw)
            if path == "/tokeninfo":
                return self._tokeninfo(query, raw)
            if path.startswith("/v1/"):
                return self._api(method, path[4:], query, raw)
            raise not_found(f"The requested URL {url.path} was not found on this server.")
        except ApiError as e:
            self._error(e)
        except Exception as e:  # a bug in the fake: say so loudly
            import traceback
            traceback.print_exc()
            self._error(ApiError("INTERNAL", f"fake internal error: {e!r}"))

    # -- the API ---------------------------------------------------------------------------

    def _api(self, method, path, query, raw):
        fake = self.fake
        segs = path.split("/")
        verb = None
        if ":" in segs[-1]:
            segs[-1], verb = segs[-1].split(":", 1)
        found = route(method, segs, verb)
        if found is None:
            raise not_found(f"The requested URL /v1/{path} was not found on this server (method {method}).")
        api_method, handler = found

        caller = self._authenticate()
        with fake.lock:
            fake.calls[api_method] = fake.calls.get(api_method, 0) + 1
            per = fake.callers.setdefault(caller or "", {})
            per[api_method] = per.get(api_method, 0) + 1
            queue = fake.faults.get(api_method)
            fault = queue.pop(0) if queue else None
            latency = fake.latency
        if latency > 0:
            time.sleep(latency)
        if fault is not None:
            kind = fault["kind"]
            if kind == "drop":
                self.close_connection = True
                return
            if kind == "slow":
                time.sleep(fault["seconds"])
            else:
                status, message = FAULT_ERRORS[kind]
                raise ApiError(status, message)

        ints = "enum-encoding=int" in ";".join(query.get("$alt", []) + query.get("alt", []))
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise invalid(f"Invalid JSON payload received. {e}")
            if not isinstance(body, dict):
                raise invalid("Invalid JSON payload received. Expected an object.")
        else:
            body = {}
        permission = METHOD_PERMISSIONS[api_method]
        if fake.require_auth and permission is not None:
            resource = iam_resource(api_method, segs)
            with fake.lock:
                allowed = permission in fake.permissions_of(caller, resource)
            if not allowed:
                raise permission_denied(permission, resource)
        result = handler(fake, Ctx(method, segs, verb, query, body, caller))
        self._send(200, encode_enums(result, ints))

    def _authenticate(self):
        """Returns the caller's service account email, or None (anonymous).

        Bearer credentials: an access token from POST /token, or a self-signed JWT (what
        Google's auth libraries send for service account keys), verified by fake.bearer_identity.
        With --require-auth a missing or invalid credential is UNAUTHENTICATED; without it,
        such calls are anonymous.
        """
        fake = self.fake
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            if fake.require_auth:
                raise ApiError("UNAUTHENTICATED", UNAUTHENTICATED_MISSING)
            return None
        host = self.headers.get("Host") or ""
        try:
            with fake.lock:
                email, scopes = fake.bearer_identity(token, SERVICE_AUDIENCES | {f"http://{host}/", f"http://{host}"})
        except AuthError as e:
            self._log_token(token, f"refused: {e}", always=fake.require_auth)
            if fake.require_auth:
                raise ApiError("UNAUTHENTICATED", UNAUTHENTICATED_INVALID)
            return None
        self._log_token(token, f"accepted as {email}")
        if scopes is not None and not scopes & KMS_SCOPES:
            if fake.require_auth:
                raise ApiError("PERMISSION_DENIED", "Request had insufficient authentication scopes.")
            return None
        return email

    _logged_tokens: set = set()

    def _log_token(self, token: str, outcome: str, always: bool = False):
        """Logs the shape of a bearer credential once (header and claims, never the signature):
        with --verbose, or always when it is refused under --require-auth."""
        if not (self.verbose or always) or token in Handler._logged_tokens:
            return
        Handler._logged_tokens.add(token)
        try:
            header, claims, _, _ = parse_jwt(token)
            shape = f"JWT header={json.dumps(header, sort_keys=True)} claims={json.dumps(claims, sort_keys=True)}"
        except AuthError:
            shape = "opaque token " + (token[:10] + "..." if token.startswith("ya29.") else f"({len(token)} chars)")
        sys.stderr.write(f"auth: {shape}: {outcome}\n")

    # -- OAuth2 ----------------------------------------------------------------------------

    def _token(self, raw):
        """OAuth2 token endpoint, JWT-bearer grant (RFC 7523): a JWT signed by a registered
        service account key, `aud` this endpoint or Google's token URI, `scope` non-empty."""
        form = parse_qs(raw.decode(errors="replace"))
        grant = (form.get("grant_type") or [""])[0]
        assertion = (form.get("assertion") or [""])[0]
        if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._send(400, {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant}"})
        fake = self.fake
        try:
            with fake.lock:
                _, claims = fake.verify_jwt(assertion)
        except AuthError as e:
            self._log_token(assertion, f"refused at /token: {e}", always=True)
            return self._send(400, {"error": "invalid_grant", "error_description": str(e)})
        audiences = GOOGLE_TOKEN_AUDIENCES | {f"http://{self.headers.get('Host') or ''}/token"}
        if claims.get("aud") not in audiences:
            return self._send(400, {"error": "invalid_grant",
                                    "error_description": f"Invalid JWT: aud {claims.get('aud')!r} is not the token endpoint."})
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.split():
            return self._send(400, {"error": "invalid_scope", "error_description": "Empty or missing scope not allowed."})
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with fake.lock:
            fake.tokens[token] = (claims["iss"], now() + ACCESS_TOKEN_LIFETIME, frozenset(scope.split()))
        self._send(200, {"access_token": token, "expires_in": ACCESS_TOKEN_LIFETIME - 1, "token_type": "Bearer"})

    def _tokeninfo(self, query, raw):
        token = (query.get("access_token") or [""])[0]
        if not token and raw:
            token = (parse_qs(raw.decode(errors="replace")).get("access_token") or [""])[0]
        with self.fake.lock:
            entry = self.fake.tokens.get(token)
        if entry is None or entry[1] <= now():
            return self._send(400, {"error": "invalid_token", "error_description": "Invalid Value"})
        self._send(200, {"email": entry[0], "expires_in": int(entry[1] - now()), "email_verified": "true",
                         "access_type": "online", "scope": " ".join(sorted(entry[2]))})

    # -- test controls ---------------------------------------------------------------------

    def _control(self, method, path, query, raw):
        fake = self.fake
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise invalid(f"bad control body: {e}")
        name = path[len("/_fake/"):].rstrip("/")
        if name == "health":
            return self._send(200, {"ok": True})
        if name == "faults" and method == "POST":
            faults = []
            slow = float(body.get("slow_seconds", 10))
            for f in body.get("faults") or []:
                kind, _, arg = f.partition(":")
                if kind not in FAULT_ERRORS and kind not in ("drop", "slow"):
                    raise invalid(f"unknown fault {f!r}")
                faults.append({"kind": kind, "seconds": float(arg) if arg else slow})
            with fake.lock:
                if body.get("append"):
                    fake.faults.setdefault(body["method"], []).extend(faults)
                else:
                    fake.faults[body["method"]] = faults
            return self._send(200, {})
        if name == "latency" and method == "POST":
            with fake.lock:
                fake.latency = float(body.get("seconds", 0))
            return self._send(200, {})
        if name == "generation_delay" and method == "POST":
            with fake.lock:
                fake.generation_delay = float(body.get("seconds", 0))
            return self._send(200, {})
        if name == "calls" and method == "GET":
            with fake.lock:
                return self._send(200, dict(fake.calls))
        if name == "calls/reset" and method == "POST":
            with fake.lock:
                fake.calls.clear()
                fake.callers.clear()
            return self._send(200, {})
        if name == "callers" and method == "GET":
            with fake.lock:
                return self._send(200, {k: dict(v) for k, v in fake.callers.items()})
        if name == "corrupt" and method == "POST":
            target = CORRUPTIBLE.get(body.get("method", ""))
            if target is None:
                raise invalid(f"cannot corrupt {body.get('method')!r}; use asymmetricSign or getPublicKey")
            with fake.lock:
                fake.corrupt[target] = int(body.get("count", 1))
            return self._send(200, {})
        if name == "seed" and method == "POST":
            ring_name = body["keyRing"]
            labels = validate_labels(body.get("labels") or {}, "labels")
            prefix = body.get("prefix") or "foreign-" + secrets.token_hex(4)
            count = int(body.get("count", 0))
            with fake.lock:
                ring = fake.rings.get(ring_name)
                if ring is None:
                    ring = fake.rings[ring_name] = KeyRing(ring_name)
                for i in range(count):
                    key_id = f"{prefix}-{i}"
                    if key_id not in ring.keys:
                        ring.keys[key_id] = CryptoKey(f"{ring_name}/cryptoKeys/{key_id}", "ASYMMETRIC_SIGN",
                                                      "EC_SIGN_P256_SHA256", "SOFTWARE", dict(labels), 30 * 86400.0)
            return self._send(200, {"count": count, "prefix": prefix})
        if name == "state" and method == "GET":
            ring_name = (query.get("keyRing") or [""])[0]
            with fake.lock:
                ring = fake.ring(ring_name)
                keys = []
                for k in ring.keys.values():
                    versions = []
                    for _, v in sorted(k.versions.items()):
                        v.refresh()
                        versions.append(prune({
                            "name": v.name, "state": v.state, "algorithm": v.algorithm,
                            "protectionLevel": v.protection, "createTime": fmt_time(v.create_time),
                            "generateTime": fmt_time(v.generate_time), "destroyTime": fmt_time(v.destroy_time),
                        }))
                    keys.append({
                        "name": k.name, "purpose": k.purpose, "labels": dict(k.labels),
                        "versionTemplate": {"algorithm": k.algorithm, "protectionLevel": k.protection},
                        "createTime": fmt_time(k.create_time),
                        "destroyScheduledDuration": fmt_duration(k.destroy_duration),
                        "iamPolicy": k.policy.json(), "versions": versions,
                    })
            return self._send(200, {"keyRing": ring_name, "cryptoKeys": keys})
        if name == "service_accounts" and method == "POST":
            email, key_id, public_key = load_service_account(body)
            with fake.lock:
                fake.add_service_account(email, key_id, public_key)
            return self._send(200, {"email": email, "keyId": key_id})
        if name == "service_accounts" and method == "GET":
            with fake.lock:
                return self._send(200, {e: sorted(keys) for e, keys in fake.service_accounts.items()})
        if name == "roles" and method == "POST":
            role, perms = body.get("name"), body.get("includedPermissions")
            if not isinstance(role, str) or not CUSTOM_ROLE_RE.match(role):
                raise invalid(f"custom role name {role!r} must be projects/P/roles/ID or organizations/O/roles/ID")
            if not isinstance(perms, list) or not all(isinstance(x, str) and PERMISSION_RE.match(x) for x in perms):
                raise invalid("includedPermissions must be a list of permissions (service.resource.verb)")
            with fake.lock:
                fake.custom_roles[role] = set(perms)
            return self._send(200, {"name": role, "includedPermissions": sorted(perms)})
        if name == "roles" and method == "GET":
            with fake.lock:
                return self._send(200, {r: sorted(p) for r, p in fake.custom_roles.items()})
        if name == "iam_policy" and method == "GET":
            resource = (query.get("resource") or [""])[0]
            with fake.lock:
                return self._send(200, self._control_policy(resource).json())
        if name == "iam_policy" and method == "POST":
            resource = body.get("resource") or ""
            _, bindings = parse_policy(body.get("policy"))
            with fake.lock:
                policy = self._control_policy(resource)
                for i, b in enumerate(bindings):
                    fake.check_role(b["role"], resource, f"policy.bindings[{i}].role")
                policy.set(bindings)
                return self._send(200, policy.json())
        if name == "grant" and method == "POST":
            resource, role = body.get("resource") or "", body.get("role")
            members = body.get("members") or ([body["member"]] if body.get("member") else [])
            if not isinstance(role, str) or not role:
                raise invalid("role must be set")
            if not members or not all(isinstance(m, str) and MEMBER_RE.match(m) for m in members):
                raise invalid(f"member(s) {members!r}: give member or members, e.g. serviceAccount:EMAIL")
            with fake.lock:
                policy = self._control_policy(resource)
                fake.check_role(role, resource, "role")
                bindings = [dict(b, members=list(b["members"])) for b in policy.bindings]
                target = next((b for b in bindings if b["role"] == role and "condition" not in b), None)
                if target is None:
                    bindings.append({"role": role, "members": list(dict.fromkeys(members))})
                else:
                    target["members"] += [m for m in members if m not in target["members"]]
                policy.set(bindings)
                return self._send(200, policy.json())
        raise not_found(f"unknown control endpoint {method} {path}")

    def _control_policy(self, resource: str) -> Policy:
        """The policy of projects/P (created on first use), a KeyRing or a CryptoKey."""
        segs = resource.split("/")
        if len(segs) == 2 and segs[0] == "projects" and segs[1]:
            return self.fake.project_policies.setdefault(segs[1], Policy())
        if len(segs) == 6 and segs[0] == "projects" and segs[2] == "locations" and segs[4] == "keyRings":
            return self.fake.ring(resource).policy
        if len(segs) == 8 and segs[0] == "projects" and segs[4] == "keyRings" and segs[6] == "cryptoKeys":
            return self.fake.key("/".join(segs[:6]), segs[7]).policy
        raise invalid(f"resource {resource!r} must be projects/P, a KeyRing or a CryptoKey name")


# What --state-file keeps: the resources, not tokens, faults or counters.
PERSISTED = ("rings", "project_policies", "custom_roles", "service_accounts")


def _load_private_key(der):
    return serialization.load_der_private_key(der, None)


def _load_public_key(der):
    return serialization.load_der_public_key(der)


def _reduce_private_key(key):
    # cryptography's key objects do not pickle; their DER encodings do.
    return _load_private_key, (key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()),)


def _reduce_public_key(key):
    return _load_public_key, (key.public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo),)


def persist(fake: "Fake", path: str):
    """Loads fake's resources from path if it exists, and saves them there on SIGTERM."""
    for key in (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(public_exponent=65537, key_size=1024)):
        copyreg.pickle(type(key), _reduce_private_key)
        copyreg.pickle(type(key.public_key()), _reduce_public_key)
    if os.path.exists(path):
        with open(path, "rb") as f:
            saved = pickle.load(f)
        for name in PERSISTED:
            setattr(fake, name, saved[name])
        print(f"gcp_kms_fake: loaded state from {path}", file=sys.stderr, flush=True)

    def save(_signum, _frame):
        with fake.lock:
            data = pickle.dumps({name: getattr(fake, name) for name in PERSISTED})
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        print(f"gcp_kms_fake: saved state to {path}", file=sys.stderr, flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, save)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--generation-delay", type=float, default=0.05)
    ap.add_argument("--require-auth", action="store_true",
                    help="verify every caller's credentials and enforce IAM (see the module docstring)")
    ap.add_argument("--service-account-key", action="append", default=[], metavar="FILE",
                    help="register a service account from its JSON key file (repeatable)")
    ap.add_argument("--verbose", action="store_true", help="log every request and credential shape to stderr")
    ap.add_argument("--state-file", metavar="PATH",
                    help="load the resources from PATH at start-up (if it exists) and save them there on SIGTERM")
    args = ap.parse_args(argv)
    fake = Fake(args.generation_delay, args.require_auth)
    if args.state_file:
        persist(fake, args.state_file)
    for path in args.service_account_key:
        with open(path) as f:
            email, key_id, public_key = load_service_account(json.load(f))
        fake.add_service_account(email, key_id, public_key)
    Handler.fake = fake
    Handler.verbose = args.verbose
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"gcp_kms_fake listening on http://{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
