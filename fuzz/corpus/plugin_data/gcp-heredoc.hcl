backend = "gcp_kms"
key_ring = "projects/p/locations/global/keyRings/r"
key_identifier_value = "srv_1"
key_policy_file = <<EOT
{"bindings": []}
EOT
shared_keys {
  crypto_key_template = "spire-{{ .TrustDomain }}-{{ .KeyID }}"
  key_id_extraction_regex = "^spire-[^-]+-(.+)$"
  shared_key_ids = ["JWT-Signer-A", "JWT-Signer-B"]
  reuse_window = "1h"
  lock_lease = "30s"
}
