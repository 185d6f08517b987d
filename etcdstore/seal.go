package etcdstore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// A sealed value is one format byte followed by the format's fields; the
// associated data (AD) binds the item's full etcd key, so a value opens
// only under the key it was sealed for.
//
//   - Format 1 (written before data keys could rotate): nonce ‖ ciphertext
//     ‖ tag, as cipher.NewGCMWithRandomNonce seals; AD = aadLabel ‖ key.
//     It does not say which data key sealed it, so opening tries each.
//   - Format 2 (written now): key id ‖ nonce ‖ ciphertext ‖ tag; AD =
//     aadLabelV2 ‖ key id ‖ key. The key id (see [DataKeyID]) names the
//     data key that opens the value, so a store knows at once whether it
//     has that key, and [EtcdStore.Reseal] which values are not sealed with
//     the current one. The id is in the AD too, so a value whose id was
//     swapped does not open. The labels differ, so a value of one format
//     never opens as the other.
const (
	formatV1   byte = 1
	formatV2   byte = 2
	aadLabel        = "credproxy etcdstore v1\x00"
	aadLabelV2      = "credproxy etcdstore v2\x00"
	keyIDLabel      = "credproxy etcdstore key id v1"
	keyIDSize       = 8
)

// DataKeyID returns the id that values sealed with key carry, in hex: the
// first 8 bytes of SHA-256("credproxy etcdstore key id v1" ‖ key). It names
// a key without revealing it, so an operator can tell which of the old keys
// an [ErrUnseal] error asks for.
func DataKeyID(key []byte) string {
	id := keyID(key)
	return hex.EncodeToString(id[:])
}

func keyID(key []byte) [keyIDSize]byte {
	sum := sha256.Sum256(append([]byte(keyIDLabel), key...))
	return [keyIDSize]byte(sum[:keyIDSize])
}

// dataKey is one data key, ready to seal or open.
type dataKey struct {
	id   [keyIDSize]byte
	aead cipher.AEAD
}

// sealer seals with the current data key and opens with it or any old
// one. It is safe for concurrent use: a cipher.AEAD from the standard
// library is.
type sealer struct {
	current dataKey
	old     []dataKey // Options.OldDataKeys, without the current key
}

func newSealer(key []byte, old ...[]byte) (*sealer, error) {
	cur, err := newDataKey("Options.DataKey", key)
	if err != nil {
		return nil, err
	}
	s := &sealer{current: cur}
	for i, k := range old {
		dk, err := newDataKey(fmt.Sprintf("Options.OldDataKeys[%d]", i), k)
		if err != nil {
			return nil, err
		}
		// The current key among the old ones (a configuration left as it
		// was after a rotation) is harmless; keep it once.
		if dk.id != cur.id {
			s.old = append(s.old, dk)
		}
	}
	return s, nil
}

func newDataKey(field string, key []byte) (dataKey, error) {
	if len(key) != DataKeySize {
		return dataKey{}, fmt.Errorf("credproxy: etcdstore: %s is %d bytes, want %d", field, len(key), DataKeySize)
	}
	// aes.NewCipher keeps its own copy of the key schedule; the caller's
	// slice is not retained.
	block, err := aes.NewCipher(key)
	if err != nil {
		return dataKey{}, fmt.Errorf("credproxy: etcdstore: %s: %w", field, err)
	}
	// A random nonce is safe for 2^32 seals per key, far beyond what a
	// credential store writes between rotations.
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		return dataKey{}, fmt.Errorf("credproxy: etcdstore: %s: %w", field, err)
	}
	return dataKey{id: keyID(key), aead: aead}, nil
}

func aad(name string) []byte { return append([]byte(aadLabel), name...) }

func aadV2(id [keyIDSize]byte, name string) []byte {
	return append(append([]byte(aadLabelV2), id[:]...), name...)
}

// seal returns plaintext sealed, in format 2 with the current data key,
// for the etcd key name.
func (s *sealer) seal(name string, plaintext []byte) []byte {
	k := s.current
	out := make([]byte, 1+keyIDSize, 1+keyIDSize+len(plaintext)+k.aead.Overhead())
	out[0] = formatV2
	copy(out[1:], k.id[:])
	return k.aead.Seal(out, nil, plaintext, aadV2(k.id, name))
}

// open returns the plaintext of a value read from the etcd key name, or an
// error wrapping ErrUnseal that names the key (never the content).
func (s *sealer) open(name string, sealed []byte) ([]byte, error) {
	pt, _, err := s.openCurrent(name, sealed)
	return pt, err
}

// openCurrent is open that also says whether the value is sealed as seal
// would seal it now: in format 2, with the current data key.
func (s *sealer) openCurrent(name string, sealed []byte) (plaintext []byte, current bool, err error) {
	if len(sealed) == 0 {
		return nil, false, fmt.Errorf("%w: %s: empty value", ErrUnseal, name)
	}
	switch sealed[0] {
	case formatV1:
		return s.openV1(name, sealed[1:])
	case formatV2:
		return s.openV2(name, sealed[1:])
	}
	return nil, false, fmt.Errorf("%w: %s: unknown format %d", ErrUnseal, name, sealed[0])
}

// openV1 tries each key, the current one first: format 1 does not name
// its key, and a wrong key fails GCM's tag check, so at most one opens.
func (s *sealer) openV1(name string, body []byte) ([]byte, bool, error) {
	if len(body) < s.current.aead.Overhead() {
		return nil, false, fmt.Errorf("%w: %s: value too short (%d bytes)", ErrUnseal, name, 1+len(body))
	}
	for _, k := range append([]dataKey{s.current}, s.old...) {
		if pt, err := k.aead.Open(nil, nil, body, aad(name)); err == nil {
			return pt, false, nil
		}
	}
	// GCM's only failure is the tag: it says nothing more than ErrUnseal.
	return nil, false, fmt.Errorf("%w: %s (format 1, no data key opens it)", ErrUnseal, name)
}

func (s *sealer) openV2(name string, body []byte) ([]byte, bool, error) {
	if len(body) < keyIDSize+s.current.aead.Overhead() {
		return nil, false, fmt.Errorf("%w: %s: value too short (%d bytes)", ErrUnseal, name, 1+len(body))
	}
	id := [keyIDSize]byte(body[:keyIDSize])
	tried := false
	for i, k := range append([]dataKey{s.current}, s.old...) {
		// Two keys could share an id (a 64-bit hash); try each that does.
		if !bytes.Equal(k.id[:], id[:]) {
			continue
		}
		tried = true
		if pt, err := k.aead.Open(nil, nil, body[keyIDSize:], aadV2(id, name)); err == nil {
			return pt, i == 0, nil
		}
	}
	if !tried {
		return nil, false, fmt.Errorf("%w: %s: sealed with data key %x, which this store does not have "+
			"(if it is an old data key: Options.OldDataKeys, old_data_keys in credproxy's providers file)", ErrUnseal, name, id)
	}
	return nil, false, fmt.Errorf("%w: %s", ErrUnseal, name)
}
