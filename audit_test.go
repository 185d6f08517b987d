package credproxy

import (
	"encoding/binary"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// auditRecord is what the tests read of a log record.
type auditRecord struct {
	Level, Msg, Session, Stage, Reason, Op, Code string
	Peer                                         struct{ UID, PID int }
	More, Unlogged                               int
}

// newRecords returns the records logged since the last call, and the
// count to pass next time.
func newRecords(t *testing.T, logs *logBuffer, seen int) ([]auditRecord, int) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	var recs []auditRecord
	for _, line := range lines[seen:] {
		var r auditRecord
		if err := jsonUnmarshalCaseless(line, &r); err != nil {
			t.Fatalf("log line %s: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs, len(lines)
}

// S11: every refused handshake, frame and request leaves exactly one
// record, at info level, naming the session, the peer, the stage and the
// reason; a policy denial leaves one record, not two. A flood of requests
// over the rate limit leaves a record a second, and the count of the rest
// when the connection ends.
func TestEveryRefusalIsLoggedOnceWithPeerAndSession(t *testing.T) {
	logger, logs := debugLogger()
	srv := sessionServer(t, Options{Store: defaultStore(t), Logger: logger})
	sess := startSession(t, srv, SessionOptions{Policy: &Grant{Providers: []string{"anthropic"}}, RateLimit: 0.001, RateBurst: 3})
	_, seen := newRecords(t, logs, 0)
	frame := func(payload string) []byte {
		b := binary.BigEndian.AppendUint32(nil, uint32(len(payload)))
		return append(b, payload...)
	}
	handshake := `{"v":1,"op":"handshake","payload":{"capabilityToken":"` + string(sess.CapabilityToken()) + `"}}`
	for _, tc := range []struct {
		name, stage, reason, code string
		send                      []byte
		handshaken                bool
	}{
		{"garbage before the handshake", "handshake", "malformed JSON in request", "", frame(`GARBAGE`), false},
		{"a request before the handshake", "handshake", "handshake required", "", frame(`{"v":1,"id":"1","op":"get_token"}`), false},
		{"no capability token", "handshake", "invalid or missing capability token", "", frame(`{"v":1,"op":"handshake"}`), false},
		{"an oversize header", "frame", "frame too large", "", []byte{0xff, 0xff, 0xff, 0xff}, false},
		{"a schema refusal", "request", "provider must match ^[A-Za-z0-9._@-]{1,64}$", "INVALID_REQUEST",
			frame(`{"v":1,"id":"1","op":"get_token","payload":{"provider":"../etc"}}`), true},
		{"a policy denial", "request", "API key not allowed", "UNAUTHORIZED",
			frame(`{"v":1,"id":"1","op":"get_api_key","payload":{"name":"openai"}}`), true},
		{"a write to a read-only session", "request", "sandbox connections cannot modify tokens", "UNAUTHORIZED",
			frame(`{"v":1,"id":"1","op":"remove_token","payload":{"provider":"anthropic"}}`), true},
	} {
		r := dialRaw(t, sess.SocketPath())
		if tc.handshaken {
			r.send(handshake)
			r.recv()
		}
		r.sendBytes(tc.send)
		r.recv()
		r.c.Close()
		recs, next := newRecords(t, logs, seen)
		seen = next
		var refusals []auditRecord
		for _, rec := range recs {
			if rec.Msg == "credproxy: refused" {
				refusals = append(refusals, rec)
			}
		}
		if len(refusals) != 1 {
			t.Errorf("%s: %d refusal records, want 1: %+v", tc.name, len(refusals), recs)
			continue
		}
		got := refusals[0]
		if got.Level != "INFO" || got.Session != sess.ID() || got.Stage != tc.stage || got.Reason != tc.reason ||
			got.Code != tc.code || got.Peer.UID != os.Geteuid() || got.Peer.PID != os.Getpid() {
			t.Errorf("%s: record %+v, want stage %s, reason %q, code %q, the session and the peer", tc.name, got, tc.stage, tc.reason, tc.code)
		}
	}

	// A flood, on a session of its own: 3 served (the burst), then 200
	// refused in well under a second.
	sess = startSession(t, srv, SessionOptions{Policy: &Grant{Keys: []string{"zeta"}}, RateLimit: 0.001, RateBurst: 3})
	handshake = `{"v":1,"op":"handshake","payload":{"capabilityToken":"` + string(sess.CapabilityToken()) + `"}}`
	_, seen = newRecords(t, logs, seen)
	r := dialRaw(t, sess.SocketPath())
	r.send(handshake)
	r.recv()
	var flood []byte
	for i := range 203 {
		flood = append(flood, frame(`{"v":1,"id":"`+strconv.Itoa(i)+`","op":"has_api_key","payload":{"name":"zeta"}}`)...)
	}
	r.sendBytes(flood)
	for range 203 {
		r.recv()
	}
	// The count of the rest is logged when the server has finished the
	// connection; closing the session waits for that.
	sess.Close()
	recs, _ := newRecords(t, logs, seen)
	refused := 0
	records := 0
	for _, rec := range recs {
		if rec.Reason == "rate limit exceeded" {
			records++
			refused += rec.More
			if rec.Op != "" { // not the count logged at the end
				refused++
			}
			if rec.More > 0 && rec.Session != sess.ID() {
				t.Errorf("summary record without its session: %+v", rec)
			}
		}
	}
	if records < 1 || records > 3 || refused != 200 {
		t.Errorf("a flood of 200 rate-limited requests: %d records counting %d refusals, want 1 to 3 records counting 200", records, refused)
	}
}

// S11 against a flood: refusals that need no token (1,000 bad handshakes
// in a row, as anyone who can reach the socket can send) are logged within
// the session's budget, a burst and then a few a second, and every one is
// counted: the records and their "unlogged" counts add up to 1,000. An
// operation name the peer made up is logged cut short.
func TestRefusalFloodIsLoggedWithinABudget(t *testing.T) {
	logger, logs := debugLogger()
	srv := sessionServer(t, Options{Store: defaultStore(t), Logger: logger})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll})
	_, seen := newRecords(t, logs, 0)
	start := time.Now()
	for range 1000 {
		r := dialRaw(t, sess.SocketPath())
		r.send(`{"v":1,"op":"handshake"}`)
		r.recv()
		r.c.Close()
	}
	r := dialRaw(t, sess.SocketPath())
	r.handshakeWith(sess.CapabilityToken())
	r.send(`{"v":1,"id":"1","op":"` + strings.Repeat("A", 60000) + `"}`)
	r.recv()
	elapsed := time.Since(start)
	sess.Close()
	recs, _ := newRecords(t, logs, seen)
	records, counted := 0, 0
	for _, rec := range recs {
		if rec.Msg != "credproxy: refused" {
			continue
		}
		records++
		counted += rec.Unlogged
		if rec.Stage != "" {
			counted++
		}
		if len(rec.Op) > 40 {
			t.Errorf("an operation name of %d bytes in the log", len(rec.Op))
		}
	}
	if budget := refusalBurst + int(elapsed.Seconds()*refusalRate) + 2; records > budget || counted != 1001 {
		t.Errorf("1,001 refusals in %v: %d records (budget %d), counting %d", elapsed, records, budget, counted)
	}
	if len(logs.String()) > 100<<10 {
		t.Errorf("%d bytes of log for the flood", len(logs.String()))
	}
}
