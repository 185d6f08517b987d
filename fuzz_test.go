package credproxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// The handshake, fuzzed through a real connection (see handshakeOn), of
// the server's own session and of a session with a capability token, which
// must accept exactly the frames the former accepts that present its
// token. Run with go test -fuzz FuzzHandshake.
func FuzzHandshake(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":0,"maxVersion":99999999999999999999999}}`,
		`{"v":1,"op":"handshake"}`,
		`{"v":2,"op":"handshake","payload":{"minVersion":2,"maxVersion":3}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1.0,"maxVersion":1e0}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"minVersion":1}}`,
		`{"v":1,"id":"x","op":"get_token","payload":{"provider":"p"}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":"1","maxVersion":[1]}}`,
		"{\"v\":1,\"op\":\"hand\xffshake\"}",
		`[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	const token = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	f.Add([]byte(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"capabilityToken":"` + token + `"}}`))
	f.Add([]byte(`{"v":1,"op":"handshake","payload":{"capabilityToken":"` + token + `"}}`))
	f.Add([]byte(`{"v":1,"op":"handshake","payload":{"capabilityToken":"\u0030` + token[1:] + `","minVersion":1,"maxVersion":1}}`))
	f.Add([]byte(`{"v":1,"op":"handshake","payload":{"minVersion":9,"maxVersion":9,"capabilityToken":"` + token + `"}}`))
	st := NewMemoryStore()
	st.SaveAPIKey(context.Background(), "openai", "sk-fake")
	srv, err := NewServer(Options{Store: st, RateLimit: -1})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { srv.Close() })
	// A session with a known token, served over pipes as the server's own
	// session is.
	sess := srv.newSession(grantAll, "fuzz")
	sess.token, sess.digest, sess.maxConns, sess.idleTimeout = token, capabilityDigest(token), 1000, -1
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) == 0 || len(frame) > MaxFrameSize {
			return // refused at the header; FuzzReadFrame covers it
		}
		plain := handshakeOn(t, srv, srv.main, frame)
		tokened := handshakeOn(t, srv, sess, frame)
		// S3: the session accepts exactly what the plain server accepts
		// and presents its token.
		presented, ok := "", false
		if req, perr := decodeRequest(frame); perr == nil {
			presented, ok = presentedToken(req)
		}
		if want := plain && ok && presented == token; tokened != want {
			t.Fatalf("session handshake %q: accepted %v, want %v", frame, tokened, want)
		}
	})
}

// handshakeOn sends frame as the first frame of a new connection of the
// session ss and reports whether it was accepted. Whatever the frame
// holds, the server answers with exactly one well-formed frame: the
// acceptance, after which the connection serves requests, or a failure,
// after which it closes the connection.
func handshakeOn(t *testing.T, srv *Server, ss *Session, frame []byte) (accepted bool) {
	client, server := net.Pipe()
	defer client.Close()
	srv.serveConn(server, selfPeer(), ss)
	client.SetDeadline(time.Now().Add(10 * time.Second))
	if err := writeFrame(client, frame); err != nil {
		t.Fatalf("write: %v", err)
	}
	reply, err := readFrame(client, nil)
	if err != nil {
		t.Fatalf("no reply to %q: %v", frame, err)
	}
	if bytes.Equal(reply, handshakeOK) {
		writeFrame(client, []byte(`{"v":1,"id":"p","op":"has_api_key","payload":{"name":"openai"}}`))
		if got, err := readFrame(client, nil); err != nil || string(got) != `{"id":"p","ok":true,"data":{"exists":true}}` {
			t.Fatalf("after an accepted handshake %q the probe got %q, %v", frame, got, err)
		}
		return true
	}
	var fail struct {
		OK    *bool  `json:"ok"`
		Code  Code   `json:"code"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(reply, &fail); err != nil || fail.OK == nil || *fail.OK ||
		(fail.Code != CodeUnknownVersion && fail.Code != CodeInvalidRequest && fail.Code != CodeUnauthorized) || fail.Error == "" {
		t.Fatalf("reply to %q is neither the acceptance nor a failure: %q", frame, reply)
	}
	if n, err := io.Copy(io.Discard, client); n != 0 || err != nil {
		t.Fatalf("after a refused handshake the connection sent %d more bytes, %v; want it closed", n, err)
	}
	return false
}

// Sanitising and merging never let a refresh token through where it must
// not go: without its refresh token a token has no refresh_token member and
// keeps every other member byte for byte; the server's save (merge of the
// incoming token stripped of its refresh token) keeps the stored refresh
// token, never the incoming one; a plain merge takes a new non-empty
// refresh token and otherwise keeps the stored one. Run with
// go test -fuzz FuzzSanitizeMerge.
func FuzzSanitizeMerge(f *testing.F) {
	f.Add([]byte(anthropicToken), []byte(`{"access_token":"new","refresh_token":"rt-new","x":[1,{"refresh_token":"inner"}]}`))
	f.Add([]byte(`{"access_token":"a","refresh_token":null}`), []byte(`{"access_token":"b","refresh_token":""}`))
	f.Add([]byte(`{"refresh_token":"r","access_token":"r"}`), []byte(`{"access_token":"n","expiry":-1e400,"n":1e400}`))
	f.Add([]byte(`{"access_token":"a","refresh_token":"\u0072t"}`), []byte(`{"access_token":"a","id_token":"rt"}`))
	f.Fuzz(func(t *testing.T, storedJSON, incomingJSON []byte) {
		stored, err1 := ParseToken(storedJSON)
		incoming, err2 := ParseToken(incomingJSON)
		if err1 != nil || err2 != nil {
			return
		}
		for _, tok := range []Token{stored, incoming} {
			checkSanitised(t, tok)
		}
		saved := stored.Merge(incoming.WithoutRefreshToken())
		if saved.RefreshToken() != stored.RefreshToken() {
			t.Fatalf("save path: refresh token %q, want the stored %q", saved.RefreshToken(), stored.RefreshToken())
		}
		checkSanitised(t, saved)
		merged := stored.Merge(incoming)
		want := stored.RefreshToken()
		if incoming.RefreshToken() != "" {
			want = incoming.RefreshToken()
		}
		if merged.RefreshToken() != want {
			t.Fatalf("merge: refresh token %q, want %q", merged.RefreshToken(), want)
		}
		for _, name := range incoming.Names() {
			if name == fieldRefreshToken {
				continue
			}
			got, _ := merged.Field(name)
			in, _ := incoming.Field(name)
			if !bytes.Equal(got, in) {
				t.Fatalf("merge: member %q is %s, want the incoming %s", name, got, in)
			}
		}
	})
}

// checkSanitised checks the sanitised form of tok, as get_token sends it:
// valid JSON holding exactly tok's members but those named for a refresh
// token (S8), in order, each value as in tok, token for token, less the
// members named for a refresh token at any depth. So nothing of a refresh
// token reaches the output but what other members themselves hold.
func checkSanitised(t *testing.T, token Token) {
	t.Helper()
	out := token.appendSanitised(nil)
	if other := token.WithoutRefreshToken().Reveal(); !bytes.Equal(out, other) {
		t.Fatalf("the wire form %q and WithoutRefreshToken %q differ", out, other)
	}
	var want []string
	for _, n := range token.Names() {
		if !namedForRefreshToken(n) {
			want = append(want, n)
		}
	}
	dec := jsontext.NewDecoder(bytes.NewReader(out))
	if _, err := dec.ReadToken(); err != nil {
		t.Fatalf("sanitised output %q: %v", out, err)
	}
	i := 0
	for ; dec.PeekKind() != '}'; i++ {
		tok, err := dec.ReadToken()
		if err != nil {
			t.Fatalf("sanitised output %q: %v", out, err)
		}
		name := tok.String() // before the next read voids tok
		value, err := dec.ReadValue()
		if err != nil {
			t.Fatalf("sanitised output %q: %v", out, err)
		}
		if i >= len(want) || name != want[i] {
			t.Fatalf("sanitised output %q: member %d is %q, want the members %q", out, i, name, want)
		}
		if orig, _ := token.Field(want[i]); !sameLessRefreshTokens(orig, value) {
			t.Fatalf("sanitised output %q: member %q is %s, want %s without refresh tokens", out, want[i], value, orig)
		}
	}
	if i != len(want) {
		t.Fatalf("sanitised output %q has %d members, want %q", out, i, want)
	}
}

// namedForRefreshToken is the S8 rule, written independently of the
// package's: the name, with everything but letters and digits dropped, is
// "refreshtoken" under Unicode case folding.
func namedForRefreshToken(name string) bool {
	kept := strings.Map(func(r rune) rune {
		if unicode.IsLetter(r) || unicode.IsDigit(r) {
			return r
		}
		return -1
	}, name)
	return strings.EqualFold(kept, "refreshtoken")
}

// sameLessRefreshTokens reports whether got is want, read token by token,
// with every member named for a refresh token skipped in want and none
// left in got.
func sameLessRefreshTokens(want, got []byte) bool {
	w := jsontext.NewDecoder(bytes.NewReader(want))
	g := jsontext.NewDecoder(bytes.NewReader(got))
	for {
		wt, werr := w.ReadToken()
		if werr == nil && wt.Kind() == '"' {
			if kind, n := w.StackIndex(w.StackDepth()); kind == '{' && n%2 == 1 && namedForRefreshToken(wt.String()) {
				if w.SkipValue() != nil {
					return false
				}
				continue
			}
		}
		gt, gerr := g.ReadToken()
		if werr != nil || gerr != nil {
			return werr == io.EOF && gerr == io.EOF
		}
		if wt.Kind() != gt.Kind() || wt.String() != gt.String() {
			return false
		}
	}
}
