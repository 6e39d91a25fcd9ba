"""Drives tests/peers/azure_keyvault_fake.py with Microsoft's official Python SDK
(azure-keyvault-keys KeyClient/CryptographyClient, azure-identity credentials), with
`verify_challenge_resource` left at its default (on), so the fake's wire format and its
authentication protocol are checked against what real clients do. Every signature is verified
with `cryptography` against the public key the fake published, independently of the fake.

Run: $HOME/.cache/kms-keymanager/venv-azure-*/bin/python -m unittest -v tests/peers/test_azure_keyvault_fake.py
(the venv scripts/test-all.sh makes from tests/peers/requirements-azure.txt).
"""

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ResourceExistsError, ResourceNotFoundError,
                                   ServiceResponseError)
from azure.core.rest import HttpRequest
from azure.identity import ClientSecretCredential, ManagedIdentityCredential, WorkloadIdentityCredential
from azure.keyvault.keys import KeyClient, KeyCurveName, KeyOperation, KeyType
from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "azure_keyvault_fake.py")
TENANT = "fake-tenant"
IDENTITY_ENV = ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT", "MSI_ENDPOINT", "MSI_SECRET",
                "AZURE_POD_IDENTITY_AUTHORITY_HOST", "IMDS_ENDPOINT")

# azure-identity logs every failed token request as a warning; the tests fail some on purpose.
logging.getLogger("azure.identity").setLevel(logging.CRITICAL)

HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Fake:
    """A running fake on free ports, stopped by PID."""

    def __init__(self, *args, certdir=None):
        self.port, self.token_port = free_port(), free_port()
        self._tmp = None
        if certdir is None:
            self._tmp = tempfile.TemporaryDirectory()
            certdir = os.path.join(self._tmp.name, "tls")
        self.certdir = certdir
        self.ca = os.path.join(certdir, "ca.pem")
        self.vault = f"https://127.0.0.1:{self.port}"
        self.msi = f"http://127.0.0.1:{self.token_port}"
        self.proc = subprocess.Popen(
            [sys.executable, FAKE, "--host", "127.0.0.1", "--port", str(self.port), "--token-port",
             str(self.token_port), "--certdir", certdir, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(self.msi + "/_fake/health", timeout=1) as r:
                    if r.status == 200 and self.request("GET", "/_fake/health")[0] == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise RuntimeError("fake did not start: " + self.proc.stderr.read().decode())
            time.sleep(0.05)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
        if self._tmp:
            self._tmp.cleanup()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def request(self, method, path, body=None, headers=None, host=None):
        """Raw HTTPS: (status, headers, parsed JSON body or None)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ssl_context(), timeout=30)
        try:
            hdrs = dict(headers or {})
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
            if host:
                conn.putrequest(method, path, skip_host=True)
                conn.putheader("Host", host)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                if data is not None:
                    conn.putheader("Content-Length", str(len(data)))
                conn.endheaders(data)
            else:
                conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, resp.headers, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def control(self, method, path, body=None):
        status, _, out = self.request(method, path, body)
        if status != 200:
            raise AssertionError(f"{method} {path}: HTTP {status} {out}")
        return out

    def stats(self) -> dict:
        return self.control("GET", "/_fake/stats")

    def reset_stats(self):
        self.control("POST", "/_fake/stats/reset", {})

    def faults(self, *rules):
        self.control("POST", "/_fake/faults", list(rules))

    def clear_faults(self):
        self.control("DELETE", "/_fake/faults")

    def token(self, resource=None) -> str:
        """An App Service managed identity token, fetched with plain HTTP."""
        resource = resource or f"https://0.0.1:{self.port}"
        req = urllib.request.Request(f"{self.msi}/msi/token?api-version=2019-08-01&resource={resource}",
                                     headers={"X-IDENTITY-HEADER": "x"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())["access_token"]


@contextlib.contextmanager
def env(**values):
    """Sets these environment variables (and clears the other identity ones) for the block."""
    saved = {k: os.environ.get(k) for k in set(IDENTITY_ENV) | set(values)}
    for k in IDENTITY_ENV:
        os.environ.pop(k, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def app_service_env(fake: Fake, header="x"):
    """App Service managed identity pointing at the fake. MSAL reads these variables at every
    token request, not only when the credential is made, so they stay set while it is used."""
    return env(IDENTITY_ENDPOINT=fake.msi + "/msi/token", IDENTITY_HEADER=header)


def public_key(jwk):
    """The JWK's public key, rebuilt with cryptography from the raw fields."""
    if jwk.kty in ("EC", "EC-HSM"):
        curve = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}[crv_name(jwk)]
        return ec.EllipticCurvePublicNumbers(int.from_bytes(jwk.x, "big"), int.from_bytes(jwk.y, "big"), curve()).public_key()
    return rsa.RSAPublicNumbers(int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big")).public_key()


def crv_name(jwk) -> str:
    return getattr(jwk.crv, "value", jwk.crv)


def verify_independently(pub, alg: str, digest: bytes, signature: bytes) -> None:
    """Raises InvalidSignature unless signature is alg's signature of digest under pub."""
    hash_cls = HASHES[alg[2:5]]
    prehashed = utils.Prehashed(hash_cls())
    if alg.startswith("ES"):
        width = (pub.curve.key_size + 7) // 8
        if len(signature) != 2 * width:
            raise InvalidSignature(f"raw ECDSA signature of {len(signature)} bytes, want {2 * width}")
        der = utils.encode_dss_signature(int.from_bytes(signature[:width], "big"), int.from_bytes(signature[width:], "big"))
        pub.verify(der, digest, ec.ECDSA(prehashed))
    elif alg.startswith("RS"):
        pub.verify(signature, digest, padding.PKCS1v15(), prehashed)
    else:  # strict PSS: the salt is exactly the hash length
        pub.verify(signature, digest, padding.PSS(padding.MGF1(hash_cls()), hash_cls.digest_size), prehashed)


def error_code(e: HttpResponseError) -> tuple:
    body = json.loads(e.response.text())["error"]
    return e.status_code, body["code"], (body.get("innererror") or {}).get("code")


class FakeTestBase(unittest.TestCase):
    fake_args: tuple = ()

    @classmethod
    def setUpClass(cls):
        cls.fake = Fake(*cls.fake_args)
        cls.env = app_service_env(cls.fake)
        cls.env.__enter__()
        cls.cred = ManagedIdentityCredential()
        cls.client = KeyClient(cls.fake.vault, cls.cred, connection_verify=cls.fake.ca)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.env.__exit__(None, None, None)
        cls.fake.stop()

    def setUp(self):
        self.fake.clear_faults()
        self.fake.control("POST", "/_fake/rbac", {"deny": []})

    def crypto(self, key) -> CryptographyClient:
        return CryptographyClient(key, self.cred, connection_verify=self.fake.ca)

    def remote_verify(self, kid: str, alg: str, digest: bytes, signature: bytes) -> bool:
        """The fake's verify operation, called through the SDK's pipeline (authenticated)."""
        resp = self.client.send_request(HttpRequest(
            "POST", kid + "/verify?api-version=7.6",
            json={"alg": alg, "digest": b64u(digest), "value": b64u(signature)}))
        resp.raise_for_status()
        return resp.json()["value"]


class KeyTest(FakeTestBase):
    def test_challenge_and_health(self):
        status, headers, body = self.fake.request("GET", "/keys?api-version=7.6")
        self.assertEqual(status, 401)
        self.assertEqual(headers["WWW-Authenticate"],
                         f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://0.0.1:{self.fake.port}"')
        self.assertEqual(body["error"]["code"], "Unauthorized")
        with urllib.request.urlopen(self.fake.msi + "/_fake/health") as r:
            self.assertEqual(r.status, 200)
        # A token is only good for its resource.
        status, _, _ = self.fake.request("GET", "/keys", headers={"Authorization": "Bearer " + self.fake.token("https://storage.azure.com")})
        self.assertEqual(status, 401)
        status, _, _ = self.fake.request("GET", "/keys", headers={"Authorization": "Bearer " + self.fake.token()})
        self.assertEqual(status, 200)

    def test_challenge_resource_follows_host_header(self):
        # What a TLS proxy on another port forwards: the challenge and the ids name its port.
        status, headers, _ = self.fake.request("GET", "/keys", host="127.0.0.1:9999")
        self.assertEqual(status, 401)
        self.assertIn('resource="https://0.0.1:9999"', headers["WWW-Authenticate"])
        token = self.fake.token("https://0.0.1:9999")
        status, _, body = self.fake.request("POST", "/keys/via-proxy/create", {"kty": "EC"},
                                            headers={"Authorization": "Bearer " + token}, host="127.0.0.1:9999")
        self.assertEqual(status, 200, body)
        self.assertTrue(body["key"]["kid"].startswith("https://127.0.0.1:9999/keys/via-proxy/"))

    def test_create_every_key_type_with_tags(self):
        specs = [
            ("ec-p256", dict(key_type=KeyType.ec, curve=KeyCurveName.p_256), "EC", "P-256"),
            ("ec-p384", dict(key_type=KeyType.ec, curve=KeyCurveName.p_384), "EC", "P-384"),
            ("ec-p521", dict(key_type=KeyType.ec, curve=KeyCurveName.p_521), "EC", "P-521"),
            ("ec-hsm-p256", dict(key_type=KeyType.ec_hsm, curve=KeyCurveName.p_256), "EC-HSM", "P-256"),
            ("rsa-2048", dict(key_type=KeyType.rsa, size=2048), "RSA", 2048),
            ("rsa-3072", dict(key_type=KeyType.rsa, size=3072), "RSA", 3072),
            ("rsa-4096", dict(key_type=KeyType.rsa, size=4096), "RSA", 4096),
            ("rsa-hsm-2048", dict(key_type=KeyType.rsa_hsm, size=2048), "RSA-HSM", 2048),
        ]
        for name, kwargs, kty, detail in specs:
            with self.subTest(name=name):
                tags = {"spire-server-td": "example.org", "spire-server-id": name}
                created = self.client.create_key("types-" + name, tags=tags,
                                                 key_operations=[KeyOperation.sign, KeyOperation.verify], **kwargs)
                got = self.client.get_key("types-" + name)
                for key in (created, got):
                    self.assertEqual(key.key_type, kty)
                    self.assertEqual(key.properties.tags, tags)
                    self.assertEqual(sorted(key.key_operations), ["sign", "verify"])
                    self.assertTrue(key.properties.enabled)
                    self.assertEqual(key.properties.recovery_level, "Recoverable+Purgeable")
                    self.assertEqual(key.properties.recoverable_days, 90)
                    self.assertEqual(key.id, f"{self.fake.vault}/keys/types-{name}/{key.properties.version}")
                self.assertEqual(got.id, created.id)
                pub = public_key(got.key)
                if kty.startswith("EC"):
                    self.assertEqual(crv_name(got.key), detail)
                    self.assertEqual({"P-256": 256, "P-384": 384, "P-521": 521}[detail], pub.curve.key_size)
                else:
                    self.assertEqual(pub.key_size, detail)
                    self.assertEqual(pub.public_numbers().e, 65537)

    def test_default_key_ops_and_attributes(self):
        ec_key = self.client.create_ec_key("defaults-ec")
        rsa_key = self.client.create_rsa_key("defaults-rsa")
        self.assertEqual(sorted(ec_key.key_operations), ["sign", "verify"])
        self.assertEqual(len(public_key(rsa_key.key).public_numbers().n.to_bytes(256, "big")), 256)
        self.assertIn("wrapKey", rsa_key.key_operations)
        disabled = self.client.create_ec_key("defaults-disabled", enabled=False)
        self.assertFalse(disabled.properties.enabled)

    def test_name_rule(self):
        for bad in ("has_underscore", "x" * 128, "dot.ted"):
            with self.subTest(name=bad):
                with self.assertRaises(HttpResponseError) as cm:
                    self.client.create_ec_key(bad)
                self.assertEqual(error_code(cm.exception)[:2], (400, "BadParameter"))
        self.client.create_ec_key("A-valid-Name-123")
        # Names are case-insensitive.
        self.assertEqual(self.client.get_key("a-VALID-name-123").name, "A-valid-Name-123")

    def test_bad_create_parameters(self):
        for body in ({"kty": "oct"}, {"kty": "EC", "crv": "P-192"}, {"kty": "RSA", "key_size": 1024},
                     {"kty": "EC", "key_ops": ["fly"]}):
            with self.subTest(body=body):
                status, _, out = self.fake.request("POST", "/keys/bad-params/create?api-version=7.6", body,
                                                   headers={"Authorization": "Bearer " + self.fake.token()})
                self.assertEqual((status, out["error"]["code"]), (400, "BadParameter"), out)

    def test_versions_and_latest(self):
        first = self.client.create_ec_key("versioned", tags={"v": "1"})
        second = self.client.create_ec_key("versioned", tags={"v": "2"})
        self.assertNotEqual(first.properties.version, second.properties.version)
        versions = list(self.client.list_properties_of_key_versions("versioned"))
        self.assertEqual(sorted(v.version for v in versions), sorted([first.properties.version, second.properties.version]))
        for v in versions:
            self.assertEqual(v.id, f"{self.fake.vault}/keys/versioned/{v.version}")
        self.assertEqual(self.client.get_key("versioned").properties.version, second.properties.version)
        old = self.client.get_key("versioned", version=first.properties.version)
        self.assertEqual(old.properties.tags, {"v": "1"})
        self.assertEqual(public_key(old.key).public_numbers(), public_key(first.key).public_numbers())
        # GET /keys/{name}/ (empty version: how SPIRE's Go client asks for the latest).
        token = {"Authorization": "Bearer " + self.fake.token()}
        for path in ("/keys/versioned/", "/keys/versioned"):
            status, _, body = self.fake.request("GET", path + "?api-version=7.6", headers=token)
            self.assertEqual(status, 200)
            self.assertEqual(body["key"]["kid"], second.id)
        status, _, body = self.fake.request("GET", "/keys/versioned/" + "0" * 32, headers=token)
        self.assertEqual((status, body["error"]["code"]), (404, "KeyNotFound"))
        with self.assertRaises(ResourceNotFoundError):
            self.client.get_key("never-created")

    def test_list_pages(self):
        names = [f"paged-{i:02d}" for i in range(30)]
        for name in names:
            self.client.create_ec_key(name, tags={"page": "yes"})
        self.fake.reset_stats()
        listed = {p.name: p for p in self.client.list_properties_of_keys(max_page_size=7)}
        self.assertTrue(set(names) <= set(listed), set(names) - set(listed))
        self.assertGreaterEqual(self.fake.stats()["list"], 5)  # 30+ keys, 7 a page
        for name in names:
            item = listed[name]
            self.assertEqual(item.tags, {"page": "yes"})
            self.assertIsNone(item.version)  # list items carry no version
            self.assertTrue(item.enabled)
            self.assertIsNotNone(item.updated_on)
        # Raw: pages of at most 25 (the default) and an absolute https nextLink.
        token = {"Authorization": "Bearer " + self.fake.token()}
        status, _, body = self.fake.request("GET", "/keys?api-version=7.6", headers=token)
        self.assertEqual(status, 200)
        self.assertEqual(len(body["value"]), 25)
        self.assertNotIn("managed", body["value"][0])
        self.assertTrue(body["nextLink"].startswith(f"{self.fake.vault}/keys?"), body["nextLink"])
        self.assertIn("$skiptoken=", body["nextLink"])
        seen = [i["kid"] for i in body["value"]]
        while body["nextLink"]:
            status, _, body = self.fake.request("GET", body["nextLink"][len(self.fake.vault):], headers=token)
            self.assertEqual(status, 200)
            seen += [i["kid"] for i in body["value"]]
        self.assertEqual(len(seen), len(set(seen)))
        self.assertTrue({f"{self.fake.vault}/keys/{n}" for n in names} <= set(seen))
        for bad in ("0", "26", "x"):  # the REST reference allows 1..25
            status, _, body = self.fake.request("GET", "/keys?maxresults=" + bad, headers=token)
            self.assertEqual((status, body["error"]["code"]), (400, "BadParameter"))
        # Versions page too.
        for _ in range(3):
            self.client.create_ec_key("paged-versions")
        status, _, body = self.fake.request("GET", "/keys/paged-versions/versions?maxresults=2", headers=token)
        self.assertEqual((len(body["value"]), bool(body["nextLink"])), (2, True))
        self.assertEqual(len(list(self.client.list_properties_of_key_versions("paged-versions", max_page_size=1))), 3)

    def test_bulk_keys_are_listed_and_sign(self):
        created = int(time.time()) - 3600
        keys = [{"name": f"bulk-{i:03d}", "tags": {"spire-server-td": f"td-{i % 3}.example", "spire-server-id": f"s{i}"}}
                for i in range(300)]
        keys[0].update(kty="RSA", key_size=2048, created=created, updated=created + 60)
        out = self.fake.control("POST", "/_fake/bulk", {"keys": keys})
        self.assertEqual(out["created"], 300)
        self.fake.reset_stats()
        listed = {p.name: p for p in self.client.list_properties_of_keys() if p.name.startswith("bulk-")}
        self.assertEqual(len(listed), 300)
        self.assertEqual(listed["bulk-007"].tags, {"spire-server-td": "td-1.example", "spire-server-id": "s7"})
        self.assertEqual(int(listed["bulk-000"].created_on.timestamp()), created)
        self.assertEqual(int(listed["bulk-000"].updated_on.timestamp()), created + 60)
        self.assertEqual(self.fake.stats().get("create", 0), 0, "bulk keys are not counted as creates")
        rsa_key = self.client.get_key("bulk-000")
        self.assertEqual(rsa_key.key_type, "RSA")
        digest = hashlib.sha256(b"bulk").digest()
        result = self.crypto(rsa_key).sign(SignatureAlgorithm.rs256, digest)
        public = rsa.RSAPublicNumbers(int.from_bytes(rsa_key.key.e, "big"), int.from_bytes(rsa_key.key.n, "big")).public_key()
        public.verify(result.signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        status, _, body = self.fake.request("POST", "/_fake/bulk", {"keys": [{"name": "bad_name"}]})
        self.assertEqual((status, body["error"]["code"]), (400, "BadParameter"))

    def test_answers_are_not_held_by_nagle(self):
        # Headers and body are two writes: without TCP_NODELAY each answer on a kept-alive
        # connection waited for the client's delayed ACK (~40 ms), which swamped latency figures.
        self.client.create_ec_key("quick")
        self.client.get_key("quick")
        started = time.monotonic()
        for _ in range(20):
            self.client.get_key("quick")
        self.assertLess(time.monotonic() - started, 0.6)

    def test_update_bumps_updated_and_keeps_tags(self):
        tags = {"spire-server-td": "example.org", "spire-server-id": "upd"}
        key = self.client.create_ec_key("updated-key", tags=tags)
        time.sleep(1.1)
        props = self.client.update_key_properties("updated-key", key.properties.version,
                                                  key_operations=[KeyOperation.sign, KeyOperation.verify]).properties
        self.assertGreater(props.updated_on, key.properties.updated_on)  # SPIRE's liveness stamp
        self.assertEqual(props.created_on, key.properties.created_on)
        self.assertEqual(props.tags, tags)
        # An empty version updates the latest (PATCH /keys/{name}/ and /keys/{name}).
        time.sleep(1.1)
        props2 = self.client.update_key_properties("updated-key", tags={"new": "tags"}).properties
        self.assertGreater(props2.updated_on, props.updated_on)
        self.assertEqual(self.client.get_key("updated-key").properties.tags, {"new": "tags"})
        listed = {p.name: p for p in self.client.list_properties_of_keys()}["updated-key"]
        self.assertEqual(listed.updated_on, props2.updated_on)
        token = {"Authorization": "Bearer " + self.fake.token()}
        for path in ("/keys/updated-key/", "/keys/updated-key"):
            status, _, body = self.fake.request("PATCH", path, {"key_ops": ["sign", "verify"]}, headers=token)
            self.assertEqual(status, 200)
            self.assertEqual(body["tags"], {"new": "tags"})

    def test_sign_every_algorithm_verified_independently(self):
        keys = {
            "ES256": self.client.create_ec_key("sig-p256", curve=KeyCurveName.p_256),
            "ES384": self.client.create_ec_key("sig-p384", curve=KeyCurveName.p_384),
            "ES512": self.client.create_ec_key("sig-p521", curve=KeyCurveName.p_521),
        }
        rsa2048 = self.client.create_rsa_key("sig-rsa2048", size=2048)
        rsa3072 = self.client.create_rsa_key("sig-rsa3072", size=3072)
        cases = [(alg, key) for alg, key in keys.items()]
        cases += [(alg, rsa2048) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")]
        cases += [("PS256", rsa3072), ("RS512", rsa3072)]
        for alg, key in cases:
            with self.subTest(alg=alg, key=key.name):
                digest = hashlib.new("sha" + alg[2:5], f"message for {alg} {key.name}".encode()).digest()
                result = self.crypto(key).sign(SignatureAlgorithm(alg), digest)
                self.assertEqual(result.key_id, key.id)
                verify_independently(public_key(key.key), alg, digest, result.signature)
                with self.assertRaises(InvalidSignature):
                    verify_independently(public_key(key.key), alg, bytes(len(digest)), result.signature)
                # The fake's own verify operation agrees, and rejects a tampered signature.
                self.assertTrue(self.remote_verify(key.id, alg, digest, result.signature))
                tampered = bytes([result.signature[0] ^ 1]) + result.signature[1:]
                self.assertFalse(self.remote_verify(key.id, alg, digest, tampered))
        # Sign by name with an empty version: the latest.
        token = {"Authorization": "Bearer " + self.fake.token()}
        digest = hashlib.sha256(b"latest").digest()
        for path in ("/keys/sig-p256//sign", "/keys/sig-p256/sign"):
            status, _, body = self.fake.request("POST", path, {"alg": "ES256", "value": b64u(digest)}, headers=token)
            self.assertEqual(status, 200, body)
            self.assertEqual(body["kid"], keys["ES256"].id)
            sig = base64.urlsafe_b64decode(body["value"] + "=" * (-len(body["value"]) % 4))
            verify_independently(public_key(keys["ES256"].key), "ES256", digest, sig)

    def test_sign_rejects_bad_requests(self):
        ec_key = self.client.create_ec_key("reject-ec", curve=KeyCurveName.p_256)
        rsa_key = self.client.create_rsa_key("reject-rsa", size=2048)
        cases = [
            (ec_key, "ES256", 20),  # digest length
            (ec_key, "ES384", 48),  # curve
            (ec_key, "RS256", 32),  # family
            (rsa_key, "ES256", 32),
            (rsa_key, "PS512", 32),
        ]
        for key, alg, length in cases:
            with self.subTest(key=key.name, alg=alg, length=length):
                with self.assertRaises(HttpResponseError) as cm:
                    self.crypto(key).sign(SignatureAlgorithm(alg), bytes(length))
                self.assertEqual(error_code(cm.exception)[:2], (400, "BadParameter"))
        token = {"Authorization": "Bearer " + self.fake.token()}
        status, _, body = self.fake.request("POST", "/keys/no-such-key/sign", {"alg": "ES256", "value": b64u(bytes(32))}, headers=token)
        self.assertEqual((status, body["error"]["code"]), (404, "KeyNotFound"))
        verify_only = self.client.create_ec_key("reject-verify-only", key_operations=[KeyOperation.verify])
        with self.assertRaises(HttpResponseError) as cm:
            self.crypto(verify_only).sign(SignatureAlgorithm.es256, bytes(32))
        self.assertEqual(cm.exception.status_code, 403)

    def test_disabled_key_refuses_to_sign(self):
        key = self.client.create_ec_key("disabled-key")
        self.client.update_key_properties("disabled-key", enabled=False)
        got = self.client.get_key("disabled-key")  # a disabled key can still be read
        self.assertFalse(got.properties.enabled)
        digest = hashlib.sha256(b"x").digest()
        with self.assertRaises(HttpResponseError) as cm:
            self.crypto(key).sign(SignatureAlgorithm.es256, digest)
        self.assertEqual(error_code(cm.exception), (403, "Forbidden", "KeyDisabled"))
        self.client.update_key_properties("disabled-key", enabled=True)
        result = self.crypto(key).sign(SignatureAlgorithm.es256, digest)
        verify_independently(public_key(key.key), "ES256", digest, result.signature)

    def test_soft_delete_conflict_recover_purge(self):
        key = self.client.create_ec_key("soft-deleted", tags={"t": "1"})
        deleted = self.client.begin_delete_key("soft-deleted").result()
        self.assertEqual(deleted.recovery_id, f"{self.fake.vault}/deletedkeys/soft-deleted")
        self.assertIsNotNone(deleted.deleted_date)
        self.assertEqual((deleted.scheduled_purge_date - deleted.deleted_date).days, 90)
        self.assertEqual(deleted.properties.tags, {"t": "1"})
        with self.assertRaises(ResourceNotFoundError):
            self.client.get_key("soft-deleted")
        self.assertNotIn("soft-deleted", [p.name for p in self.client.list_properties_of_keys()])
        with self.assertRaises(ResourceExistsError) as cm:
            self.client.create_ec_key("soft-deleted")
        self.assertEqual(error_code(cm.exception), (409, "Conflict", "ObjectIsDeletedButRecoverable"))
        self.assertEqual(self.client.get_deleted_key("soft-deleted").id, key.id)
        self.assertIn("soft-deleted", [d.name for d in self.client.list_deleted_keys()])
        recovered = self.client.begin_recover_deleted_key("soft-deleted").result()
        self.assertEqual(recovered.id, key.id)
        self.assertEqual(self.client.get_key("soft-deleted").id, key.id)
        self.client.begin_delete_key("soft-deleted").result()
        self.client.purge_deleted_key("soft-deleted")
        with self.assertRaises(ResourceNotFoundError):
            self.client.get_deleted_key("soft-deleted")
        fresh = self.client.create_ec_key("soft-deleted")
        self.assertNotEqual(fresh.id, key.id)
        self.assertEqual(len(list(self.client.list_properties_of_key_versions("soft-deleted"))), 1)

    def test_rbac_deny(self):
        key = self.client.create_ec_key("rbac-key")
        self.fake.control("POST", "/_fake/rbac", {"deny": ["sign", "list"]})
        with self.assertRaises(HttpResponseError) as cm:
            self.crypto(key).sign(SignatureAlgorithm.es256, bytes(32))
        self.assertEqual(error_code(cm.exception), (403, "Forbidden", "ForbiddenByRbac"))
        with self.assertRaises(HttpResponseError):
            list(self.client.list_properties_of_keys())
        self.client.get_key("rbac-key")  # not denied
        self.fake.control("POST", "/_fake/rbac", {"deny": []})
        self.crypto(key).sign(SignatureAlgorithm.es256, bytes(32))

    def test_stats_count_operations(self):
        key = self.client.create_ec_key("stats-key")
        self.fake.reset_stats()
        self.client.create_ec_key("stats-key")
        self.client.get_key("stats-key")
        self.client.update_key_properties("stats-key", enabled=True)
        self.crypto(key).sign(SignatureAlgorithm.es256, bytes(32))
        list(self.client.list_properties_of_key_versions("stats-key"))
        stats = self.fake.stats()
        for op in ("create", "get", "update", "sign", "list_versions"):
            self.assertEqual(stats.get(op), 1, (op, stats))
        self.assertNotIn("delete", stats)
        self.fake.reset_stats()
        self.assertEqual(self.fake.stats(), {})

    def test_age_key_through_test_control(self):
        self.client.create_ec_key("aged-key")
        self.fake.control("POST", "/_fake/keys/aged-key/attributes", {"created": 1_600_000_000, "updated": 1_600_000_100})
        props = self.client.get_key("aged-key").properties
        self.assertEqual(int(props.created_on.timestamp()), 1_600_000_000)
        self.assertEqual(int(props.updated_on.timestamp()), 1_600_000_100)
        state = self.fake.control("GET", "/_fake/keys")
        entry = [k for k in state["keys"] if k["name"] == "aged-key"][0]
        self.assertEqual(entry["versions"][0]["attributes"]["updated"], 1_600_000_100)


class FaultTest(FakeTestBase):
    def test_429_with_retry_after_is_retried(self):
        self.client.create_ec_key("throttled")
        self.fake.reset_stats()
        self.fake.faults({"op": "get", "status": 429, "retry_after": 1, "count": 2})
        start = time.monotonic()
        self.assertEqual(self.client.get_key("throttled").name, "throttled")
        self.assertGreaterEqual(time.monotonic() - start, 1.9)  # the SDK honoured Retry-After twice
        self.assertEqual(self.fake.stats()["get"], 3)
        status, headers, body = self.fake.request("POST", "/_fake/faults", [{"op": "*", "status": 503, "retry_after": 7}])
        status, headers, body = self.fake.request("GET", "/keys/throttled", headers={"Authorization": "Bearer " + self.fake.token()})
        self.assertEqual((status, headers["Retry-After"], body["error"]["code"]), (503, "7", "ServiceUnavailable"))

    def test_dropped_connection_and_latency(self):
        key = self.client.create_ec_key("flaky")
        self.fake.reset_stats()
        self.fake.faults({"op": "get", "drop": True, "count": 1})
        self.assertEqual(self.client.get_key("flaky").id, key.id)  # the SDK retries a GET
        self.assertEqual(self.fake.stats()["get"], 2)
        # azure-core does not retry a POST whose connection dropped (it may have been applied).
        self.fake.faults({"op": "sign", "drop": True, "count": 1})
        with self.assertRaises(ServiceResponseError):
            self.crypto(key).sign(SignatureAlgorithm.es256, bytes(32))
        result = self.crypto(key).sign(SignatureAlgorithm.es256, bytes(32))
        verify_independently(public_key(key.key), "ES256", bytes(32), result.signature)
        self.assertEqual(self.fake.stats()["sign"], 2)
        self.fake.faults({"op": "get", "latency_ms": 400, "count": 1})
        start = time.monotonic()
        self.client.get_key("flaky")
        self.assertGreaterEqual(time.monotonic() - start, 0.4)
        self.fake.faults({"op": "create", "status": 500, "count": -1})
        with self.assertRaises(HttpResponseError):
            self.client.create_ec_key("never", retry_total=1)
        self.fake.clear_faults()
        self.client.create_ec_key("now-it-works")

    def test_token_endpoint_faults(self):
        self.fake.faults({"op": "token", "status": 503, "count": 1})
        req = urllib.request.Request(f"{self.fake.msi}/msi/token?api-version=2019-08-01&resource=https://vault.azure.net",
                                     headers={"X-IDENTITY-HEADER": "x"})
        with self.assertRaises(urllib.error.HTTPError) as cm:
            urllib.request.urlopen(req)
        self.assertEqual(cm.exception.code, 503)
        with urllib.request.urlopen(req) as r:
            self.assertEqual(r.status, 200)


class TokenTest(unittest.TestCase):
    """Credentials: managed identity (App Service, IMDS), client secret and workload identity
    through the fake's Entra endpoint, token expiry and revocation."""

    @classmethod
    def setUpClass(cls):
        cls.assertion = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6c3BpcmU6c3BpcmUtc2VydmVyIn0.c2ln"
        cls.fake = Fake("--identity-header", "the-header", "--client", "app-1:s3cret",
                        "--client-assertion", "app-wi:" + cls.assertion, "--tenant", TENANT)

    @classmethod
    def tearDownClass(cls):
        cls.fake.stop()

    def roundtrip(self, cred, name):
        with KeyClient(self.fake.vault, cred, connection_verify=self.fake.ca) as client:
            key = client.create_ec_key(name)
            self.assertEqual(client.get_key(name).id, key.id)

    def test_app_service_managed_identity(self):
        self.fake.reset_stats()
        with app_service_env(self.fake, "the-header"):
            self.roundtrip(ManagedIdentityCredential(), "mi-app-service")
        self.assertGreaterEqual(self.fake.stats()["token_app_service"], 1)
        # The wrong X-IDENTITY-HEADER gets no token.
        with app_service_env(self.fake, "wrong"), self.assertRaises(ClientAuthenticationError):
            ManagedIdentityCredential().get_token("https://vault.azure.net/.default")

    def test_imds_managed_identity(self):
        self.fake.reset_stats()
        with env(AZURE_POD_IDENTITY_AUTHORITY_HOST=self.fake.msi):
            cred = ManagedIdentityCredential()
            self.roundtrip(cred, "mi-imds")
        self.assertGreaterEqual(self.fake.stats()["token_imds"], 1)
        url = f"{self.fake.msi}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"
        with self.assertRaises(urllib.error.HTTPError) as cm:
            urllib.request.urlopen(url)
        self.assertEqual(cm.exception.code, 400)
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata": "true"})) as r:
            body = json.loads(r.read())
        self.assertEqual((body["resource"], body["token_type"]), ("https://vault.azure.net", "Bearer"))
        self.assertGreater(int(body["expires_in"]), 3500)

    def test_client_secret_credential_through_authority_host(self):
        self.fake.reset_stats()
        with env():
            cred = ClientSecretCredential(TENANT, "app-1", "s3cret", authority=self.fake.vault,
                                          disable_instance_discovery=True, connection_verify=self.fake.ca)
            self.roundtrip(cred, "entra-secret")
            stats = self.fake.stats()
            self.assertGreaterEqual(stats["token_entra"], 1)
            self.assertGreaterEqual(stats["discovery"], 1)  # MSAL read the openid-configuration
            wrong = ClientSecretCredential(TENANT, "app-1", "wrong", authority=self.fake.vault,
                                           disable_instance_discovery=True, connection_verify=self.fake.ca)
            with self.assertRaises(ClientAuthenticationError) as cm:
                wrong.get_token("https://vault.azure.net/.default")
            self.assertIn("AADSTS7000215", str(cm.exception))
            unknown = ClientSecretCredential(TENANT, "app-2", "s3cret", authority=self.fake.vault,
                                             disable_instance_discovery=True, connection_verify=self.fake.ca)
            with self.assertRaises(ClientAuthenticationError):
                unknown.get_token("https://vault.azure.net/.default")

    def test_workload_identity_credential(self):
        token_file = os.path.join(self.fake.certdir, "federated-token")
        with open(token_file, "w") as f:
            f.write(self.assertion)
        with env():
            cred = WorkloadIdentityCredential(tenant_id=TENANT, client_id="app-wi", token_file_path=token_file,
                                              authority=self.fake.vault, disable_instance_discovery=True,
                                              connection_verify=self.fake.ca)
            self.roundtrip(cred, "workload-identity")
            with open(token_file, "w") as f:
                f.write("aaa.bbb.ccc")  # not the assertion registered for app-wi
            other = WorkloadIdentityCredential(tenant_id=TENANT, client_id="app-wi", token_file_path=token_file,
                                               authority=self.fake.vault, disable_instance_discovery=True,
                                               connection_verify=self.fake.ca)
            with self.assertRaises(ClientAuthenticationError):
                other.get_token("https://vault.azure.net/.default")

    def test_entra_discovery_documents(self):
        status, _, body = self.fake.request("GET", f"/{TENANT}/v2.0/.well-known/openid-configuration")
        self.assertEqual(status, 200)
        self.assertEqual(body["token_endpoint"], f"{self.fake.vault}/{TENANT}/oauth2/v2.0/token")
        self.assertEqual(body["issuer"], f"{self.fake.vault}/{TENANT}/v2.0")
        status, _, body = self.fake.request("GET", "/common/discovery/instance?api-version=1.1")
        self.assertEqual(status, 200)
        self.assertEqual(body["tenant_discovery_endpoint"], f"{self.fake.vault}/{TENANT}/v2.0/.well-known/openid-configuration")

    def test_revoked_tokens_are_replaced(self):
        with app_service_env(self.fake, "the-header"), \
                KeyClient(self.fake.vault, cred := ManagedIdentityCredential(), connection_verify=self.fake.ca) as client:
            client.create_ec_key("revoked")
            old = cred.get_token(f"https://0.0.1:{self.fake.port}/.default").token
            self.fake.reset_stats()
            # CAE mode (default): a claims challenge makes the SDK bypass its token cache.
            self.assertGreaterEqual(self.fake.control("POST", "/_fake/tokens/expire", {})["revoked"], 1)
            status, headers, _ = self.fake.request("GET", "/keys/revoked", headers={"Authorization": "Bearer " + old})
            self.assertEqual(status, 401)
            self.assertIn('error="insufficient_claims"', headers["WWW-Authenticate"])
            self.assertEqual(client.get_key("revoked").name, "revoked")
            stats = self.fake.stats()
            self.assertGreaterEqual(stats["token"], 1)
            self.assertGreaterEqual(stats["unauthorized"], 2)
            # Plain mode: the ordinary challenge, as for an expired token.
            old = cred.get_token(f"https://0.0.1:{self.fake.port}/.default", claims='{"access_token":{}}').token
            self.fake.control("POST", "/_fake/tokens/expire", {"mode": "plain"})
            status, headers, _ = self.fake.request("GET", "/keys/revoked", headers={"Authorization": "Bearer " + old})
            self.assertEqual(status, 401)
            self.assertIn(f'resource="https://0.0.1:{self.fake.port}"', headers["WWW-Authenticate"])


class ExpiryTest(unittest.TestCase):
    def test_expired_token_is_refreshed(self):
        fake = Fake("--token-lifetime", "2")
        try:
            with app_service_env(fake), KeyClient(fake.vault, ManagedIdentityCredential(), connection_verify=fake.ca) as client:
                client.create_ec_key("short-lived")
                token = fake.token()
                headers = {"Authorization": "Bearer " + token}
                self.assertEqual(fake.request("GET", "/keys/short-lived", headers=headers)[0], 200)
                time.sleep(2.5)
                self.assertEqual(fake.request("GET", "/keys/short-lived", headers=headers)[0], 401)  # expired
                fake.reset_stats()
                self.assertEqual(client.get_key("short-lived").name, "short-lived")
                self.assertGreaterEqual(fake.stats()["token"], 1)
        finally:
            fake.stop()


class CertDirTest(unittest.TestCase):
    def test_certificates_are_reused_and_the_ca_key_is_private(self):
        with tempfile.TemporaryDirectory() as tmp:
            certdir = os.path.join(tmp, "new", "tls")  # created if missing
            first = Fake(certdir=certdir)
            first.stop()
            with open(os.path.join(certdir, "ca.pem"), "rb") as f:
                ca = f.read()
            self.assertEqual(os.stat(os.path.join(certdir, "ca-key.pem")).st_mode & 0o777, 0o600)
            second = Fake(certdir=certdir)
            try:
                with open(os.path.join(certdir, "ca.pem"), "rb") as f:
                    self.assertEqual(f.read(), ca)
                status, _, _ = second.request("GET", "/_fake/health")  # verifies against the same CA
                self.assertEqual(status, 200)
            finally:
                second.stop()


if __name__ == "__main__":
    unittest.main()
