package etcdstore

import (
	"bytes"
	"errors"
	"testing"
)

// The sealer alone, without a cluster: what opens and what does not.
func TestSealer(t *testing.T) {
	key := bytes.Repeat([]byte{1}, DataKeySize)
	s, err := newSealer(key)
	if err != nil {
		t.Fatal(err)
	}
	const name = "/credproxy/apikeys/k"
	sealed := s.seal(name, []byte(fakeAPIKey))
	if pt, err := s.open(name, sealed); err != nil || string(pt) != fakeAPIKey {
		t.Fatalf("open(seal(x)) = %q, %v", pt, err)
	}
	if again := s.seal(name, []byte(fakeAPIKey)); bytes.Equal(again, sealed) {
		t.Error("two seals of one value are equal: the nonce is not random")
	}
	other, _ := newSealer(bytes.Repeat([]byte{2}, DataKeySize))
	flip := func(i int) []byte { b := bytes.Clone(sealed); b[i] ^= 1; return b }
	for i, tc := range []struct {
		desc   string
		s      *sealer
		name   string
		sealed []byte
	}{
		{"another name", s, name + "2", sealed},
		{"another key", other, name, sealed},
		{"format byte changed", s, name, flip(0)},
		{"nonce changed", s, name, flip(1)},
		{"ciphertext changed", s, name, flip(len(sealed) - 20)},
		{"tag changed", s, name, flip(len(sealed) - 1)},
		{"truncated", s, name, sealed[:len(sealed)-1]},
		{"too short", s, name, sealed[:10]},
		{"empty", s, name, nil},
	} {
		if pt, err := tc.s.open(tc.name, tc.sealed); !errors.Is(err, ErrUnseal) || pt != nil {
			t.Errorf("%d: %s: open = %q, %v; want ErrUnseal", i, tc.desc, pt, err)
		}
	}
	for _, n := range []int{0, 16, 31, 33} {
		if _, err := newSealer(make([]byte, n)); err == nil {
			t.Errorf("newSealer with a %d-byte key succeeded", n)
		}
	}
}
