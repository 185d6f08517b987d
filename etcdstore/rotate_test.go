package etcdstore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
)

// sealV1 seals as stores did before keys could rotate (format 1), so that
// tests can put such values in etcd.
func sealV1(t testing.TB, key []byte, name string, plaintext []byte) []byte {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		t.Fatal(err)
	}
	return aead.Seal([]byte{formatV1}, nil, plaintext, aad(name))
}

func newKey(t testing.TB) []byte {
	k := make([]byte, DataKeySize)
	rand.Read(k)
	return k
}

// The sealer alone: format 2 names its key by id, old keys open what they
// sealed (format 1 or 2), only the current key seals, and a value whose
// key is missing says which key to add.
func TestSealerRotation(t *testing.T) {
	oldKey, curKey := newKey(t), newKey(t)
	const name = "/credproxy/apikeys/k"
	before, _ := newSealer(oldKey)
	rotated, err := newSealer(curKey, oldKey, curKey) // the current key among the old is ignored
	if err != nil {
		t.Fatal(err)
	}
	fresh, _ := newSealer(curKey)

	sealed := before.seal(name, []byte(fakeAPIKey))
	id := keyID(oldKey)
	if sealed[0] != formatV2 || !bytes.Equal(sealed[1:1+keyIDSize], id[:]) || DataKeyID(oldKey) != strings.ToLower(DataKeyID(oldKey)) {
		t.Fatalf("format 2 value starts %x, want 02 then the key id %s", sealed[:1+keyIDSize], DataKeyID(oldKey))
	}
	if bytes.Contains(sealed, oldKey[:keyIDSize]) {
		t.Error("the key id is the key's first bytes")
	}
	legacy := sealV1(t, oldKey, name, []byte(fakeAPIKey))
	for desc, v := range map[string][]byte{"format 2": sealed, "format 1": legacy} {
		if pt, current, err := rotated.openCurrent(name, v); err != nil || current || string(pt) != fakeAPIKey {
			t.Errorf("%s with an old key: opened %v, current %v, %v; want it opened, not current", desc, string(pt) == fakeAPIKey, current, err)
		}
	}
	if pt, current, err := rotated.openCurrent(name, rotated.seal(name, []byte(fakeAPIKey))); err != nil || !current || string(pt) != fakeAPIKey {
		t.Errorf("a new seal: current %v, %v", current, err)
	}
	if _, current, err := fresh.openCurrent(name, sealV1(t, curKey, name, []byte("x"))); err != nil || current {
		t.Errorf("format 1 with the current key: current %v, %v; want opened and not current (Reseal rewrites it)", current, err)
	}

	_, err = fresh.open(name, sealed)
	if !errors.Is(err, ErrUnseal) || !strings.Contains(err.Error(), DataKeyID(oldKey)) || !strings.Contains(err.Error(), "OldDataKeys") {
		t.Errorf("format 2 with its key absent = %v; want ErrUnseal naming key id %s and OldDataKeys", err, DataKeyID(oldKey))
	}
	swapped := bytes.Clone(sealed)
	curID := keyID(curKey)
	copy(swapped[1:], curID[:])
	for desc, tc := range map[string]struct {
		s     *sealer
		name  string
		value []byte
	}{
		"format 1 with its key absent":  {fresh, name, legacy},
		"key id swapped for another's":  {rotated, name, swapped},
		"format 2 under another name":   {rotated, name + "2", sealed},
		"format 1 under another name":   {rotated, name + "2", legacy},
		"format 2 relabelled format 1":  {rotated, name, append([]byte{formatV1}, sealed[1+keyIDSize:]...)},
		"format 1 relabelled format 2":  {rotated, name, append(append([]byte{formatV2}, id[:]...), legacy[1:]...)},
		"format 2 cut to its id":        {rotated, name, sealed[:1+keyIDSize]},
		"format 2 with no body, id ok":  {rotated, name, sealed[:1+keyIDSize+27]},
		"format 1 one byte short of ok": {rotated, name, legacy[:28]},
	} {
		if pt, err := tc.s.open(tc.name, tc.value); !errors.Is(err, ErrUnseal) || pt != nil {
			t.Errorf("%s: %d bytes, %v; want ErrUnseal", desc, len(pt), err)
		}
	}
	if _, err := newSealer(curKey, oldKey, make([]byte, 16)); err == nil || !strings.Contains(err.Error(), "OldDataKeys[1]") {
		t.Errorf("a 16-byte old key: %v, want an error naming OldDataKeys[1]", err)
	}
}
