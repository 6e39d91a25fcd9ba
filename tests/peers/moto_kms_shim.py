"""Starts moto's server with four corrections to its KMS model, so that signatures made
through it are the ones AWS KMS would make (see shared test-peers notes):

1. Sign honours MessageType=DIGEST: the message is a pre-hashed digest, never hashed again,
   and a digest of the wrong length is a ValidationException.
2. RSASSA_PSS uses a salt as long as the hash (AWS), not the maximum.
3. Sign refuses Disabled keys (DisabledException) and PendingDeletion keys
   (KMSInvalidStateException).
4. GetPublicKey returns KeySpec (moto only returns the deprecated CustomerMasterKeySpec).
5. ScheduleKeyDeletion, CancelKeyDeletion, EnableKey and DisableKey accept a key ARN, as
   AWS does (moto looks the ARN up as a bare key id and fails with HTTP 500).
6. ScheduleKeyDeletion enforces AWS's 7-30 day window (moto silently ignores others).
7. ListAliases pages like AWS: `Limit` (1-100, default 50), `NextMarker`/`Truncated`
   (moto returns every alias at once, which hides pagination bugs).
8. CreateAlias and UpdateAlias are atomic, as in AWS: moto checks that an alias name is
   free and then adds it, and its server runs requests on threads, so two concurrent
   CreateAlias of one name could both succeed (the shared-keys mode's rotation lock relies
   on exactly one succeeding).

With `--state-file PATH` (anywhere on the command line), the KMS state (keys with their private key material,
aliases, tags) is loaded from PATH at start-up if it exists and written to it on SIGTERM, so
that a test can restart the peer and find the same keys, as a restarted AWS KMS would.

Usage: python moto_kms_shim.py [--state-file PATH] -H 127.0.0.1 -p PORT
"""

import base64
import copyreg
import json
import os
import pickle
import sys
import threading

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from moto.core.exceptions import JsonRESTError
from moto.kms import models, responses
from moto.kms.exceptions import ValidationException

HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def _blob(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return base64.b64decode(value)


def sign(self):
    key_id = self._get_param("KeyId")
    message = _blob(self._get_param("Message") or b"")
    message_type = self._get_param("MessageType") or "RAW"
    algorithm = self._get_param("SigningAlgorithm")
    self._validate_key_id(key_id)
    key = self.kms_backend.describe_key(key_id)
    if key.key_state == "Disabled":
        raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
    if key.key_state != "Enabled":
        raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is {key.key_state}.")
    if key.key_usage != "SIGN_VERIFY" or algorithm not in key.signing_algorithms:
        raise ValidationException(
            f"1 validation error detected: Value '{algorithm}' at 'SigningAlgorithm' "
            f"is not valid for key {key.arn} (valid: {key.signing_algorithms})"
        )
    if not message:
        raise ValidationException("Message must have length greater than or equal to 1")
    hash_algorithm = HASHES[algorithm.rsplit("_", 1)[1]]()
    if message_type == "DIGEST":
        if len(message) != hash_algorithm.digest_size:
            raise ValidationException(
                f"Digest is {len(message)} bytes; {algorithm} needs {hash_algorithm.digest_size}"
            )
        chosen = utils.Prehashed(hash_algorithm)
    else:
        chosen = hash_algorithm
    private = key.private_key.private_key
    if algorithm.startswith("ECDSA"):
        signature = private.sign(message, ec.ECDSA(chosen))
    elif algorithm.startswith("RSASSA_PSS"):
        pss = padding.PSS(
            mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size
        )
        signature = private.sign(message, pss, chosen)
    else:
        signature = private.sign(message, padding.PKCS1v15(), chosen)
    return json.dumps(
        {
            "KeyId": key.arn,
            "Signature": base64.b64encode(signature).decode(),
            "SigningAlgorithm": algorithm,
        }
    )


_get_public_key = responses.KmsResponse.get_public_key


def get_public_key(self):
    body = json.loads(_get_public_key(self))
    body.setdefault("KeySpec", body.get("CustomerMasterKeySpec"))
    return json.dumps(body)


def _accept_arn(method):
    def wrapper(self, key_id, *args, **kwargs):
        if isinstance(key_id, str) and key_id.startswith("arn:"):
            key_id = key_id.rsplit("/", 1)[-1]
        return method(self, key_id, *args, **kwargs)

    return wrapper


def _check_window(method):
    def wrapper(self, key_id, pending_window_in_days, *args, **kwargs):
        if not 7 <= int(pending_window_in_days) <= 30:
            raise ValidationException("PendingWindowInDays must be between 7 and 30")
        return method(self, key_id, pending_window_in_days, *args, **kwargs)

    return wrapper


for _name in ("schedule_key_deletion", "cancel_key_deletion", "enable_key", "disable_key"):
    setattr(models.KmsBackend, _name, _accept_arn(getattr(models.KmsBackend, _name)))
models.KmsBackend.schedule_key_deletion = _check_window(models.KmsBackend.schedule_key_deletion)
_list_aliases = responses.KmsResponse.list_aliases


def list_aliases(self):
    body = json.loads(_list_aliases(self))
    aliases = body.get("Aliases", [])
    limit = int(self._get_param("Limit") or 50)
    if not 1 <= limit <= 100:
        raise ValidationException("Limit must be between 1 and 100")
    start = int(self._get_param("Marker") or 0)
    page = aliases[start : start + limit]
    result = {"Aliases": page, "Truncated": start + limit < len(aliases)}
    if result["Truncated"]:
        result["NextMarker"] = str(start + limit)
    return json.dumps(result)


responses.KmsResponse.list_aliases = list_aliases

_ALIAS_LOCK = threading.Lock()
_set_alias = responses.KmsResponse._set_alias


def set_alias(self, update=False):
    with _ALIAS_LOCK:
        return _set_alias(self, update)


responses.KmsResponse._set_alias = set_alias
responses.KmsResponse.sign = sign
responses.KmsResponse.get_public_key = get_public_key

def _load_private_key(der):
    return serialization.load_der_private_key(der, None)


def _reduce_private_key(key):
    # cryptography's key objects do not pickle; their PKCS#8 DER does.
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _load_private_key, (der,)


def _key_types():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return {
        type(ec.generate_private_key(ec.SECP256R1())),
        type(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    }


def _persist(path, server):
    """Loads the KMS backends' state from path, and writes it there on SIGTERM."""
    for cls in _key_types():
        copyreg.pickle(cls, _reduce_private_key)
    if os.path.exists(path):
        with open(path, "rb") as f:
            saved = pickle.load(f)
        for (account, region), state in saved.items():
            models.kms_backends[account][region].__dict__.update(state)
        print(f"moto_kms_shim: loaded {len(saved)} KMS region(s) from {path}", file=sys.stderr, flush=True)

    def save(_signum, _frame):
        state = {}
        for account, regions in dict.items(models.kms_backends):
            for region, backend in dict.items(regions):
                state[(account, region)] = backend.__dict__
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, path)
        print(f"moto_kms_shim: saved {len(state)} KMS region(s) to {path}", file=sys.stderr, flush=True)
        os._exit(0)

    # moto's main() installs its own SIGTERM handler by this name: make it ours.
    server.signal_handler = save


if __name__ == "__main__":
    from moto import server

    args = sys.argv[1:]
    # Ours, not moto's: taken out wherever it stands, since moto's parser would refuse it.
    if "--state-file" in args:
        at = args.index("--state-file")
        if at + 1 >= len(args):
            sys.exit("moto_kms_shim: --state-file needs a path")
        _persist(args[at + 1], server)
        del args[at : at + 2]
    server.main(args)
