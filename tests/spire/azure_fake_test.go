package spire_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"github.com/stretchr/testify/require"
)

// The Azure Key Vault fake driven by Microsoft's Go SDK (azkeys + azidentity) with default
// options, as SPIRE's built-in azure_key_vault uses it: DefaultAzureCredential through the
// App Service managed identity environment, challenge-resource verification on, the fake's
// CA trusted through SSL_CERT_FILE (TestMain). Signatures are verified with crypto/ecdsa and
// crypto/rsa against the public key the fake returned.

func azureSDKClient(t *testing.T, fake *azureKeyVaultFake) *azkeys.Client {
	t.Helper()
	fake.UseManagedIdentity(t)
	cred, err := azidentity.NewDefaultAzureCredential(nil)
	require.NoError(t, err)
	client, err := azkeys.NewClient(fake.VaultURL, cred, nil)
	require.NoError(t, err)
	return client
}

// jwkPublicKey rebuilds the public key of a JWK the SDK decoded.
func jwkPublicKey(t *testing.T, jwk *azkeys.JSONWebKey) crypto.PublicKey {
	t.Helper()
	switch *jwk.Kty {
	case azkeys.KeyTypeEC, azkeys.KeyTypeECHSM:
		curves := map[azkeys.CurveName]elliptic.Curve{azkeys.CurveNameP256: elliptic.P256(), azkeys.CurveNameP384: elliptic.P384()}
		curve, ok := curves[*jwk.Crv]
		require.True(t, ok, "curve %s", *jwk.Crv)
		return &ecdsa.PublicKey{Curve: curve, X: new(big.Int).SetBytes(jwk.X), Y: new(big.Int).SetBytes(jwk.Y)}
	case azkeys.KeyTypeRSA, azkeys.KeyTypeRSAHSM:
		return &rsa.PublicKey{N: new(big.Int).SetBytes(jwk.N), E: int(new(big.Int).SetBytes(jwk.E).Int64())}
	}
	t.Fatalf("unexpected kty %s", *jwk.Kty)
	return nil
}

func requireAzureError(t *testing.T, err error, status int, code string) {
	t.Helper()
	var re *azcore.ResponseError
	require.True(t, errors.As(err, &re), "want an azcore.ResponseError, got %v", err)
	require.Equal(t, status, re.StatusCode, "%v", err)
	require.Equal(t, code, re.ErrorCode, "%v", err)
}

func TestAzureFakeWithGoSDK(t *testing.T) {
	fake := startAzureKeyVaultFake(t, "--page-size", "5")
	client := azureSDKClient(t, fake)
	tags := map[string]*string{"spire-server-td": to.Ptr("example.org"), "spire-server-id": to.Ptr("go-sdk")}
	ops := []*azkeys.KeyOperation{to.Ptr(azkeys.KeyOperationSign), to.Ptr(azkeys.KeyOperationVerify)}

	ecKey, err := client.CreateKey(ctx, "go-ec", azkeys.CreateKeyParameters{
		Kty: to.Ptr(azkeys.KeyTypeEC), Curve: to.Ptr(azkeys.CurveNameP256), KeyOps: ops, Tags: tags}, nil)
	require.NoError(t, err)
	require.Equal(t, "go-sdk", *ecKey.Tags["spire-server-id"])
	rsaKey, err := client.CreateKey(ctx, "go-rsa", azkeys.CreateKeyParameters{
		Kty: to.Ptr(azkeys.KeyTypeRSA), KeySize: to.Ptr(int32(2048)), KeyOps: ops, Tags: tags}, nil)
	require.NoError(t, err)
	require.Len(t, rsaKey.Key.N, 256)
	require.GreaterOrEqual(t, fake.Stats(t)["token_app_service"], 1, "the token came from the managed identity endpoint")

	t.Run("list pager follows nextLink", func(t *testing.T) {
		for i := range 10 {
			_, err := client.CreateKey(ctx, fmt.Sprintf("go-page-%02d", i), azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeEC)}, nil)
			require.NoError(t, err)
		}
		fake.ResetStats(t)
		names := map[string]map[string]*string{}
		pager := client.NewListKeyPropertiesPager(nil)
		for pager.More() {
			page, err := pager.NextPage(ctx)
			require.NoError(t, err)
			require.LessOrEqual(t, len(page.Value), 5)
			for _, item := range page.Value {
				require.Empty(t, item.KID.Version(), "list items carry no version")
				names[item.KID.Name()] = item.Tags
			}
		}
		require.Len(t, names, 12)
		require.Equal(t, "example.org", *names["go-ec"]["spire-server-td"])
		require.Equal(t, 3, fake.Stats(t)["list"], "12 keys, 5 a page")
	})

	t.Run("GetKey with an empty version is the latest", func(t *testing.T) {
		second, err := client.CreateKey(ctx, "go-ec-versions", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeEC)}, nil)
		require.NoError(t, err)
		_, err = client.CreateKey(ctx, "go-ec-versions", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeEC)}, nil)
		require.NoError(t, err)
		latest, err := client.GetKey(ctx, "go-ec-versions", "", nil)
		require.NoError(t, err)
		require.NotEqual(t, second.Key.KID.Version(), latest.Key.KID.Version())
		old, err := client.GetKey(ctx, "go-ec-versions", second.Key.KID.Version(), nil)
		require.NoError(t, err)
		require.Equal(t, *second.Key.KID, *old.Key.KID)
	})

	t.Run("UpdateKey bumps updated and keeps tags", func(t *testing.T) {
		time.Sleep(1100 * time.Millisecond)
		updated, err := client.UpdateKey(ctx, "go-ec", ecKey.Key.KID.Version(), azkeys.UpdateKeyParameters{KeyOps: ops}, nil)
		require.NoError(t, err)
		require.True(t, updated.Attributes.Updated.After(*ecKey.Attributes.Updated))
		require.Equal(t, "go-sdk", *updated.Tags["spire-server-id"])
	})

	t.Run("Sign ES256 verifies with crypto/ecdsa", func(t *testing.T) {
		digest := sha256.Sum256([]byte("go sdk ES256"))
		sig, err := client.Sign(ctx, "go-ec", "", azkeys.SignParameters{Algorithm: to.Ptr(azkeys.SignatureAlgorithmES256), Value: digest[:]}, nil)
		require.NoError(t, err)
		require.Len(t, sig.Result, 64, "raw r||s")
		pub := jwkPublicKey(t, ecKey.Key).(*ecdsa.PublicKey)
		r, s := new(big.Int).SetBytes(sig.Result[:32]), new(big.Int).SetBytes(sig.Result[32:])
		require.True(t, ecdsa.Verify(pub, digest[:], r, s))
		require.False(t, ecdsa.Verify(pub, make([]byte, 32), r, s))
	})

	t.Run("Sign PS256 and RS256 verify with crypto/rsa", func(t *testing.T) {
		digest := sha256.Sum256([]byte("go sdk RSA"))
		pub := jwkPublicKey(t, rsaKey.Key).(*rsa.PublicKey)
		pss, err := client.Sign(ctx, "go-rsa", rsaKey.Key.KID.Version(), azkeys.SignParameters{Algorithm: to.Ptr(azkeys.SignatureAlgorithmPS256), Value: digest[:]}, nil)
		require.NoError(t, err)
		require.NoError(t, rsa.VerifyPSS(pub, crypto.SHA256, digest[:], pss.Result, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}),
			"PSS with salt = hash length")
		pkcs1, err := client.Sign(ctx, "go-rsa", "", azkeys.SignParameters{Algorithm: to.Ptr(azkeys.SignatureAlgorithmRS256), Value: digest[:]}, nil)
		require.NoError(t, err)
		require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], pkcs1.Result))
	})

	t.Run("errors", func(t *testing.T) {
		_, err := client.Sign(ctx, "go-ec", "", azkeys.SignParameters{Algorithm: to.Ptr(azkeys.SignatureAlgorithmES256), Value: make([]byte, 20)}, nil)
		requireAzureError(t, err, http.StatusBadRequest, "BadParameter")
		_, err = client.GetKey(ctx, "go-missing", "", nil)
		requireAzureError(t, err, http.StatusNotFound, "KeyNotFound")
		_, err = client.CreateKey(ctx, "go_underscore", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeEC)}, nil)
		requireAzureError(t, err, http.StatusBadRequest, "BadParameter")
		_, err = client.UpdateKey(ctx, "go-rsa", "", azkeys.UpdateKeyParameters{KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(false)}}, nil)
		require.NoError(t, err)
		_, err = client.Sign(ctx, "go-rsa", "", azkeys.SignParameters{Algorithm: to.Ptr(azkeys.SignatureAlgorithmRS256), Value: make([]byte, 32)}, nil)
		requireAzureError(t, err, http.StatusForbidden, "Forbidden")
	})

	t.Run("DeleteKey soft-deletes", func(t *testing.T) {
		deleted, err := client.DeleteKey(ctx, "go-ec", nil)
		require.NoError(t, err)
		require.NotNil(t, deleted.RecoveryID)
		require.NotNil(t, deleted.ScheduledPurgeDate)
		_, err = client.GetKey(ctx, "go-ec", "", nil)
		requireAzureError(t, err, http.StatusNotFound, "KeyNotFound")
		_, err = client.CreateKey(ctx, "go-ec", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeEC)}, nil)
		requireAzureError(t, err, http.StatusConflict, "Conflict")
		got, err := client.GetDeletedKey(ctx, "go-ec", nil)
		require.NoError(t, err)
		require.Equal(t, *ecKey.Key.KID, *got.Key.KID)
		_, deletedKeys := fake.State(t)
		require.Len(t, deletedKeys, 1)
		require.Equal(t, "go-ec", deletedKeys[0].Name)
	})

	t.Run("429 with Retry-After is retried", func(t *testing.T) {
		fake.ResetStats(t)
		fake.Faults(t, azureFault{Op: "get", Status: http.StatusTooManyRequests, RetryAfter: to.Ptr(1), Count: 1})
		start := time.Now()
		_, err := client.GetKey(ctx, "go-rsa", "", nil)
		require.NoError(t, err)
		require.GreaterOrEqual(t, time.Since(start), 900*time.Millisecond)
		require.Equal(t, 2, fake.Stats(t)["get"])
	})

	t.Run("a revoked token is replaced after a claims challenge", func(t *testing.T) {
		fake.ResetStats(t)
		fake.ExpireTokens(t, "cae")
		_, err := client.GetKey(ctx, "go-rsa", "", nil)
		require.NoError(t, err)
		stats := fake.Stats(t)
		require.Equal(t, 1, stats["token"], "one new token")
		require.Equal(t, 1, stats["unauthorized"], "one claims challenge")
	})

	t.Run("RBAC denial", func(t *testing.T) {
		fake.Deny(t, "get")
		_, err := client.GetKey(ctx, "go-rsa", "", nil)
		requireAzureError(t, err, http.StatusForbidden, "Forbidden")
		fake.Deny(t)
		_, err = client.GetKey(ctx, "go-rsa", "", nil)
		require.NoError(t, err)
	})
}

// ClientSecretCredential through the fake's Entra endpoint (AZURE_AUTHORITY_HOST). Instance
// discovery must be off: MSAL otherwise asks login.microsoftonline.com about any authority
// host it does not know, which SPIRE's built-in cannot turn off (it passes nil options).
func TestAzureFakeClientSecretCredential(t *testing.T) {
	fake := startAzureKeyVaultFake(t, "--client", "go-app:"+planted("azure-go-app-secret"))
	fake.UseManagedIdentity(t)
	t.Setenv("AZURE_AUTHORITY_HOST", fake.AuthorityHost)
	options := &azidentity.ClientSecretCredentialOptions{DisableInstanceDiscovery: true}
	cred, err := azidentity.NewClientSecretCredential(fake.Tenant, "go-app", planted("azure-go-app-secret"), options)
	require.NoError(t, err)
	client, err := azkeys.NewClient(fake.VaultURL, cred, nil)
	require.NoError(t, err)
	_, err = client.CreateKey(ctx, "go-secret-key", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeEC)}, nil)
	require.NoError(t, err)
	require.Equal(t, 1, fake.Stats(t)["token_entra"])

	// The same authority through an explicit cloud configuration, and a wrong secret.
	options = &azidentity.ClientSecretCredentialOptions{DisableInstanceDiscovery: true,
		ClientOptions: azcore.ClientOptions{Cloud: cloud.Configuration{ActiveDirectoryAuthorityHost: fake.AuthorityHost}}}
	wrong, err := azidentity.NewClientSecretCredential(fake.Tenant, "go-app", planted("azure-wrong-secret"), options)
	require.NoError(t, err)
	client, err = azkeys.NewClient(fake.VaultURL, wrong, nil)
	require.NoError(t, err)
	_, err = client.GetKey(ctx, "go-secret-key", "", nil)
	require.ErrorContains(t, err, "AADSTS7000215")
}
