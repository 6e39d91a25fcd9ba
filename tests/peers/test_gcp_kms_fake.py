"""Drives tests/peers/gcp_kms_fake.py with Google's official Python client (google-cloud-kms,
REST transport), so the fake's wire format is checked against the real one, and verifies
every signature with `cryptography`, independently of the fake.

Run: $HOME/.cache/kms-keymanager/venv-gcp/bin/python -m unittest -v tests/peers/test_gcp_kms_fake.py
(the venv holds tests/peers/requirements-gcp.txt).
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
from google.auth.credentials import AnonymousCredentials
from google.cloud import kms_v1
from google.iam.v1 import iam_policy_pb2, policy_pb2
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


def start_fake(*args):
    port = free_port()
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


class AuthTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proc, cls.endpoint = start_fake("--require-auth", "--generation-delay", "0")

    @classmethod
    def tearDownClass(cls):
        stop_fake(cls.proc)

    @staticmethod
    def jwt(claims):
        enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
        return f"{enc({'alg': 'RS256', 'typ': 'JWT'})}.{enc(claims)}.c2ln"

    def test_token_flow(self):
        path = f"/v1/{LOCATION}/keyRings?keyRingId=auth"
        status, body = http(self.endpoint, "POST", path, {})
        self.assertEqual((status, body["error"]["status"]), (401, "UNAUTHENTICATED"))
        status, body = http(self.endpoint, "POST", path, {}, {"Authorization": "Bearer made-up"})
        self.assertEqual(status, 401)

        assertion = self.jwt({"iss": "sa@p.iam.gserviceaccount.com", "aud": self.endpoint + "/token",
                              "exp": int(time.time()) + 3600, "iat": int(time.time())})
        form = urllib.parse.urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                       "assertion": assertion}).encode()
        with urllib.request.urlopen(urllib.request.Request(self.endpoint + "/token", data=form)) as r:
            token = json.loads(r.read())
        self.assertEqual(token["token_type"], "Bearer")
        self.assertGreater(token["expires_in"], 0)
        status, body = http(self.endpoint, "POST", path, {}, {"Authorization": "Bearer " + token["access_token"]})
        self.assertEqual(status, 200, body)
        status, info = http(self.endpoint, "GET", "/tokeninfo?access_token=" + token["access_token"])
        self.assertEqual(info["email"], "sa@p.iam.gserviceaccount.com")

        self_signed = self.jwt({"iss": "other@p.iam.gserviceaccount.com", "sub": "other@p.iam.gserviceaccount.com"})
        status, body = http(self.endpoint, "GET", f"/v1/{LOCATION}/keyRings/auth", headers={"Authorization": "Bearer " + self_signed})
        self.assertEqual(status, 200, body)
        status, callers = http(self.endpoint, "GET", "/_fake/callers")
        self.assertEqual(callers["sa@p.iam.gserviceaccount.com"], {"keyRings.create": 1})
        self.assertEqual(callers["other@p.iam.gserviceaccount.com"], {"keyRings.get": 1})


if __name__ == "__main__":
    unittest.main()
