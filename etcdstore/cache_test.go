package etcdstore

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// waitFor polls cond until it holds, failing t after 20 s. Changes made by
// another host reach a store through its watch, so tests wait for them
// this way, never by sleeping a fixed time.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// logRecorder is a slog.Handler that keeps every record, for tests that
// check what the store logs (and that it logs no secret).
type logRecorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler      { return r }
func (r *logRecorder) WithGroup(string) slog.Handler           { return r }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec.Clone())
	return nil
}

// count returns how many records at level have a message containing msg.
func (r *logRecorder) count(level slog.Level, msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, rec := range r.recs {
		if rec.Level == level && strings.Contains(rec.Message, msg) {
			n++
		}
	}
	return n
}

// text returns every record, attributes included, as one string.
func (r *logRecorder) text() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for _, rec := range r.recs {
		b.WriteString(rec.Level.String() + " " + rec.Message)
		rec.Attrs(func(a slog.Attr) bool {
			b.WriteString(" " + a.String())
			return true
		})
		b.WriteString("\n")
	}
	return b.String()
}

// Log messages the tests look for.
const (
	msgBroken    = "watch broken, reading through"
	msgRecovered = "watch re-established"
	msgStale     = "served a possibly stale cached value"
)

// openLogged opens a store on c under prefix with a recorded log and the
// given request timeout (zero for the default).
func (c *testCluster) openLogged(t *testing.T, prefix string, timeout time.Duration, endpoints ...string) (*EtcdStore, *logRecorder) {
	t.Helper()
	rec := &logRecorder{}
	if len(endpoints) == 0 {
		endpoints = c.endpoints
	}
	st, err := Open(t.Context(), Options{Endpoints: endpoints, Prefix: prefix, DataKey: c.key,
		Logger: slog.New(rec), RequestTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("Close = %v", err)
		}
		if strings.Contains(rec.text(), fakeRefresh) || strings.Contains(rec.text(), fakeAccess) {
			t.Errorf("the log holds a secret:\n%s", rec.text())
		}
	})
	return st, rec
}

// tokenN is a token whose access token says which write made it.
func tokenN(t testing.TB, n int) credproxy.Token {
	return counterToken(t, n)
}

// isNotFound reports whether err says there is no such item.
func isNotFound(err error) bool { return errors.Is(err, credproxy.ErrNotFound) }
