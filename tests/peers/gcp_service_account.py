"""Test helper for the Cloud KMS fake: writes a service account key file (a fresh RSA-2048
key, the same JSON shape Google issues) and optionally registers it with a running fake and
creates a key ring there.

Usage: python gcp_service_account.py FAKE_URL EMAIL OUT_FILE [--register] [--key-ring RING]
"""

import argparse
import json
import os
import urllib.request

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def control(url: str, name: str, body: dict) -> None:
    request = urllib.request.Request(
        f"{url}/_fake/{name}", data=json.dumps(body).encode(),
        headers={"content-type": "application/json"}, method="POST")
    urllib.request.urlopen(request).read()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("email")
    parser.add_argument("out")
    parser.add_argument("--register", action="store_true")
    parser.add_argument("--key-ring")
    args = parser.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    key_file = {
        "type": "service_account",
        "project_id": args.email.split("@")[1].split(".")[0],
        "private_key_id": os.urandom(8).hex(),
        "private_key": pem,
        "client_email": args.email,
        "client_id": "1",
        "token_uri": f"{args.url}/token",
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(key_file, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, args.out)
    if args.register:
        control(args.url, "service_accounts", {"key_file": key_file})
    if args.key_ring:
        control(args.url, "seed", {"keyRing": args.key_ring, "count": 0})


if __name__ == "__main__":
    main()
