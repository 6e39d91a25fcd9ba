backend             = "azure_key_vault"
key_vault_uri       = "https://spire-prod.vault.azure.net"
key_identifier_file = "/opt/spire/data/server/azure_server_id"
# no credentials here: workload identity or managed identity from the environment
