package credproxy

import "testing"

// StoreSuite is credproxytest.TestStore, which suites_test.go (package
// credproxy_test) sets at init: credproxytest imports this package, so
// this package's own tests cannot import it, and the keyring backends'
// conformance tests (keyringstore_test.go) need helpers of this package.
var StoreSuite func(t *testing.T, newStore func(t *testing.T) Store)
