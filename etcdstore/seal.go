package etcdstore

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
)

// A sealed value is one format byte followed by what
// cipher.NewGCMWithRandomNonce seals: a random 96-bit nonce, the ciphertext
// and the 16-byte tag. The associated data is aadLabel followed by the
// item's full etcd key, so a value opens only under the key it was sealed
// for. A later format (for a rotated data key, say) takes the next byte.
const (
	formatV1 byte = 1
	aadLabel      = "credproxy etcdstore v1\x00"
)

// sealer seals and opens values with one data key. It is safe for
// concurrent use: a cipher.AEAD from the standard library is.
type sealer struct {
	aead cipher.AEAD
}

func newSealer(key []byte) (*sealer, error) {
	if len(key) != DataKeySize {
		return nil, fmt.Errorf("credproxy: etcdstore: Options.DataKey is %d bytes, want %d", len(key), DataKeySize)
	}
	// aes.NewCipher keeps its own copy of the key schedule; the caller's
	// slice is not retained.
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("credproxy: etcdstore: data key: %w", err)
	}
	// A random nonce is safe for 2^32 seals per key, far beyond what a
	// credential store writes between rotations.
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		return nil, fmt.Errorf("credproxy: etcdstore: data key: %w", err)
	}
	return &sealer{aead: aead}, nil
}

func aad(name string) []byte { return append([]byte(aadLabel), name...) }

// seal returns plaintext sealed for the etcd key name.
func (s *sealer) seal(name string, plaintext []byte) []byte {
	out := make([]byte, 1, 1+len(plaintext)+s.aead.Overhead())
	out[0] = formatV1
	return s.aead.Seal(out, nil, plaintext, aad(name))
}

// open returns the plaintext of a value read from the etcd key name, or an
// error wrapping ErrUnseal that names the key (never the content).
func (s *sealer) open(name string, sealed []byte) ([]byte, error) {
	if len(sealed) < 1+s.aead.Overhead() {
		return nil, fmt.Errorf("%w: %s: value too short (%d bytes)", ErrUnseal, name, len(sealed))
	}
	if sealed[0] != formatV1 {
		return nil, fmt.Errorf("%w: %s: unknown format %d", ErrUnseal, name, sealed[0])
	}
	pt, err := s.aead.Open(nil, nil, sealed[1:], aad(name))
	if err != nil {
		// GCM's only failure is the tag: it says nothing more than ErrUnseal.
		return nil, fmt.Errorf("%w: %s", ErrUnseal, name)
	}
	return pt, nil
}
