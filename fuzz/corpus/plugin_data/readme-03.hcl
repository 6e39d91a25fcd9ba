backend             = "gcp_kms"
key_ring            = "projects/my-project/locations/europe-west1/keyRings/spire"
key_identifier_file = "/opt/spire/data/server/kms_server_id"
# Optional: several servers (any region) sign JWTs with the same keys.
shared_keys {
    crypto_key_template     = "spire-key-{{ .TrustDomain }}-{{ .KeyID }}"
    key_id_extraction_regex = "^spire-key-[^-]+-(.+)$"
}
