package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The credentials of the injection tests: what the host holds and the
// upstreams must get, and the sandbox must never see.
const (
	realAnthropicKey = "sk-ant-fake-REAL-anthropic-AAAA1111"
	realOpenAIKey    = "sk-fake-REAL-openai-OOOO2222"
	acmeStaleToken   = "fake-acme-REAL-access-before-refresh-SSSS"
	acmeFreshToken   = "fake-acme-REAL-access-after-refresh-FFFF"
	acmeRefresh      = "fake-acme-REAL-refresh-RRRR"
	acmeNewRefresh   = "fake-acme-REAL-refresh-rotated-NNNN"
)

// fakeAPI is a local HTTPS upstream that answers as the Anthropic
// Messages API (streamed, server-sent events), OpenAI's chat completions
// (plain JSON) and "acme", an API behind an OAuth token, would; it notes
// the credential each request carried. The streamed message sends each
// text delta only once the client has acknowledged the one before
// through /acme/ack, when paced, so it proves the events arrive one by
// one.
type fakeAPI struct {
	*httptest.Server
	paced bool // set before the first request
	acks  chan int

	mu       sync.Mutex
	seen     map[string][]string // route → the credential header of each request
	problems []string
}

func newFakeAPI(t *testing.T, cert tls.Certificate) *fakeAPI {
	t.Helper()
	api := &fakeAPI{acks: make(chan int, 8), seen: map[string][]string{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/messages", api.messages)
	mux.HandleFunc("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		api.note("openai", r.Header.Get("Authorization"), r.Header.Get("X-Api-Key"))
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"id":"chatcmpl-fake","object":"chat.completion","created":1700000000,"model":"gpt-fake",`+
			`"choices":[{"index":0,"message":{"role":"assistant","content":"Hi from the fake OpenAI"},"finish_reason":"stop"}],`+
			`"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}`)
	})
	mux.HandleFunc("GET /acme/ack", func(w http.ResponseWriter, r *http.Request) {
		api.note("acme", r.Header.Get("Authorization"), r.Header.Get("X-Api-Key"))
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		api.acks <- n
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("GET /acme/whoami", func(w http.ResponseWriter, r *http.Request) {
		api.note("acme", r.Header.Get("Authorization"), r.Header.Get("X-Api-Key"))
		fmt.Fprint(w, "acme-user")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		api.problem("unexpected request %s %s", r.Method, r.URL)
		http.NotFound(w, r)
	})
	api.Server = httptest.NewUnstartedServer(mux)
	api.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	api.StartTLS()
	t.Cleanup(api.Close)
	return api
}

// note records the credential of a request to route: its Authorization,
// or its x-api-key, or both when both are sent.
func (api *fakeAPI) note(route, authorization, apiKey string) {
	api.mu.Lock()
	defer api.mu.Unlock()
	switch {
	case apiKey == "":
		api.seen[route] = append(api.seen[route], authorization)
	case authorization == "":
		api.seen[route] = append(api.seen[route], "x-api-key "+apiKey)
	default:
		api.seen[route] = append(api.seen[route], "Authorization "+authorization+" and x-api-key "+apiKey)
	}
}

func (api *fakeAPI) problem(format string, args ...any) {
	api.mu.Lock()
	defer api.mu.Unlock()
	api.problems = append(api.problems, fmt.Sprintf(format, args...))
}

// credentials returns what each route's requests carried, and the
// problems seen.
func (api *fakeAPI) credentials() (map[string][]string, []string) {
	api.mu.Lock()
	defer api.mu.Unlock()
	seen := map[string][]string{}
	for k, v := range api.seen {
		seen[k] = slices.Clone(v)
	}
	return seen, slices.Clone(api.problems)
}

// messages streams a message as the Messages API does with
// "stream": true, three text deltas, when paced each after the last was
// acknowledged.
func (api *fakeAPI) messages(w http.ResponseWriter, r *http.Request) {
	api.note("anthropic", r.Header.Get("Authorization"), r.Header.Get("X-Api-Key"))
	var req struct {
		Stream bool `json:"stream"`
	}
	if json.NewDecoder(r.Body).Decode(&req) != nil || !req.Stream {
		api.problem("a message request that is not streamed")
		http.Error(w, "stream only", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	send := func(event, data string) {
		fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, data)
		w.(http.Flusher).Flush()
	}
	send("message_start", `{"type":"message_start","message":{"id":"msg_fake","type":"message","role":"assistant","model":"claude-fake",`+
		`"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":1}}}`)
	send("content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`)
	for i, piece := range []string{"Hello", " from", " upstream"} {
		send("content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"`+piece+`"}}`)
		if !api.paced {
			continue
		}
		select {
		case n := <-api.acks:
			if n != i {
				api.problem("delta %d acknowledged as %d", i, n)
			}
		case <-time.After(30 * time.Second):
			api.problem("delta %d never reached the SDK's loop (no acknowledgement in 30 s)", i)
			return
		case <-r.Context().Done():
			return
		}
	}
	send("content_block_stop", `{"type":"content_block_stop","index":0}`)
	send("message_delta", `{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":3}}`)
	send("message_stop", `{"type":"message_stop"}`)
}

// fakeTokenEndpoint is an OAuth token endpoint on loopback http that
// answers refresh_token grants for refresh with access and a new
// refresh token, counting them.
func fakeTokenEndpoint(t *testing.T, refresh, access, newRefresh string) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	calls := new(atomic.Int32)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.FormValue("grant_type") != "refresh_token" || r.FormValue("refresh_token") != refresh {
			http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"access_token":%q,"token_type":"Bearer","expires_in":3600,"refresh_token":%q}`, access, newRefresh)
	}))
	t.Cleanup(srv.Close)
	return srv, calls
}
