package credproxy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

// A property test of the rule the whole package exists for (R8, R10,
// R23.5, R28): with random tokens in the store, random requests on the
// socket (valid and malformed, with refresh tokens in saved tokens and in
// places they do not belong), and a refresher that rotates refresh tokens
// and fails quoting them, no refresh token the host holds or received ever
// appears in a byte the server writes to the socket or in its debug log.
func TestNoRefreshTokenEverLeaves(t *testing.T) {
	for seed := range uint64(5) {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) { refreshTokenProperty(t, seed) })
	}
}

func refreshTokenProperty(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 42))
	var mu sync.Mutex
	var secrets []string // every refresh token the host held or was sent
	newRT := func() string {
		mu.Lock()
		defer mu.Unlock()
		rt := fmt.Sprintf("fake-rt-%016x%016x", rng.Uint64(), rng.Uint64())
		secrets = append(secrets, rt)
		return rt
	}
	randomToken := func(withRT bool) string {
		var b strings.Builder
		fmt.Fprintf(&b, `{"access_token":"fake-at-%x"`, rng.Uint32())
		if withRT {
			fmt.Fprintf(&b, `,"refresh_token":"%s"`, newRT())
		}
		expiry := false
		for i := range rng.IntN(4) {
			switch rng.IntN(4) {
			case 0:
				fmt.Fprintf(&b, `,"m%d":%d.%d`, i, rng.IntN(1e6), rng.IntN(100))
			case 1:
				fmt.Fprintf(&b, `,"m%d":{"nested":[%d,"x",null]}`, i, rng.IntN(10))
			case 2:
				if !expiry {
					expiry = true
					fmt.Fprintf(&b, `,"expiry":%d`, time.Now().Add(time.Duration(rng.IntN(7200)-3600)*time.Second).Unix())
				}
			default:
				fmt.Fprintf(&b, `,"m%d":"v%x"`, i, rng.Uint32())
			}
		}
		return b.String() + "}"
	}

	st := NewMemoryStore()
	providers := []string{"p0", "p1", "p2"}
	for _, p := range providers {
		// Expired, so that refresh_token calls the refresher.
		expired := strings.Replace(randomToken(true), "{", `{"expiry":1,`, 1)
		if strings.Count(expired, `"expiry"`) > 1 {
			expired = randomToken(true)
		}
		st.SaveToken(context.Background(), p, "", mustToken(t, expired))
	}
	refresher := RefresherFunc(func(_ context.Context, tok Token) (Token, error) {
		if rng.IntN(3) == 0 {
			return Token{}, fmt.Errorf("provider said: bad refresh token %s", tok.RefreshToken())
		}
		return ParseToken([]byte(randomToken(true)))
	})
	logger, logs := debugLogger()
	_, path := startServer(t, Options{Store: st, Logger: logger, RateLimit: -1, DisableRenewal: true,
		Refreshers: map[string]Refresher{"p0": refresher, "p1": refresher}})
	r := dialRaw(t, path)
	r.handshake()

	var wire strings.Builder
	for i := range 500 {
		p := providers[rng.IntN(len(providers))]
		var req string
		switch rng.IntN(8) {
		case 0, 1:
			req = fmt.Sprintf(`{"v":1,"id":"%d","op":"get_token","payload":{"provider":"%s"}}`, i, p)
		case 2:
			req = fmt.Sprintf(`{"v":1,"id":"%d","op":"save_token","payload":{"provider":"%s","token":%s}}`, i, p, randomToken(rng.IntN(2) == 0))
		case 3:
			req = fmt.Sprintf(`{"v":1,"id":"%d","op":"refresh_token","payload":{"provider":"%s"}}`, i, p)
		case 4:
			req = fmt.Sprintf(`{"v":1,"id":"%d","op":"get_token","payload":{"provider":"x/%s"}}`, i, newRT()) // not a valid name
		case 5:
			req = fmt.Sprintf(`{"v":1,"id":"%d","op":"save_token","payload":{"provider":"%s","token":{"refresh_token":"%s"}}}`, i, p, newRT())
		case 6:
			req = fmt.Sprintf(`{"v":1,"id":"%d","op":"get_token","payload":{"provider":"%s","extra":"%s"}}`, i, p, newRT())
		default:
			req = fmt.Sprintf(`{"v":1,"id":"%d","op":"list_buckets","payload":{"provider":"%s"}}`, i, p)
		}
		r.send(req)
		wire.WriteString(r.recv())
	}
	// What the host now holds must not have leaked either.
	for _, p := range providers {
		if tok, err := st.GetToken(context.Background(), p, ""); err == nil && tok.RefreshToken() != "" {
			secrets = append(secrets, string(tok.RefreshToken()))
		} else if err != nil && !errors.Is(err, ErrNotFound) {
			t.Fatal(err)
		}
	}
	for _, rt := range secrets {
		if strings.Contains(wire.String(), rt) {
			t.Fatalf("refresh token %s was written to the socket", rt)
		}
		if i := strings.Index(logs.String(), rt); i >= 0 {
			t.Fatalf("refresh token %s is in the debug log: ...%s...", rt, logs.String()[max(0, i-100):min(len(logs.String()), i+200)])
		}
	}
	if !strings.Contains(wire.String(), `"ok":false`) || !strings.Contains(wire.String(), `"ok":true`) {
		t.Fatalf("the run did not exercise failures and successes")
	}
	t.Logf("%d refresh tokens, %d bytes on the wire, %d bytes of debug log (%d refresh failures logged): none leaked",
		len(secrets), wire.Len(), len(logs.String()), strings.Count(logs.String(), "refresh failed"))
}
