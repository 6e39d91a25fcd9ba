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
- An OAuth2 token endpoint (`POST /token`, JWT bearer grant) and `GET /tokeninfo`.
- Test controls under /_fake/: health, faults, latency, calls, generation_delay, corrupt,
  seed, state, callers.

Usage: python gcp_kms_fake.py --host 127.0.0.1 --port N [--generation-delay S] [--require-auth]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import secrets
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
HASH_CLASSES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
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
        for k, v in obj.items():
            if k in ENUM_FIELDS and isinstance(v, str):
                out[k] = ENUM_FIELDS[k][v]
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


class KeyRing:
    def __init__(self, name):
        self.name = name
        self.create_time = now()
        self.keys: dict[str, CryptoKey] = {}
        self.policy = Policy()

    def json(self) -> dict:
        return {"name": self.name, "createTime": fmt_time(self.create_time)}


class Policy:
    EMPTY_ETAG = b"\x00\x20\x01"  # "ACAB", the etag Google returns for a never-set policy

    def __init__(self):
        self.bindings: list = []
        self.etag = self.EMPTY_ETAG

    def json(self) -> dict:
        out = {}
        if self.bindings:
            has_conditions = any("condition" in b for b in self.bindings)
            out["version"] = 3 if has_conditions else 1
            out["bindings"] = self.bindings
        out["etag"] = b64(self.etag)
        return out


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
        self.tokens: dict[str, tuple[str, float]] = {}

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
    def __init__(self, http_method, segs, verb, query, body):
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


def h_set_iam(fake, ctx):
    body = ctx.body
    check_known(body, {"policy", "updateMask"}, "")
    p = body.get("policy")
    if not isinstance(p, dict):
        raise invalid("policy must be set")
    check_known(p, {"version", "bindings", "auditConfigs", "etag"}, "policy")
    version = int(p.get("version") or 0)
    if version not in (0, 1, 3):
        raise invalid(f"policy.version {version} is invalid; valid values are 0, 1 and 3")
    bindings = []
    for i, b in enumerate(p.get("bindings") or []):
        if not isinstance(b, dict):
            raise invalid(f"policy.bindings[{i}] must be an object")
        check_known(b, {"role", "members", "condition"}, f"policy.bindings[{i}]")
        role, members = b.get("role", ""), b.get("members") or []
        if not isinstance(role, str) or not role.startswith(("roles/", "projects/", "organizations/")):
            raise invalid(f"policy.bindings[{i}].role {role!r} is not a valid role")
        if not members:
            raise invalid(f"policy.bindings[{i}].members must not be empty")
        for m in members:
            if not isinstance(m, str) or not MEMBER_RE.match(m):
                raise invalid(f"Invalid member {m!r} in policy.bindings[{i}].members")
        nb = {"role": role, "members": list(members)}
        if b.get("condition"):
            if version != 3:
                raise invalid("Policies with conditional role bindings must set policy.version to 3.")
            nb["condition"] = b["condition"]
        bindings.append(nb)
    etag = parse_bytes(p["etag"], "policy.etag") if p.get("etag") else None
    with fake.lock:
        policy = _policy_holder(fake, ctx).policy
        if etag is not None and etag != policy.etag:
            raise ApiError("ABORTED", "There were concurrent policy changes. Please retry the whole read-modify-write with exponential backoff.")
        policy.bindings = bindings
        policy.etag = b"\x42\x77" + secrets.token_bytes(6)
        return policy.json()


def h_test_iam(fake, ctx):
    perms = ctx.body.get("permissions") or []
    with fake.lock:
        _policy_holder(fake, ctx)
    return {"permissions": list(perms)} if perms else {}


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


def jwt_claims(token: str):
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        return claims if isinstance(claims, dict) else None
    except Exception:
        return None


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
        result = handler(fake, Ctx(method, segs, verb, query, body))
        self._send(200, encode_enums(result, ints))

    def _authenticate(self):
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        email = None
        if token:
            claims = jwt_claims(token)
            if claims is not None:
                email = claims.get("sub") or claims.get("iss")
            else:
                with self.fake.lock:
                    entry = self.fake.tokens.get(token)
                if entry is not None and entry[1] > now():
                    email = entry[0]
        if self.fake.require_auth and email is None:
            if not token:
                msg = ("Request is missing required authentication credential. Expected OAuth 2 access token, "
                       "login cookie or other valid authentication credential.")
            else:
                msg = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential."
            raise ApiError("UNAUTHENTICATED", msg)
        return email

    # -- OAuth2 ----------------------------------------------------------------------------

    def _token(self, raw):
        form = parse_qs(raw.decode(errors="replace"))
        grant = (form.get("grant_type") or [""])[0]
        assertion = (form.get("assertion") or [""])[0]
        if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._send(400, {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant}"})
        claims = jwt_claims(assertion)
        if claims is None or not claims.get("iss"):
            return self._send(400, {"error": "invalid_grant", "error_description": "Invalid JWT assertion."})
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and exp < now():
            return self._send(400, {"error": "invalid_grant", "error_description": "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe."})
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with self.fake.lock:
            self.fake.tokens[token] = (claims.get("sub") or claims["iss"], now() + 3600)
        self._send(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _tokeninfo(self, query, raw):
        token = (query.get("access_token") or [""])[0]
        if not token and raw:
            token = (parse_qs(raw.decode(errors="replace")).get("access_token") or [""])[0]
        with self.fake.lock:
            entry = self.fake.tokens.get(token)
        if entry is None or entry[1] <= now():
            return self._send(400, {"error": "invalid_token", "error_description": "Invalid Value"})
        self._send(200, {"email": entry[0], "expires_in": int(entry[1] - now()), "email_verified": "true",
                         "access_type": "online", "scope": "https://www.googleapis.com/auth/cloud-platform"})

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
        raise not_found(f"unknown control endpoint {method} {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--generation-delay", type=float, default=0.05)
    ap.add_argument("--require-auth", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)
    Handler.fake = Fake(args.generation_delay, args.require_auth)
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
