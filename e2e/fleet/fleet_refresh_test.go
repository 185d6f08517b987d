package fleet

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// stormSize is how many refresh_token requests a storm sends at once.
const stormSize = 50

// outcome is one refresh_token request's answer.
type outcome struct {
	host int
	tok  credproxy.Token
	err  error
}

// storm has every client read the token (as a sandbox holding it would),
// then sends stormSize refresh_token requests at once, request i through
// clients[i%len(clients)], and returns their answers. Before the answers
// come, it calls during (if not nil) once every request has been sent.
func storm(ctx context.Context, t *testing.T, clients [][]*credproxy.Client, during func()) []outcome {
	t.Helper()
	for _, cs := range clients {
		for _, c := range cs {
			if _, err := c.GetToken(ctx, fleetProvider, ""); err != nil {
				t.Fatalf("get_token before the storm: %v", err)
			}
		}
	}
	out := make([]outcome, stormSize)
	var sent, done sync.WaitGroup
	start := make(chan struct{})
	for i := range stormSize {
		h := i % len(clients)
		c := clients[h][(i/len(clients))%len(clients[h])]
		sent.Add(1)
		done.Go(func() {
			<-start
			sent.Done()
			tok, err := c.RefreshToken(ctx, fleetProvider, "")
			out[i] = outcome{host: h, tok: tok, err: err}
		})
	}
	close(start)
	sent.Wait()
	if during != nil {
		during()
	}
	done.Wait()
	return out
}

// clientsOf returns, per host, stormSize/len(hosts) clients (one
// connection each), so that the storm's requests each have a connection.
func clientsOf(hosts []*host) [][]*credproxy.Client {
	var cs [][]*credproxy.Client
	for _, h := range hosts {
		var hc []*credproxy.Client
		for range (stormSize + len(hosts) - 1) / len(hosts) {
			hc = append(hc, h.client())
		}
		cs = append(cs, hc)
	}
	return cs
}

// releaseWhenAllWait returns a during for storm: it waits until the
// provider holds the first refresh (one host has the lock and is asking
// the provider) and every other host waits for the lock (etcd holds a
// lock key per host), so that every host's refresh overlaps the one
// provider call; then it lets the call through.
func releaseWhenAllWait(t *testing.T, f *fleet, g *gate, hosts int) func() {
	return func() {
		t.Helper()
		select {
		case <-g.arrived:
		case <-time.After(30 * time.Second):
			t.Fatalf("no refresh reached the provider in 30 s (stats %+v)", f.p.stats())
		}
		if !eventually(30*time.Second, func() bool { return f.lockKeys(f.prefix) == hosts }) {
			t.Errorf("etcd holds %d lock keys for the token, want %d (one holder, a waiter per other host)", f.lockKeys(f.prefix), hosts)
		}
		g.release <- 0
	}
}

// checkOneRefresh checks what a storm over a fleet must come to: one
// provider call, that rotated the refresh token; every request answered
// with the new access token or one the provider accepts, and never a
// refresh token; the store holds the rotated refresh token, the login is
// not revoked, and it refreshes again.
func checkOneRefresh(t *testing.T, p *rotatingProvider, rt0 string, out []outcome, stored credproxy.Token) {
	t.Helper()
	if st := p.stats(); st.calls != 1 || st.rotated != 1 || st.reused != 0 {
		t.Errorf("provider: %d calls, %d rotations, %d reuses; want exactly one call that rotated", st.calls, st.rotated, st.reused)
	}
	newRT, newAT := p.current(rt0)
	failed := 0
	for i, o := range out {
		switch {
		case o.err != nil:
			failed++
			if failed <= 3 {
				t.Errorf("request %d (host %d): %v", i, o.host, o.err)
			}
		case o.tok.RefreshToken() != "":
			t.Errorf("request %d (host %d) got a refresh token", i, o.host)
		case string(o.tok.AccessToken()) != newAT && !p.accessValid(string(o.tok.AccessToken())):
			t.Errorf("request %d (host %d) got an access token the provider refuses", i, o.host)
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d refresh_token requests failed", failed, len(out))
	}
	if p.revoked(rt0) {
		t.Fatalf("the provider revoked the login: a refresh token was used twice")
	}
	if string(stored.RefreshToken()) != newRT || string(stored.AccessToken()) != newAT {
		t.Errorf("the store does not hold the provider's newest tokens")
	}
	if _, _, code := refreshAt(t, p.URL, newRT); code != "" {
		t.Errorf("the stored refresh token does not refresh: %s", code)
	}
}

// The fleet test, with two and with five host processes: one
// cluster, one login, 50 refresh_token requests at once spread over the
// hosts (each through a connection of its own, each client having read
// the token first, as a sandbox whose token was refused would have). The
// provider holds its first call until every other host is waiting for
// the token's lock, so that all the refreshes overlap. Exactly one
// provider call is made; every request gets the new access token (or
// one the provider accepts) and no refresh token; the store holds the
// rotated refresh token, which refreshes again (the login was not
// revoked); and every host then serves a token the provider accepts: no
// host is logged out.
func TestFleetRefreshesOnce(t *testing.T) {
	for _, n := range []int{2, 5} {
		t.Run(fmt.Sprintf("%d hosts", n), func(t *testing.T) {
			f := newFleet(t)
			_, rt0 := f.login(f.prefix)
			var hosts []*host
			for i := range n {
				hosts = append(hosts, f.start(fmt.Sprintf("h%d", i)))
			}
			g := f.p.hold()
			out := storm(t.Context(), t, clientsOf(hosts), releaseWhenAllWait(t, f, g, n))
			for _, h := range hosts {
				if tok := h.getToken(t.Context()); !f.p.accessValid(string(tok.AccessToken())) || tok.RefreshToken() != "" {
					t.Errorf("host %s serves a token the provider refuses, or with its refresh token: logged out", h.name)
				}
			}
			checkOneRefresh(t, f.p, rt0, out, f.stored(f.prefix))
		})
	}
}

// The mutation check at the level of processes: two hosts that do not
// share state, each on a prefix of its own holding a copy of the same
// login (what the "Why" describes: each host keeping its own
// copy), under the same storm. Each host refreshes with the same refresh
// token, so the provider sees it twice and revokes the login: the checks
// of TestFleetRefreshesOnce fail. This test passes when they do.
func TestFleetWithoutSharedStateIsLoggedOut(t *testing.T) {
	f := newFleet(t)
	access, rt0 := f.login("/copy-a/")
	f.save("/copy-b/", access, rt0)
	a, b := f.startOn("a", "/copy-a/"), f.startOn("b", "/copy-b/")
	g := f.p.hold()
	out := storm(t.Context(), t, clientsOf([]*host{a, b}), func() {
		<-g.arrived
		// The other host's refresh goes through while this one is held.
		if !eventually(30*time.Second, func() bool { return f.p.stats().rotated == 1 }) {
			t.Fatalf("the second host did not refresh on its own (stats %+v)", f.p.stats())
		}
		g.release <- 0
	})
	st := f.p.stats()
	loggedOut := 0
	for _, o := range out {
		if errors.Is(o.err, credproxy.ErrReauthRequired) {
			loggedOut++
		}
	}
	t.Logf("without shared state: provider stats %+v, revoked %v, %d of %d requests told to log in again",
		st, f.p.revoked(rt0), loggedOut, len(out))
	if st.calls < 2 || st.reused == 0 || !f.p.revoked(rt0) || loggedOut == 0 {
		t.Fatalf("hosts without a shared store were not caught: the fleet checks cannot tell a fleet without its lock")
	}
}
