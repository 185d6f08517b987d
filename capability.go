package credproxy

import (
	"crypto/sha256"
	"crypto/subtle"
	"os"
	"strconv"
	"sync"
)

// A session's capability token is 32 bytes from crypto/rand in lowercase
// hex. The server keeps its SHA-256 digest and compares digests in
// constant time, so neither the comparison's time nor the token's length
// tells a guesser anything.
const capabilityTokenLen = 64

func capabilityDigest(token string) [32]byte { return sha256.Sum256([]byte(token)) }

// accepts reports whether a handshake that presented token (ok: it
// presented one) may use the session.
func (ss *Session) accepts(token string, ok bool) bool {
	d := capabilityDigest(token)
	return subtle.ConstantTimeCompare(d[:], ss.digest[:]) == 1 && ok
}

// envCapability is the capability token a process was handed, read once
// from the descriptor named by CapabilityFDEnv and kept for the clients
// the process makes later.
var envCapability struct {
	mu    sync.Mutex
	token Secret
}

// capabilityFromEnv returns the capability token handed to this process:
// if CapabilityFDEnv is set, it reads the token from descriptor 3, closes
// the descriptor and unsets the variable; otherwise it returns the token
// read earlier, or "" if there is none.
func capabilityFromEnv() (Secret, error) {
	envCapability.mu.Lock()
	defer envCapability.mu.Unlock()
	v := os.Getenv(CapabilityFDEnv)
	if v == "" {
		return envCapability.token, nil
	}
	os.Unsetenv(CapabilityFDEnv)
	if v != strconv.Itoa(capabilityFD) {
		return "", errorf("%s is %q, but a capability token is handed over on file descriptor 3 only", CapabilityFDEnv, v)
	}
	data, err := readCapabilityFD()
	if err != nil {
		return "", err
	}
	token, err := parseCapabilityToken(data)
	if err != nil {
		return "", err
	}
	envCapability.token = token
	return token, nil
}

// parseCapabilityToken checks what a launcher handed over: exactly 64
// lowercase hex characters and a newline. Errors never quote it.
func parseCapabilityToken(data []byte) (Secret, error) {
	const want = "64 lowercase hex characters and a newline"
	switch {
	case len(data) == 0:
		return "", errorf("file descriptor 3 holds no capability token (another process may have read it already); the launcher must write %s", want)
	case len(data) != capabilityTokenLen+1 || data[capabilityTokenLen] != '\n':
		return "", errorf("file descriptor 3 holds %d bytes, not a capability token: %s", len(data), want)
	}
	for _, c := range data[:capabilityTokenLen] {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return "", errorf("file descriptor 3 does not hold a capability token: want %s", want)
		}
	}
	return Secret(data[:capabilityTokenLen]), nil
}
