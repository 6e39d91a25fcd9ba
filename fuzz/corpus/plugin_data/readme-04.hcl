backend             = "hashicorp_vault"
vault_addr          = "https://vault.example.org:8200"
ca_cert_path        = "/opt/spire/conf/server/vault-ca.pem"
key_identifier_file = "/opt/spire/data/server/vault_server_id"
liveness_kv_mount   = "secret"
approle_auth {
    approle_id        = "<role id>"
    approle_secret_id = "<secret id>"
}
