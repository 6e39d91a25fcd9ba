backend = "hashicorp_vault"
vault_addr = "http://127.0.0.1:8200/"
key_identifier_value = "srv-a"
transit_engine_path = "transit"
token_auth {
  token = "s.fuzzTokenValue42"
}
