//go:build !unix

package credproxy

import (
	"errors"
	"runtime"
)

// readCapabilityFD fails: there are no inherited descriptors to read here.
func readCapabilityFD() ([]byte, error) {
	return nil, errorf("%s is set, but handing a capability token over on a file descriptor is not supported on %s: %w",
		CapabilityFDEnv, runtime.GOOS, errors.ErrUnsupported)
}
