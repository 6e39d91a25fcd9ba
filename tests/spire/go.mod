module github.com/kms-keymanager/kms-keymanager/tests/spire

go 1.26

require github.com/spiffe/spire v1.15.3
