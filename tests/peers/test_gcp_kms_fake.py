"""Drives tests/peers/gcp_kms_fake.py with Google's official Python client (google-cloud-kms,
REST transport), so the fake's wire format is checked against the real one, and verifies
every signature with `cryptography`, independently of the fake.

Run: $HOME/.cache/kms-keymanager/venv-gcp-*/bin/python -m unittest -v tests/peers/test_gcp_kms_fake.py
(the venv scripts/test-all.sh makes from tests/peers/requirements-gcp.txt).

FakeKmsTest runs the fake without --require-auth (anonymous calls). AuthTest and IamTest run
it with --require-auth: every client authenticates with a generated service account key
file (Google's credentials sign the JWTs), and IAM bindings decide what each may do.
"""

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from google.api_core import exceptions as gexc
from google.auth import crypt
from google.auth import jwt as google_jwt
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import Request as GoogleAuthRequest
from google.cloud import kms_v1
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.oauth2 import credentials as oauth2_credentials
from google.oauth2 import service_account
from google.protobuf import duration_pb2, field_mask_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "gcp_kms_fake.py")
LOCATION = "projects/test-project/locations/us-east1"

Alg = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
Purpose = kms_v1.CryptoKey.CryptoKeyPurpose

# algorithm -> (hashlib name, cryptography hash class)
SUPPORTED = {
    Alg.EC_SIGN_P256_SHA256: ("sha256", hashes.SHA256),
    Alg.EC_SIGN_P384_SHA384: ("sha384", hashes.SHA384),
    Alg.RSA_SIGN_PKCS1_2048_SHA256: ("sha256", hashes.SHA256),
    Alg.RSA_SIGN_PKCS1_3072_SHA256: ("sha256", hashes.SHA256),
    Alg.RSA_SIGN_PKCS1_4096_SHA256: ("sha256", hashes.SHA256),
    Alg.RSA_SIGN_PKCS1_4096_SHA512: ("sha512", hashes.SHA512),
    Alg.RSA_SIGN_PSS_2048_SHA256: ("sha256", hashes.SHA256),
    Alg.RSA_SIGN_PSS_3072_SHA256: ("sha256", hashes.SHA256),
    Alg.RSA_SIGN_PSS_4096_SHA256: ("sha256", hashes.SHA256),
    Alg.RSA_SIGN_PSS_4096_SHA512: ("sha512", hashes.SHA512),
}


HTTP_EXCEPTION = {
    "INVALID_ARGUMENT": gexc.BadRequest,
    "FAILED_PRECONDITION": gexc.BadRequest,
    "NOT_FOUND": gexc.NotFound,
    "ALREADY_EXISTS": gexc.Conflict,
    "ABORTED": gexc.Conflict,
    "RESOURCE_EXHAUSTED": gexc.TooManyRequests,
}


def crc32c(data: bytes) -> int:
    """Bitwise CRC32C (Castagnoli), deliberately not the fake's table implementation."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fake(*args, port=None):
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, FAKE, "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while True:
        try:
            with urllib.request.urlopen(endpoint + "/_fake/health", timeout=1) as r:
                if r.status == 200:
                    return proc, endpoint
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("fake did not start: " + proc.stderr.read().decode())
        time.sleep(0.05)


def stop_fake(proc):
    proc.kill()
    proc.wait()
    proc.stderr.close()


def http(endpoint, method, path, body=None, headers=None):
    """Raw HTTP: returns (status, parsed JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(endpoint + path, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class FakeKmsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proc, cls.endpoint = start_fake("--generation-delay", "0.2")
        cls.client = kms_v1.KeyManagementServiceClient(
            transport="rest",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": cls.endpoint},
        )
        cls.ring = cls.client.create_key_ring(
            request={"parent": LOCATION, "key_ring_id": "ring-" + uuid.uuid4().hex[:8]}).name

    @classmethod
    def tearDownClass(cls):
        stop_fake(cls.proc)

    # -- helpers ----------------------------------------------------------------------

    @contextlib.contextmanager
    def api_error(self, status):
        """Expects a call to fail with the given google.rpc status.

        Over REST, google-api-core picks the exception class from the HTTP status alone
        (400 -> BadRequest whether INVALID_ARGUMENT or FAILED_PRECONDITION; 409 -> Conflict
        whether ALREADY_EXISTS or ABORTED), so the rpc status is read from the error body.
        """
        with self.assertRaises(HTTP_EXCEPTION[status]) as cm:
            yield cm
        self.assertEqual(cm.exception.response.json()["error"]["status"], status, cm.exception.message)

    def control(self, path, body=None, method="POST"):
        status, out = http(self.endpoint, method, "/_fake/" + path, body)
        self.assertEqual(status, 200, out)
        return out

    def create_key(self, algorithm=Alg.EC_SIGN_P256_SHA256, key_id=None, labels=None, skip=False, **extra):
        key_id = key_id or "k-" + uuid.uuid4().hex[:10]
        return self.client.create_crypto_key(request={
            "parent": self.ring,
            "crypto_key_id": key_id,
            "crypto_key": {
                "purpose": Purpose.ASYMMETRIC_SIGN,
                "version_template": {"algorithm": algorithm,
                                     "protection_level": kms_v1.ProtectionLevel.SOFTWARE},
                "labels": labels or {},
                **extra,
            },
            "skip_initial_version_creation": skip,
        })

    def wait_enabled(self, name, timeout=30):
        deadline = time.time() + timeout
        while True:
            v = self.client.get_crypto_key_version(request={"name": name})
            if v.state == State.ENABLED:
                return v
            self.assertEqual(v.state, State.PENDING_GENERATION)
            self.assertLess(time.time(), deadline, f"{name} never became ENABLED")
            time.sleep(0.02)

    def sign(self, name, hash_name, digest, crc=True):
        req = {"name": name, "digest": {hash_name: digest}}
        if crc:
            req["digest_crc32c"] = crc32c(digest)
        return self.client.asymmetric_sign(request=req)

    @staticmethod
    def verify(pem, algorithm, digest, signature):
        hash_name, hash_cls = SUPPORTED[algorithm]
        pub = serialization.load_pem_public_key(pem.encode())
        prehashed = utils.Prehashed(hash_cls())
        name = Alg(algorithm).name
        if name.startswith("EC_"):
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            pub.verify(signature, digest, ec.ECDSA(prehashed))
        elif "_PKCS1_" in name:
            assert isinstance(pub, rsa.RSAPublicKey)
            pub.verify(signature, digest, padding.PKCS1v15(), prehashed)
        else:
            assert isinstance(pub, rsa.RSAPublicKey)
            pub.verify(signature, digest,
                       padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls().digest_size), prehashed)

    # -- tests ------------------------------------------------------------------------

    def test_crc32c_vector(self):
        self.assertEqual(crc32c(b"123456789"), 0xE3069283)
        sys.path.insert(0, HERE)
        try:
            import gcp_kms_fake
        finally:
            sys.path.remove(HERE)
        self.assertEqual(gcp_kms_fake.crc32c(b"123456789"), 0xE3069283)
        self.assertEqual(gcp_kms_fake.crc32c(b""), 0)

    def test_key_ring_get_list_and_errors(self):
        ring = self.client.get_key_ring(request={"name": self.ring})
        self.assertEqual(ring.name, self.ring)
        self.assertIsNotNone(ring.create_time)
        names = [r.name for r in self.client.list_key_rings(request={"parent": LOCATION})]
        self.assertIn(self.ring, names)
        with self.api_error("ALREADY_EXISTS"):
            self.client.create_key_ring(request={"parent": LOCATION, "key_ring_id": self.ring.rsplit("/", 1)[1]})
        with self.api_error("NOT_FOUND"):
            self.client.get_key_ring(request={"name": LOCATION + "/keyRings/missing"})
        with self.api_error("NOT_FOUND"):
            self.client.create_crypto_key(request={
                "parent": LOCATION + "/keyRings/missing", "crypto_key_id": "k",
                "crypto_key": {"purpose": Purpose.ASYMMETRIC_SIGN,
                               "version_template": {"algorithm": Alg.EC_SIGN_P256_SHA256}}})
        with self.api_error("NOT_FOUND"):
            self.client.get_crypto_key(request={"name": self.ring + "/cryptoKeys/missing"})

    def test_every_algorithm_signs_and_verifies(self):
        keys = {alg: self.create_key(alg) for alg in SUPPORTED}
        for alg, key in keys.items():
            with self.subTest(algorithm=Alg(alg).name):
                self.assertEqual(key.purpose, Purpose.ASYMMETRIC_SIGN)
                self.assertEqual(key.version_template.algorithm, alg)
                self.assertEqual(key.destroy_scheduled_duration, dt.timedelta(days=30))
                self.assertFalse(key.primary.name, "asymmetric keys have no primary")
                version = self.wait_enabled(key.name + "/cryptoKeyVersions/1")
                self.assertEqual(version.algorithm, alg)
                self.assertEqual(version.protection_level, kms_v1.ProtectionLevel.SOFTWARE)
                self.assertIsNotNone(version.generate_time)

                pub = self.client.get_public_key(request={"name": version.name})
                self.assertEqual(pub.algorithm, alg)
                self.assertEqual(pub.name, version.name)
                self.assertEqual(pub.pem_crc32c, crc32c(pub.pem.encode()))
                self.assertTrue(pub.pem.startswith("-----BEGIN PUBLIC KEY-----"))

                hash_name, _ = SUPPORTED[alg]
                digest = hashlib.new(hash_name, b"hello " + Alg(alg).name.encode()).digest()
                resp = self.sign(version.name, hash_name, digest)
                self.assertTrue(resp.verified_digest_crc32c)
                self.assertEqual(resp.signature_crc32c, crc32c(resp.signature))
                self.assertEqual(resp.name, version.name)
                self.verify(pub.pem, alg, digest, resp.signature)
                with self.assertRaises(InvalidSignature):
                    self.verify(pub.pem, alg, hashlib.new(hash_name, b"other").digest(), resp.signature)

                resp = self.sign(version.name, hash_name, digest, crc=False)
                self.assertFalse(resp.verified_digest_crc32c)
                self.verify(pub.pem, alg, digest, resp.signature)

    def wait_job_active(self, name, timeout=60):
        deadline = time.time() + timeout
        while True:
            job = self.client.get_import_job(request={"name": name})
            if job.state == kms_v1.ImportJob.ImportJobState.ACTIVE:
                return job
            self.assertEqual(job.state, kms_v1.ImportJob.ImportJobState.PENDING_GENERATION)
            self.assertFalse(job.public_key.pem, "no wrapping key before the job is ACTIVE")
            self.assertLess(time.time(), deadline, f"{name} never became ACTIVE")
            time.sleep(0.05)

    @staticmethod
    def wrap(job, private_key, method="RSA_OAEP_4096_SHA256_AES_256"):
        """The client side of an import, as Google documents it: a fresh AES-256 key under
        RSA-OAEP with the job's public key, then the PKCS#8 key under AES key wrap with
        padding (RFC 5649)."""
        from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
        pkcs8 = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        wrapping = serialization.load_pem_public_key(job.public_key.pem.encode())
        h = hashes.SHA256 if "SHA256" in method else hashes.SHA1
        oaep = padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)
        aes_key = os.urandom(32)
        return wrapping.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, pkcs8)

    def test_import_jobs_create_get_list_and_import_a_version(self):
        Method = kms_v1.ImportJob.ImportMethod
        job_id = "job-" + uuid.uuid4().hex[:8]
        job = self.client.create_import_job(request={
            "parent": self.ring, "import_job_id": job_id,
            "import_job": {"import_method": Method.RSA_OAEP_4096_SHA256_AES_256,
                           "protection_level": kms_v1.ProtectionLevel.SOFTWARE}})
        self.assertEqual(job.name, f"{self.ring}/importJobs/{job_id}")
        self.assertEqual(job.import_method, Method.RSA_OAEP_4096_SHA256_AES_256)
        job = self.wait_job_active(job.name)
        wrapping = serialization.load_pem_public_key(job.public_key.pem.encode())
        self.assertEqual(wrapping.key_size, 4096)
        self.assertIsNotNone(job.expire_time)
        self.assertIn(job.name, [j.name for j in self.client.list_import_jobs(request={"parent": self.ring})])
        with self.api_error("ALREADY_EXISTS"):
            self.client.create_import_job(request={
                "parent": self.ring, "import_job_id": job_id,
                "import_job": {"import_method": Method.RSA_OAEP_4096_SHA256_AES_256,
                               "protection_level": kms_v1.ProtectionLevel.SOFTWARE}})
        with self.api_error("NOT_FOUND"):
            self.client.get_import_job(request={"name": self.ring + "/importJobs/missing"})

        for alg, private_key in [
            (Alg.EC_SIGN_P256_SHA256, ec.generate_private_key(ec.SECP256R1())),
            (Alg.EC_SIGN_P384_SHA384, ec.generate_private_key(ec.SECP384R1())),
            (Alg.RSA_SIGN_PKCS1_2048_SHA256, rsa.generate_private_key(65537, 2048)),
        ]:
            with self.subTest(algorithm=Alg(alg).name):
                # Imported into a new key created without a version, and into an existing one.
                key = self.create_key(alg, skip=True, import_only=True)
                version = self.client.import_crypto_key_version(request={
                    "parent": key.name, "algorithm": alg, "import_job": job.name,
                    "rsa_aes_wrapped_key": self.wrap(job, private_key)})
                self.assertEqual(version.name, key.name + "/cryptoKeyVersions/1")
                self.assertEqual(version.state, State.ENABLED)
                self.assertEqual(version.import_job, job.name)
                self.assertIsNotNone(version.import_time)
                pub = self.client.get_public_key(request={"name": version.name})
                mine = private_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
                self.assertEqual(pub.pem, mine)
                hash_name, _ = SUPPORTED[alg]
                digest = hashlib.new(hash_name, b"imported").digest()
                self.verify(mine, alg, digest, self.sign(version.name, hash_name, digest).signature)

                existing = self.create_key(alg)
                second = self.client.import_crypto_key_version(request={
                    "parent": existing.name, "algorithm": alg, "import_job": job.name,
                    "wrapped_key": self.wrap(job, private_key)})
                self.assertEqual(second.name, existing.name + "/cryptoKeyVersions/2")

        # Refusals: material of another type, material wrapped for another job, garbage.
        key = self.create_key(Alg.EC_SIGN_P384_SHA384, skip=True)
        with self.api_error("INVALID_ARGUMENT"):
            self.client.import_crypto_key_version(request={
                "parent": key.name, "algorithm": Alg.EC_SIGN_P384_SHA384, "import_job": job.name,
                "rsa_aes_wrapped_key": self.wrap(job, ec.generate_private_key(ec.SECP256R1()))})
        other = self.wait_job_active(self.client.create_import_job(request={
            "parent": self.ring, "import_job_id": "other-" + uuid.uuid4().hex[:8],
            "import_job": {"import_method": Method.RSA_OAEP_3072_SHA256_AES_256,
                           "protection_level": kms_v1.ProtectionLevel.SOFTWARE}}).name)
        with self.api_error("INVALID_ARGUMENT"):
            self.client.import_crypto_key_version(request={
                "parent": key.name, "algorithm": Alg.EC_SIGN_P384_SHA384, "import_job": job.name,
                "rsa_aes_wrapped_key": self.wrap(other, ec.generate_private_key(ec.SECP384R1()),
                                                 "RSA_OAEP_3072_SHA256_AES_256")})
        with self.api_error("INVALID_ARGUMENT"):
            self.client.import_crypto_key_version(request={
                "parent": key.name, "algorithm": Alg.EC_SIGN_P384_SHA384, "import_job": job.name,
                "rsa_aes_wrapped_key": b"\x00" * 600})
        self.assertEqual(list(self.client.list_crypto_key_versions(request={"parent": key.name})), [],
                         "a refused import leaves no version")

    def test_pending_generation_refuses_public_key_and_sign(self):
        self.control("generation_delay", {"seconds": 1.0})
        try:
            key = self.create_key()
        finally:
            self.control("generation_delay", {"seconds": 0.2})
        name = key.name + "/cryptoKeyVersions/1"
        v = self.client.get_crypto_key_version(request={"name": name})
        self.assertEqual(v.state, State.PENDING_GENERATION)
        with self.api_error("FAILED_PRECONDITION") as cm:
            self.client.get_public_key(request={"name": name})
        self.assertIn("PENDING_GENERATION", cm.exception.message)
        with self.api_error("FAILED_PRECONDITION"):
            self.sign(name, "sha256", hashlib.sha256(b"x").digest())
        self.wait_enabled(name)
        self.client.get_public_key(request={"name": name})

    def test_sign_rejects_bad_digests(self):
        key = self.create_key(Alg.RSA_SIGN_PKCS1_2048_SHA256)
        name = self.wait_enabled(key.name + "/cryptoKeyVersions/1").name
        digest = hashlib.sha256(b"x").digest()
        with self.api_error("INVALID_ARGUMENT"):
            self.client.asymmetric_sign(request={"name": name, "digest": {"sha256": digest},
                                                 "digest_crc32c": crc32c(digest) ^ 1})
        with self.api_error("INVALID_ARGUMENT"):
            self.sign(name, "sha384", hashlib.sha384(b"x").digest())
        with self.api_error("INVALID_ARGUMENT"):
            self.sign(name, "sha256", digest[:31])

    def test_invalid_create_arguments(self):
        bad = [
            dict(algorithm=Alg.GOOGLE_SYMMETRIC_ENCRYPTION),
            dict(labels={"Upper": "x"}),
            dict(labels={"ok": "Bad Value"}),
            dict(labels={f"l{i}": "v" for i in range(65)}),
            dict(key_id="bad.id"),
            dict(algorithm=Alg.RSA_SIGN_RAW_PKCS1_2048),
        ]
        for kwargs in bad:
            with self.subTest(**{k: str(v)[:40] for k, v in kwargs.items()}):
                with self.api_error("INVALID_ARGUMENT"):
                    self.create_key(**kwargs)
        with self.api_error("INVALID_ARGUMENT") as cm:
            self.client.create_crypto_key(request={
                "parent": self.ring, "crypto_key_id": "enc-with-sign-alg",
                "crypto_key": {"purpose": Purpose.ENCRYPT_DECRYPT,
                               "version_template": {"algorithm": Alg.EC_SIGN_P256_SHA256}}})
        self.assertIn("algorithm", cm.exception.message)
        with self.api_error("ALREADY_EXISTS"):
            key = self.create_key(skip=True)
            self.create_key(key_id=key.name.rsplit("/", 1)[1])

    def test_symmetric_key_has_primary(self):
        key = self.client.create_crypto_key(request={
            "parent": self.ring, "crypto_key_id": "sym-" + uuid.uuid4().hex[:8],
            "crypto_key": {"purpose": Purpose.ENCRYPT_DECRYPT}})
        self.assertEqual(key.primary.name, key.name + "/cryptoKeyVersions/1")
        self.assertEqual(key.version_template.algorithm, Alg.GOOGLE_SYMMETRIC_ENCRYPTION)

    def test_list_with_label_filter_and_paging(self):
        tag = "t" + uuid.uuid4().hex[:8]
        mine = {self.create_key(labels={"suite": tag, "n": str(i)}, skip=True).name for i in range(7)}
        self.create_key(labels={"suite": "other"}, skip=True)
        self.create_key(labels={"unrelated": "x"}, skip=True)
        for flt in (f"labels.suite={tag}", f'labels.suite = "{tag}"', f"labels.suite={tag} AND labels.n:*"):
            with self.subTest(filter=flt):
                pager = self.client.list_crypto_keys(request={"parent": self.ring, "filter": flt, "page_size": 3})
                pages = list(pager.pages)
                self.assertEqual(len(pages), 3)
                self.assertEqual(pages[0].total_size, 7)
                self.assertTrue(pages[0].next_page_token)
                self.assertFalse(pages[-1].next_page_token)
                got = [k.name for p in pages for k in p.crypto_keys]
                self.assertEqual(len(got), 7)
                self.assertEqual(set(got), mine)
        got = {k.name for k in self.client.list_crypto_keys(
            request={"parent": self.ring, "filter": f"labels.suite={tag} AND labels.n != 3"})}
        self.assertEqual(len(got), 6)
        with self.api_error("INVALID_ARGUMENT"):
            list(self.client.list_crypto_keys(request={"parent": self.ring, "filter": "labels.suite=("}))
        with self.api_error("INVALID_ARGUMENT"):
            list(self.client.list_crypto_keys(request={"parent": self.ring, "filter": "labels.a=b OR labels.c=d"}))

    def test_seed_foreign_keys(self):
        ring = self.client.create_key_ring(
            request={"parent": LOCATION, "key_ring_id": "seed-" + uuid.uuid4().hex[:8]}).name
        self.control("seed", {"keyRing": ring, "count": 250, "labels": {"owner": "someone-else"}})
        pager = self.client.list_crypto_keys(request={"parent": ring})
        self.assertEqual(len(list(pager)), 250)
        first = self.client.list_crypto_keys(request={"parent": ring})._response
        self.assertEqual(len(first.crypto_keys), 100, "default page size")
        self.assertEqual(first.total_size, 250)
        state = self.control(f"state?keyRing={urllib.parse.quote(ring)}", method="GET")
        self.assertEqual(len(state["cryptoKeys"]), 250)
        self.assertEqual(state["cryptoKeys"][0]["versions"], [])

    def test_update_labels_and_algorithm(self):
        key = self.create_key(labels={"a": "1"}, skip=True)
        updated = self.client.update_crypto_key(request={
            "crypto_key": {"name": key.name, "labels": {"b": "2", "c": ""}},
            "update_mask": field_mask_pb2.FieldMask(paths=["labels"])})
        self.assertEqual(dict(updated.labels), {"b": "2", "c": ""})
        updated = self.client.update_crypto_key(request={
            "crypto_key": {"name": key.name, "version_template": {"algorithm": Alg.EC_SIGN_P384_SHA384}},
            "update_mask": field_mask_pb2.FieldMask(paths=["version_template.algorithm"])})
        self.assertEqual(updated.version_template.algorithm, Alg.EC_SIGN_P384_SHA384)
        self.assertEqual(dict(updated.labels), {"b": "2", "c": ""})
        got = self.client.get_crypto_key(request={"name": key.name})
        self.assertEqual(got.version_template.algorithm, Alg.EC_SIGN_P384_SHA384)
        v = self.client.create_crypto_key_version(request={"parent": key.name, "crypto_key_version": {}})
        self.assertEqual(v.algorithm, Alg.EC_SIGN_P384_SHA384)
        with self.api_error("INVALID_ARGUMENT"):
            self.client.update_crypto_key(request={
                "crypto_key": {"name": key.name, "purpose": Purpose.ENCRYPT_DECRYPT},
                "update_mask": field_mask_pb2.FieldMask(paths=["purpose"])})
        with self.api_error("INVALID_ARGUMENT"):
            self.client.update_crypto_key(request={
                "crypto_key": {"name": key.name, "version_template": {"algorithm": Alg.GOOGLE_SYMMETRIC_ENCRYPTION}},
                "update_mask": field_mask_pb2.FieldMask(paths=["version_template.algorithm"])})

    def test_version_lifecycle(self):
        key = self.create_key(destroy_scheduled_duration=duration_pb2.Duration(seconds=86400))
        self.assertEqual(key.destroy_scheduled_duration, dt.timedelta(days=1))
        v1 = self.wait_enabled(key.name + "/cryptoKeyVersions/1")
        v2 = self.client.create_crypto_key_version(request={"parent": key.name, "crypto_key_version": {}})
        self.assertEqual(v2.name, key.name + "/cryptoKeyVersions/2")
        self.assertEqual(v2.state, State.PENDING_GENERATION)
        self.wait_enabled(v2.name)
        self.assertEqual(self.client.get_crypto_key_version(request={"name": v2.name}).name, v2.name)

        enabled = [v.name for v in self.client.list_crypto_key_versions(
            request={"parent": key.name, "filter": "state=ENABLED"})]
        self.assertEqual(enabled, [v1.name, v2.name])

        before = dt.datetime.now(dt.timezone.utc)
        destroyed = self.client.destroy_crypto_key_version(request={"name": v1.name})
        self.assertEqual(destroyed.state, State.DESTROY_SCHEDULED)
        expected = before + dt.timedelta(days=1)
        self.assertLess(abs((destroyed.destroy_time - expected).total_seconds()), 5)
        with self.api_error("FAILED_PRECONDITION"):
            self.client.destroy_crypto_key_version(request={"name": v1.name})
        with self.api_error("FAILED_PRECONDITION"):
            self.sign(v1.name, "sha256", hashlib.sha256(b"x").digest())
        enabled = [v.name for v in self.client.list_crypto_key_versions(
            request={"parent": key.name, "filter": "state = ENABLED"})]
        self.assertEqual(enabled, [v2.name])
        scheduled = [v.name for v in self.client.list_crypto_key_versions(
            request={"parent": key.name, "filter": "state=4"})]
        self.assertEqual(scheduled, [v1.name])

        restored = self.client.restore_crypto_key_version(request={"name": v1.name})
        self.assertEqual(restored.state, State.DISABLED)
        with self.api_error("FAILED_PRECONDITION"):
            self.client.restore_crypto_key_version(request={"name": v1.name})
        with self.api_error("FAILED_PRECONDITION"):
            self.sign(v1.name, "sha256", hashlib.sha256(b"x").digest())
        enabled_again = self.client.update_crypto_key_version(request={
            "crypto_key_version": {"name": v1.name, "state": State.ENABLED},
            "update_mask": field_mask_pb2.FieldMask(paths=["state"])})
        self.assertEqual(enabled_again.state, State.ENABLED)
        self.sign(v1.name, "sha256", hashlib.sha256(b"x").digest())
        with self.api_error("NOT_FOUND"):
            self.client.get_crypto_key_version(request={"name": key.name + "/cryptoKeyVersions/9"})

    def test_destroy_schedule_elapses(self):
        key = self.create_key(destroy_scheduled_duration=duration_pb2.Duration(seconds=1))
        v = self.wait_enabled(key.name + "/cryptoKeyVersions/1")
        self.client.destroy_crypto_key_version(request={"name": v.name})
        time.sleep(1.1)
        got = self.client.get_crypto_key_version(request={"name": v.name})
        self.assertEqual(got.state, State.DESTROYED)
        self.assertIsNotNone(got.destroy_event_time)

    def test_iam_policy_compare_and_swap(self):
        key = self.create_key(skip=True)
        policy = self.client.get_iam_policy(request={"resource": key.name,
                                                     "options": {"requested_policy_version": 3}})
        self.assertEqual(list(policy.bindings), [])
        self.assertEqual(policy.etag, b"\x00\x20\x01")
        binding = policy_pb2.Binding(role="roles/cloudkms.signerVerifier", members=["serviceAccount:a@p.iam.gserviceaccount.com"])
        new = self.client.set_iam_policy(request={
            "resource": key.name, "policy": policy_pb2.Policy(bindings=[binding], etag=policy.etag)})
        self.assertEqual(list(new.bindings), [binding])
        self.assertNotEqual(new.etag, policy.etag)
        with self.api_error("ABORTED"):
            self.client.set_iam_policy(request={
                "resource": key.name, "policy": policy_pb2.Policy(bindings=[], etag=policy.etag)})
        got = self.client.get_iam_policy(request={"resource": key.name})
        self.assertEqual(got.etag, new.etag)
        self.assertEqual(list(got.bindings), [binding])
        perms = self.client.test_iam_permissions(request=iam_policy_pb2.TestIamPermissionsRequest(
            resource=key.name, permissions=["cloudkms.cryptoKeyVersions.useToSign"]))
        self.assertEqual(list(perms.permissions), ["cloudkms.cryptoKeyVersions.useToSign"])
        with self.api_error("NOT_FOUND"):
            self.client.get_iam_policy(request={"resource": self.ring + "/cryptoKeys/missing"})

    def test_concurrent_iam_writers_one_wins(self):
        key = self.create_key(skip=True)
        etag = self.client.get_iam_policy(request={"resource": key.name}).etag
        results = []

        def writer(i):
            b = policy_pb2.Binding(role="roles/cloudkms.viewer", members=[f"user:u{i}@example.com"])
            try:
                self.client.set_iam_policy(request={"resource": key.name,
                                                    "policy": policy_pb2.Policy(bindings=[b], etag=etag)})
                results.append("ok")
            except gexc.Conflict as e:
                results.append(e.response.json()["error"]["status"])

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), ["ABORTED"] * 7 + ["ok"])

    def test_concurrent_create_exactly_one_wins(self):
        key_id = "lock-" + uuid.uuid4().hex[:8]
        barrier = threading.Barrier(8)
        results = []

        def create():
            client = kms_v1.KeyManagementServiceClient(
                transport="rest", credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.endpoint})
            barrier.wait()
            try:
                client.create_crypto_key(request={
                    "parent": self.ring, "crypto_key_id": key_id,
                    "crypto_key": {"purpose": Purpose.ASYMMETRIC_SIGN,
                                   "version_template": {"algorithm": Alg.EC_SIGN_P256_SHA256}},
                    "skip_initial_version_creation": True})
                results.append("ok")
            except gexc.Conflict as e:
                results.append(e.response.json()["error"]["status"])

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), ["ALREADY_EXISTS"] * 7 + ["ok"])

    def test_faults_and_calls(self):
        key = self.create_key()
        name = self.wait_enabled(key.name + "/cryptoKeyVersions/1").name
        self.control("calls/reset")
        self.control("faults", {"method": "cryptoKeyVersions.getPublicKey",
                                "faults": ["resource_exhausted", "unavailable", "internal"]})
        with self.assertRaises((gexc.TooManyRequests, gexc.ResourceExhausted)):
            self.client.get_public_key(request={"name": name}, retry=None)
        with self.assertRaises(gexc.ServiceUnavailable):
            self.client.get_public_key(request={"name": name}, retry=None)
        with self.assertRaises(gexc.InternalServerError):
            self.client.get_public_key(request={"name": name}, retry=None)
        self.client.get_public_key(request={"name": name}, retry=None)
        self.assertEqual(self.control("calls", method="GET").get("cryptoKeyVersions.getPublicKey"), 4)

        self.control("faults", {"method": "cryptoKeys.get", "faults": ["drop", "slow:0.3"]})
        with self.assertRaises(Exception):
            self.client.get_crypto_key(request={"name": key.name}, retry=None)
        started = time.monotonic()
        self.client.get_crypto_key(request={"name": key.name}, retry=None)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)

        self.control("latency", {"seconds": 0.1})
        try:
            started = time.monotonic()
            self.client.get_crypto_key(request={"name": key.name})
            self.assertGreaterEqual(time.monotonic() - started, 0.1)
        finally:
            self.control("latency", {"seconds": 0})
        self.control("calls/reset")
        self.assertEqual(self.control("calls", method="GET"), {})

    def test_corrupt_checksums(self):
        key = self.create_key()
        name = self.wait_enabled(key.name + "/cryptoKeyVersions/1").name
        digest = hashlib.sha256(b"x").digest()
        self.control("corrupt", {"method": "asymmetricSign", "count": 1})
        bad = self.sign(name, "sha256", digest)
        self.assertNotEqual(bad.signature_crc32c, crc32c(bad.signature))
        good = self.sign(name, "sha256", digest)
        self.assertEqual(good.signature_crc32c, crc32c(good.signature))
        self.control("corrupt", {"method": "getPublicKey", "count": 1})
        pub = self.client.get_public_key(request={"name": name})
        self.assertNotEqual(pub.pem_crc32c, crc32c(pub.pem.encode()))
        pub = self.client.get_public_key(request={"name": name})
        self.assertEqual(pub.pem_crc32c, crc32c(pub.pem.encode()))

    def test_raw_wire_format(self):
        key = self.create_key(labels={"x": "y"})
        vname = self.wait_enabled(key.name + "/cryptoKeyVersions/1").name
        status, body = http(self.endpoint, "GET", "/v1/" + key.name)
        self.assertEqual(status, 200)
        self.assertEqual(body["purpose"], "ASYMMETRIC_SIGN")
        self.assertEqual(body["versionTemplate"], {"protectionLevel": "SOFTWARE", "algorithm": "EC_SIGN_P256_SHA256"})
        self.assertEqual(body["destroyScheduledDuration"], "2592000s")
        self.assertNotIn("primary", body)
        self.assertTrue(body["createTime"].endswith("Z"))
        status, body = http(self.endpoint, "GET", "/v1/" + key.name + "?$alt=json;enum-encoding=int")
        self.assertEqual((body["purpose"], body["versionTemplate"]["algorithm"]), (5, 12))

        status, pub = http(self.endpoint, "GET", f"/v1/{vname}/publicKey")
        self.assertEqual(pub["algorithm"], "EC_SIGN_P256_SHA256")
        self.assertIsInstance(pub["pemCrc32c"], str)
        self.assertEqual(int(pub["pemCrc32c"]), crc32c(pub["pem"].encode()))

        digest = hashlib.sha256(b"raw").digest()
        # URL-safe, unpadded base64 and an int64 sent as a JSON number are accepted too.
        status, sig = http(self.endpoint, "POST", f"/v1/{vname}:asymmetricSign", {
            "digest": {"sha256": base64.urlsafe_b64encode(digest).decode().rstrip("=")},
            "digestCrc32c": crc32c(digest)})
        self.assertEqual(status, 200, sig)
        self.assertIsInstance(sig["signatureCrc32c"], str)
        self.assertIs(sig["verifiedDigestCrc32c"], True)
        self.assertEqual(sig["protectionLevel"], "SOFTWARE")
        signature = base64.b64decode(sig["signature"])
        self.verify(pub["pem"], Alg.EC_SIGN_P256_SHA256, digest, signature)
        status, sig = http(self.endpoint, "POST", f"/v1/{vname}:asymmetricSign", {"digest": {"sha256": base64.b64encode(digest).decode()}})
        self.assertNotIn("verifiedDigestCrc32c", sig, "proto3 JSON omits false")

        status, body = http(self.endpoint, "GET", "/v1/" + key.name + "/cryptoKeyVersions/7")
        self.assertEqual(status, 404)
        self.assertEqual(set(body), {"error"})
        self.assertEqual(body["error"]["code"], 404)
        self.assertEqual(body["error"]["status"], "NOT_FOUND")
        self.assertIsInstance(body["error"]["message"], str)
        status, body = http(self.endpoint, "GET", "/v1/nothing/here")
        self.assertEqual((status, body["error"]["status"]), (404, "NOT_FOUND"))
        status, body = http(self.endpoint, "POST", f"/v1/{self.ring}/cryptoKeys?cryptoKeyId=bad-purpose",
                            {"purpose": "ASYMMETRIC_SIGN", "versionTemplate": {"algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"}})
        self.assertEqual((status, body["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertIn("algorithm", body["error"]["message"])
        status, body = http(self.endpoint, "PATCH", f"/v1/{key.name}?updateMask=rotationPeriod", {})
        self.assertEqual((status, body["error"]["status"]), (400, "INVALID_ARGUMENT"))
        status, body = http(self.endpoint, "POST", f"/v1/{self.ring}/cryptoKeys?cryptoKeyId=unknown-field",
                            {"purpose": "ASYMMETRIC_SIGN", "bogus": 1,
                             "versionTemplate": {"algorithm": "EC_SIGN_P256_SHA256"}})
        self.assertEqual((status, body["error"]["status"]), (400, "INVALID_ARGUMENT"))

        state = self.control(f"state?keyRing={urllib.parse.quote(self.ring)}", method="GET")
        mine = [k for k in state["cryptoKeys"] if k["name"] == key.name]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["labels"], {"x": "y"})
        self.assertEqual(mine[0]["versions"][0]["state"], "ENABLED")


# -- identity and IAM (--require-auth) -------------------------------------------------------

PROJECT = "test-project"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ALL_KMS_PERMISSIONS = [
    "cloudkms.keyRings.create", "cloudkms.keyRings.get", "cloudkms.keyRings.list",
    "cloudkms.keyRings.getIamPolicy", "cloudkms.keyRings.setIamPolicy",
    "cloudkms.cryptoKeys.create", "cloudkms.cryptoKeys.get", "cloudkms.cryptoKeys.list",
    "cloudkms.cryptoKeys.update", "cloudkms.cryptoKeys.getIamPolicy", "cloudkms.cryptoKeys.setIamPolicy",
    "cloudkms.cryptoKeyVersions.create", "cloudkms.cryptoKeyVersions.get", "cloudkms.cryptoKeyVersions.list",
    "cloudkms.cryptoKeyVersions.update", "cloudkms.cryptoKeyVersions.destroy", "cloudkms.cryptoKeyVersions.restore",
    "cloudkms.cryptoKeyVersions.useToSign", "cloudkms.cryptoKeyVersions.useToVerify",
    "cloudkms.cryptoKeyVersions.viewPublicKey",
]


class StateFileTest(unittest.TestCase):
    """--state-file: a fake stopped with SIGTERM and started again on the same file serves the
    same key rings, CryptoKeys, labels and key material."""

    def test_restart_keeps_keys(self):
        with tempfile.TemporaryDirectory() as tmp:
            state = os.path.join(tmp, "state.pickle")
            port = free_port()
            proc, endpoint = start_fake("--generation-delay", "0", "--state-file", state, port=port)
            client = kms_v1.KeyManagementServiceClient(
                transport="rest", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
            ring = client.create_key_ring(request={"parent": LOCATION, "key_ring_id": "persist"}).name
            key = client.create_crypto_key(request={"parent": ring, "crypto_key_id": "k", "crypto_key": {
                "purpose": Purpose.ASYMMETRIC_SIGN, "labels": {"owner": "me"},
                "version_template": {"algorithm": Alg.EC_SIGN_P256_SHA256}}})
            version = key.name + "/cryptoKeyVersions/1"
            deadline = time.time() + 10
            while client.get_crypto_key_version(request={"name": version}).state != State.ENABLED:
                self.assertLess(time.time(), deadline, "the version never became ENABLED")
                time.sleep(0.05)
            before = client.get_public_key(request={"name": version}).pem
            proc.terminate()
            self.assertEqual(proc.wait(timeout=10), 0)
            proc.stderr.close()
            self.assertTrue(os.path.exists(state), "SIGTERM wrote the state file")

            proc, endpoint = start_fake("--state-file", state, port=port)
            try:
                client = kms_v1.KeyManagementServiceClient(
                    transport="rest", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
                self.assertEqual(client.get_crypto_key(request={"name": key.name}).labels["owner"], "me")
                self.assertEqual(client.get_public_key(request={"name": version}).pem, before)
                digest = hashlib.sha256(b"after a restart").digest()
                sig = client.asymmetric_sign(request={"name": version, "digest": {"sha256": digest}}).signature
                public = serialization.load_pem_public_key(before.encode())
                public.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            finally:
                stop_fake(proc)


class NoBoundaryLookupCredentials(service_account.Credentials):
    """google-auth's service account credentials, minus the background Regional Access
    Boundary lookup that google-auth >= 2.61 sends to Google's IAM Credentials API: tests must
    not call out to Google."""

    def _is_regional_access_boundary_lookup_required(self):
        return False


def new_key_file(name: str, token_uri: str) -> dict:
    """A service account JSON key file with a fresh RSA key, as the IAM API hands them out."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {
        "type": "service_account", "project_id": PROJECT, "private_key_id": uuid.uuid4().hex,
        "private_key": pem, "client_email": f"{name}@{PROJECT}.iam.gserviceaccount.com",
        "client_id": str(uuid.uuid4().int)[:21], "token_uri": token_uri,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
    }


def self_signed_jwt(info: dict, signer_info: dict = None, **claims) -> str:
    """A JWT signed with signer_info's key (default: info's own), iss/sub info's email,
    `scope` cloud-platform, 1 hour; keyword arguments override claims (None removes one)."""
    signer = crypt.RSASigner.from_service_account_info(signer_info or info)
    t = int(time.time())
    payload = {"iss": info["client_email"], "sub": info["client_email"], "iat": t, "exp": t + 3600,
               "scope": CLOUD_PLATFORM}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return google_jwt.encode(signer, payload, key_id=(signer_info or info)["private_key_id"]).decode()


def unsigned_jwt(claims: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc(claims)}."


class SignedFakeTest(unittest.TestCase):
    """A fake with --require-auth and a test harness identity: a service account whose key
    file is generated here, registered with --service-account-key at start-up, and granted
    roles/owner on the project (POST /_fake/grant)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        port = free_port()
        cls.harness_info = new_key_file("test-harness", f"http://127.0.0.1:{port}/token")
        harness_file = os.path.join(cls.tmp.name, "harness.json")
        with open(harness_file, "w") as f:
            json.dump(cls.harness_info, f)
        cls.proc, cls.endpoint = start_fake("--require-auth", "--generation-delay", "0",
                                            "--service-account-key", harness_file, port=port)
        cls.grant(f"projects/{PROJECT}", "roles/owner", cls.harness_info)
        cls.admin = cls.client_for(cls.harness_info)
        cls.ring = cls.admin.create_key_ring(
            request={"parent": LOCATION, "key_ring_id": "ring-" + uuid.uuid4().hex[:8]}).name

    @classmethod
    def tearDownClass(cls):
        stop_fake(cls.proc)
        cls.tmp.cleanup()

    @classmethod
    def control(cls, path, body=None, method="POST"):
        status, out = http(cls.endpoint, method, "/_fake/" + path, body)
        assert status == 200, (path, status, out)
        return out

    @classmethod
    def grant(cls, resource, role, info):
        return cls.control("grant", {"resource": resource, "role": role,
                                     "member": "serviceAccount:" + info["client_email"]})

    @classmethod
    def client_for(cls, info):
        """Google's client with the key file's credentials (self-signed JWTs, as the client
        libraries use for service account keys)."""
        return kms_v1.KeyManagementServiceClient(
            transport="rest", credentials=NoBoundaryLookupCredentials.from_service_account_info(info),
            client_options={"api_endpoint": cls.endpoint})

    def service_account(self, name):
        """A new service account, registered with the fake (whole key file), no bindings."""
        info = new_key_file(f"{name}-{uuid.uuid4().hex[:6]}", self.endpoint + "/token")
        out = self.control("service_accounts", {"key_file": info})
        self.assertEqual(out, {"email": info["client_email"], "keyId": info["private_key_id"]})
        return info

    def call(self, method, path, token, body=None):
        return http(self.endpoint, method, path, body, {"Authorization": "Bearer " + token})

    def token_request(self, assertion, grant=JWT_BEARER):
        form = urllib.parse.urlencode({"grant_type": grant, "assertion": assertion}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.endpoint + "/token", data=form), timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def new_key(self, key_id=None):
        key = self.admin.create_crypto_key(request={
            "parent": self.ring, "crypto_key_id": key_id or "k-" + uuid.uuid4().hex[:10],
            "crypto_key": {"purpose": Purpose.ASYMMETRIC_SIGN,
                           "version_template": {"algorithm": Alg.EC_SIGN_P256_SHA256}}})
        version = key.name + "/cryptoKeyVersions/1"
        while self.admin.get_crypto_key_version(request={"name": version}).state != State.ENABLED:
            time.sleep(0.01)
        return key.name, version

    def bind(self, resource, role, info, client=None):
        """Adds a binding through the API (getIamPolicy + setIamPolicy with its etag)."""
        client = client or self.admin
        policy = client.get_iam_policy(request={"resource": resource})
        policy.bindings.append(policy_pb2.Binding(role=role, members=["serviceAccount:" + info["client_email"]]))
        client.set_iam_policy(request={"resource": resource, "policy": policy})

    def assert_denied(self, permission, resource):
        """Expects the call in the with-block to fail with Cloud KMS's IAM denial."""
        test = self

        class Expect:
            def __enter__(self):
                return self

            def __exit__(self, exc_type, exc, tb):
                test.assertIsNotNone(exc, f"expected PERMISSION_DENIED for {permission}")
                test.assertIsInstance(exc, gexc.Forbidden)
                body = exc.response.json()["error"]
                test.assertEqual((body["code"], body["status"]), (403, "PERMISSION_DENIED"))
                test.assertEqual(body["message"],
                                 f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).")
                return True

        return Expect()


class AuthTest(SignedFakeTest):
    def test_token_flow(self):
        """The OAuth2 JWT-bearer flow as google-auth runs it against the key file's token_uri."""
        path = f"/v1/{self.ring}"
        status, body = http(self.endpoint, "GET", path)
        self.assertEqual((status, body["error"]["status"]), (401, "UNAUTHENTICATED"))
        status, body = self.call("GET", path, "made-up")
        self.assertEqual((status, body["error"]["status"]), (401, "UNAUTHENTICATED"))

        info = self.service_account("token-flow")
        self.grant(self.ring, "roles/cloudkms.viewer", info)
        creds = NoBoundaryLookupCredentials.from_service_account_info(info, scopes=[CLOUD_PLATFORM])
        creds.refresh(GoogleAuthRequest())  # POST {token_uri}: assertion with aud Google's token URI
        self.assertTrue(creds.token.startswith("ya29."))
        client = kms_v1.KeyManagementServiceClient(
            transport="rest", credentials=oauth2_credentials.Credentials(creds.token),
            client_options={"api_endpoint": self.endpoint})
        self.assertEqual(client.get_key_ring(request={"name": self.ring}).name, self.ring)
        status, tokeninfo = http(self.endpoint, "GET", "/tokeninfo?access_token=" + creds.token)
        self.assertEqual((tokeninfo["email"], tokeninfo["scope"]), (info["client_email"], CLOUD_PLATFORM))
        self.assertEqual(self.control("callers", method="GET")[info["client_email"]], {"keyRings.get": 1})

        # The fake's own token URI is an accepted audience too.
        status, out = self.token_request(self_signed_jwt(info, aud=self.endpoint + "/token"))
        self.assertEqual(status, 200, out)
        status, _ = self.call("GET", path, out["access_token"])
        self.assertEqual(status, 200)

    def test_self_signed_jwt_from_googles_client(self):
        info = self.service_account("self-signed")
        self.grant(self.ring, "roles/cloudkms.viewer", info)
        client = self.client_for(info)
        self.assertEqual(client.get_key_ring(request={"name": self.ring}).name, self.ring)
        self.assertEqual(self.control("callers", method="GET")[info["client_email"]], {"keyRings.get": 1})
        # AIP-4111's other shape: aud names the service instead of a scope.
        status, _ = self.call("GET", f"/v1/{self.ring}",
                              self_signed_jwt(info, aud="https://cloudkms.googleapis.com/", scope=None))
        self.assertEqual(status, 200)

    def test_bad_credentials_are_refused(self):
        info = self.service_account("victim")
        self.grant(self.ring, "roles/cloudkms.viewer", info)
        stranger = new_key_file("stranger", self.endpoint + "/token")  # never registered
        t = int(time.time())
        bad = {
            "unsigned (alg none)": unsigned_jwt({"iss": info["client_email"], "sub": info["client_email"],
                                                 "iat": t, "exp": t + 3600, "scope": CLOUD_PLATFORM}),
            "signed by another key": self_signed_jwt(info, signer_info=dict(stranger, private_key_id=info["private_key_id"])),
            "unknown kid": self_signed_jwt(info, signer_info=stranger),
            "unregistered service account": self_signed_jwt(stranger),
            "expired": self_signed_jwt(info, iat=t - 7200, exp=t - 3600),
            "issued in the future": self_signed_jwt(info, iat=t + 3600, exp=t + 7200),
            "lifetime over an hour": self_signed_jwt(info, exp=t + 86400),
            "another service's audience": self_signed_jwt(info, aud="https://pubsub.googleapis.com/", scope=None),
            "neither aud nor scope": self_signed_jwt(info, scope=None),
            "sub is someone else": self_signed_jwt(info, sub="user@example.com"),
            "tampered claims": (lambda p: p[0] + "." + base64.urlsafe_b64encode(json.dumps(
                {"iss": info["client_email"], "sub": info["client_email"], "iat": t, "exp": t + 3599,
                 "scope": CLOUD_PLATFORM}).encode()).decode().rstrip("=") + "." + p[2])(self_signed_jwt(info).split(".")),
        }
        for case, token in bad.items():
            with self.subTest(case):
                status, body = self.call("GET", f"/v1/{self.ring}", token)
                self.assertEqual((status, body.get("error", {}).get("status")), (401, "UNAUTHENTICATED"), body)
        status, _ = self.call("GET", f"/v1/{self.ring}", self_signed_jwt(info))
        self.assertEqual(status, 200, "the same account's valid JWT works")

        # The token endpoint refuses the same assertions (and a wrong aud or missing scope).
        token_uri = self.endpoint + "/token"
        for case in ("unsigned (alg none)", "signed by another key", "expired", "unregistered service account"):
            with self.subTest("/token: " + case):
                token = bad[case] if case != "expired" else self_signed_jwt(info, aud=token_uri, iat=t - 7200, exp=t - 3600)
                status, out = self.token_request(token)
                self.assertEqual((status, out["error"]), (400, "invalid_grant"), out)
        status, out = self.token_request(self_signed_jwt(info, aud="https://example.com/token"))
        self.assertEqual((status, out["error"]), (400, "invalid_grant"))
        status, out = self.token_request(self_signed_jwt(info, aud=token_uri, scope=None))
        self.assertEqual((status, out["error"]), (400, "invalid_scope"))

        # Google's client with an unregistered key file: UNAUTHENTICATED.
        with self.assertRaises(gexc.Unauthorized):
            self.client_for(stranger).get_key_ring(request={"name": self.ring})

    def test_scopes_must_cover_cloud_kms(self):
        info = self.service_account("pubsub-scoped")
        self.grant(self.ring, "roles/cloudkms.viewer", info)
        status, body = self.call("GET", f"/v1/{self.ring}",
                                 self_signed_jwt(info, scope="https://www.googleapis.com/auth/pubsub"))
        self.assertEqual((status, body["error"]["status"]), (403, "PERMISSION_DENIED"))
        self.assertEqual(body["error"]["message"], "Request had insufficient authentication scopes.")
        status, _ = self.call("GET", f"/v1/{self.ring}",
                              self_signed_jwt(info, scope="https://www.googleapis.com/auth/cloudkms"))
        self.assertEqual(status, 200)

    def test_service_account_controls(self):
        info = new_key_file("by-public-key", self.endpoint + "/token")
        pub = serialization.load_pem_private_key(info["private_key"].encode(), None).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.control("service_accounts", {"email": info["client_email"], "public_key_pem": pub,
                                          "key_id": info["private_key_id"]})
        accounts = self.control("service_accounts", method="GET")
        self.assertEqual(accounts[info["client_email"]], [info["private_key_id"]])
        self.assertEqual(accounts[self.harness_info["client_email"]], [self.harness_info["private_key_id"]],
                         "registered at start-up by --service-account-key")
        self.grant(self.ring, "roles/cloudkms.viewer", info)
        self.assertEqual(self.client_for(info).get_key_ring(request={"name": self.ring}).name, self.ring)
        status, out = http(self.endpoint, "POST", "/_fake/service_accounts", {"email": "x@y", "public_key_pem": "junk"})
        self.assertEqual(status, 400, out)


class IamTest(SignedFakeTest):
    def test_caller_without_binding_cannot_sign(self):
        key, version = self.new_key()
        digest = hashlib.sha256(b"nobody").digest()
        nobody = self.client_for(self.service_account("nobody"))
        with self.assert_denied("cloudkms.cryptoKeyVersions.useToSign", key):
            nobody.asymmetric_sign(request={"name": version, "digest": {"sha256": digest}})
        with self.assert_denied("cloudkms.cryptoKeyVersions.viewPublicKey", version):
            nobody.get_public_key(request={"name": version})
        with self.assert_denied("cloudkms.cryptoKeys.get", key):
            nobody.get_crypto_key(request={"name": key})
        # Denied before NOT_FOUND: a caller without the permission cannot probe for resources.
        missing = self.ring + "/cryptoKeys/missing"
        with self.assert_denied("cloudkms.cryptoKeys.get", missing):
            nobody.get_crypto_key(request={"name": missing})
        with self.assertRaises(gexc.NotFound):
            self.admin.get_crypto_key(request={"name": missing})

    def test_signer_verifier_on_crypto_key(self):
        key, version = self.new_key()
        other_key, other_version = self.new_key()
        info = self.service_account("signer")
        self.bind(key, "roles/cloudkms.signerVerifier", info)
        client = self.client_for(info)
        digest = hashlib.sha256(b"signed with signerVerifier").digest()
        sig = client.asymmetric_sign(request={"name": version, "digest": {"sha256": digest},
                                              "digest_crc32c": crc32c(digest)})
        pem = client.get_public_key(request={"name": version}).pem
        FakeKmsTest.verify(pem, Alg.EC_SIGN_P256_SHA256, digest, sig.signature)
        # ... and nothing else.
        with self.assert_denied("cloudkms.cryptoKeys.create", self.ring):
            client.create_crypto_key(request={
                "parent": self.ring, "crypto_key_id": "not-mine",
                "crypto_key": {"purpose": Purpose.ASYMMETRIC_SIGN,
                               "version_template": {"algorithm": Alg.EC_SIGN_P256_SHA256}}})
        with self.assert_denied("cloudkms.cryptoKeyVersions.create", key):
            client.create_crypto_key_version(request={"parent": key, "crypto_key_version": {}})
        with self.assert_denied("cloudkms.cryptoKeys.getIamPolicy", key):
            client.get_iam_policy(request={"resource": key})
        with self.assert_denied("cloudkms.cryptoKeyVersions.destroy", version):
            client.destroy_crypto_key_version(request={"name": version})
        # The binding is on one CryptoKey, not on its neighbours.
        with self.assert_denied("cloudkms.cryptoKeyVersions.useToSign", other_key):
            client.asymmetric_sign(request={"name": other_version, "digest": {"sha256": digest}})

    def test_admin_on_key_ring_can_create(self):
        info = self.service_account("ring-admin")
        self.bind(self.ring, "roles/cloudkms.admin", info)  # a KeyRing policy, set through the API
        client = self.client_for(info)
        key = client.create_crypto_key(request={
            "parent": self.ring, "crypto_key_id": "admin-" + uuid.uuid4().hex[:8],
            "crypto_key": {"purpose": Purpose.ASYMMETRIC_SIGN,
                           "version_template": {"algorithm": Alg.EC_SIGN_P256_SHA256}}})
        v2 = client.create_crypto_key_version(request={"parent": key.name, "crypto_key_version": {}})
        self.assertEqual(len(list(client.list_crypto_key_versions(request={"parent": key.name}))), 2)
        client.update_crypto_key(request={"crypto_key": {"name": key.name, "labels": {"by": "admin"}},
                                          "update_mask": field_mask_pb2.FieldMask(paths=["labels"])})
        client.destroy_crypto_key_version(request={"name": key.name + "/cryptoKeyVersions/1"})
        client.restore_crypto_key_version(request={"name": key.name + "/cryptoKeyVersions/1"})
        # It manages IAM on its keys and reads the key ring's policy.
        self.bind(key.name, "roles/cloudkms.signerVerifier", self.harness_info, client=client)
        client.get_iam_policy(request={"resource": self.ring})
        # Admin is not a crypto role, and it was granted on this key ring only.
        while self.admin.get_crypto_key_version(request={"name": v2.name}).state != State.ENABLED:
            time.sleep(0.01)
        with self.assert_denied("cloudkms.cryptoKeyVersions.useToSign", key.name):
            client.asymmetric_sign(request={"name": v2.name, "digest": {"sha256": hashlib.sha256(b"x").digest()}})
        with self.assert_denied("cloudkms.cryptoKeyVersions.viewPublicKey", v2.name):
            client.get_public_key(request={"name": v2.name})
        with self.assert_denied("cloudkms.keyRings.create", LOCATION):
            client.create_key_ring(request={"parent": LOCATION, "key_ring_id": "not-allowed"})
        with self.assert_denied("cloudkms.keyRings.list", LOCATION):
            list(client.list_key_rings(request={"parent": LOCATION}))

    def test_key_ring_policy_needs_key_ring_permissions(self):
        info = self.service_account("ring-viewer")
        self.grant(self.ring, "roles/cloudkms.viewer", info)
        client = self.client_for(info)
        with self.assert_denied("cloudkms.keyRings.getIamPolicy", self.ring):
            client.get_iam_policy(request={"resource": self.ring})
        with self.assert_denied("cloudkms.keyRings.setIamPolicy", self.ring):
            client.set_iam_policy(request={"resource": self.ring, "policy": policy_pb2.Policy()})
        self.assertEqual(client.get_key_ring(request={"name": self.ring}).name, self.ring)

    def test_test_iam_permissions_is_exactly_the_granted_subset(self):
        key, _ = self.new_key()
        info = self.service_account("tester")
        client = self.client_for(info)

        def held(resource, c=client):
            return sorted(c.test_iam_permissions(request=iam_policy_pb2.TestIamPermissionsRequest(
                resource=resource, permissions=ALL_KMS_PERMISSIONS)).permissions)

        self.assertEqual(held(key), [], "no bindings, nothing held (and the call itself needs none)")
        self.bind(key, "roles/cloudkms.signerVerifier", info)
        self.assertEqual(held(key), ["cloudkms.cryptoKeyVersions.useToSign", "cloudkms.cryptoKeyVersions.useToVerify",
                                     "cloudkms.cryptoKeyVersions.viewPublicKey"])
        self.assertEqual(held(self.ring), [], "a CryptoKey binding grants nothing on the KeyRing")
        self.grant(self.ring, "roles/cloudkms.viewer", info)
        viewer = ["cloudkms.cryptoKeyVersions.get", "cloudkms.cryptoKeyVersions.list", "cloudkms.cryptoKeys.get",
                  "cloudkms.cryptoKeys.list", "cloudkms.keyRings.get", "cloudkms.keyRings.list"]
        self.assertEqual(held(self.ring), viewer)
        self.assertEqual(held(key), sorted(viewer + ["cloudkms.cryptoKeyVersions.useToSign",
                                                     "cloudkms.cryptoKeyVersions.useToVerify",
                                                     "cloudkms.cryptoKeyVersions.viewPublicKey"]),
                         "the KeyRing's bindings apply to its CryptoKeys")
        self.assertEqual(held(key, self.admin), sorted(ALL_KMS_PERMISSIONS), "roles/owner on the project")

    def test_project_policy_and_custom_role(self):
        key, version = self.new_key()
        role = f"projects/{PROJECT}/roles/listAndViewPublicKeys"
        self.control("roles", {"name": role, "includedPermissions": [
            "cloudkms.cryptoKeys.list", "cloudkms.cryptoKeyVersions.viewPublicKey"]})
        self.assertEqual(self.control("roles", method="GET")[role],
                         ["cloudkms.cryptoKeyVersions.viewPublicKey", "cloudkms.cryptoKeys.list"])
        info = self.service_account("custom")
        self.grant(f"projects/{PROJECT}", role, info)
        client = self.client_for(info)
        self.assertIn(key, [k.name for k in client.list_crypto_keys(request={"parent": self.ring})])
        client.get_public_key(request={"name": version})
        with self.assert_denied("cloudkms.cryptoKeys.get", key):
            client.get_crypto_key(request={"name": key})
        status, policy = http(self.endpoint, "GET", f"/_fake/iam_policy?resource=projects/{PROJECT}")
        self.assertIn({"role": role, "members": ["serviceAccount:" + info["client_email"]]}, policy["bindings"])

        # setIamPolicy takes only roles the fake can evaluate.
        for bad_role in ("roles/cloudkms.noSuchRole", "projects/other-project/roles/listAndViewPublicKeys",
                         f"projects/{PROJECT}/roles/neverMade"):
            with self.subTest(bad_role):
                policy = self.admin.get_iam_policy(request={"resource": key})
                policy.bindings.append(policy_pb2.Binding(role=bad_role, members=["serviceAccount:" + info["client_email"]]))
                with self.assertRaises(gexc.BadRequest):
                    self.admin.set_iam_policy(request={"resource": key, "policy": policy})

    def test_conditional_bindings_grant_nothing(self):
        key, version = self.new_key()
        info = self.service_account("conditional")
        policy = self.admin.get_iam_policy(request={"resource": key, "options": {"requested_policy_version": 3}})
        policy.version = 3
        policy.bindings.append(policy_pb2.Binding(
            role="roles/cloudkms.signerVerifier", members=["serviceAccount:" + info["client_email"]],
            condition={"title": "always", "expression": "true"}))
        self.admin.set_iam_policy(request={"resource": key, "policy": policy})
        with self.assert_denied("cloudkms.cryptoKeyVersions.viewPublicKey", version):
            self.client_for(info).get_public_key(request={"name": version})


if __name__ == "__main__":
    unittest.main()
