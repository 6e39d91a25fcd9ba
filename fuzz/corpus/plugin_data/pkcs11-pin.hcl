backend = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
slot = 0
pin = "fuzzPin12345678"
key_identifier_value = "hsm-a"
label_prefix = "spire"
