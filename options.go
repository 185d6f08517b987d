package credproxy

import (
	"log/slog"
	"net/http"
	"time"
)

// Defaults for the zero values of [Options].
const (
	DefaultMaxConnections   = 256
	DefaultMaxInFlight      = 16
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultFrameTimeout     = 5 * time.Second
	DefaultStoreTimeout     = 15 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
)

// Options configures a [Server]. Only Store is required; every other zero
// value is safe and gives the default the field names.
type Options struct {
	// Store holds the credentials the server serves. Required.
	Store Store

	// Policy decides which requests arriving through [Server.Serve] are
	// allowed. Nil allows all: Serve is for embedders whose clients are
	// trusted. A sandbox gets a [Session] instead ([Server.NewSession]),
	// with a Policy of its own. A [*Grant] is checked as NewSession
	// checks one.
	Policy Policy

	// Logger receives the audit log (one debug record per request) and
	// warnings (refused peers, store failures). Nil discards everything.
	// Secrets are never logged at any level.
	Logger *slog.Logger

	// AllowedUIDs lists uids, besides the server's effective uid, whose
	// processes may connect: for sandboxes whose user namespace maps the
	// inner user to another host uid. Empty allows only the server's uid.
	AllowedUIDs []int

	// RateLimit is the sustained number of requests per second allowed on
	// each connection, and RateBurst the number allowed at once. Zero means
	// 60 and 60 (PROTOCOL.md, "Requests"). A negative RateLimit switches
	// the limit off, for benchmarks only. A zero RateBurst with a non-zero RateLimit means the
	// rate rounded up.
	RateLimit float64
	RateBurst int

	// MaxConnections caps concurrent connections. Zero means 256. When the
	// cap is reached, the oldest connection that has not completed its
	// handshake is dropped to make room; if every connection has completed
	// it, the new one is refused.
	MaxConnections int

	// MaxInFlight caps the requests of one connection being served at
	// once; one more is refused with RESOURCE_EXHAUSTED. Zero means 16.
	MaxInFlight int

	// HandshakeTimeout bounds the time from accept to a completed
	// handshake. Zero means 5s.
	HandshakeTimeout time.Duration

	// FrameTimeout bounds the time from a frame's first byte to its last
	// (PROTOCOL.md, "Frames"). Zero means 5s.
	FrameTimeout time.Duration

	// StoreTimeout bounds the policy and store work of one request; past it
	// the request fails with INTERNAL_ERROR. Zero means 15s.
	StoreTimeout time.Duration

	// WriteTimeout bounds the write of one response; a peer that does not
	// read its responses is disconnected after about this long. Zero
	// means 10s.
	WriteTimeout time.Duration

	// Refreshers renew tokens on the host, by provider name (see
	// [Refresher]): they serve refresh_token, the refresh before get_token
	// (RefreshMargin) and proactive renewal. A provider with none gets
	// PROVIDER_NOT_FOUND on refresh_token. NewServer copies the map.
	Refreshers map[string]Refresher

	// RefreshMargin: get_token refreshes a token that expires within this
	// margin before serving it, if it can be refreshed. It waits a few
	// seconds for the refresh at most; if the refresh fails or takes
	// longer, the stored token is served while it is still valid, and an
	// expired one is not served (the sandbox gets the refresh's error).
	// Zero means 60s; negative turns it off.
	RefreshMargin time.Duration

	// OnRefresh, if set, is told how each host-side refresh that asked the
	// provider ended (see [RefreshEvent]); for example, a host CLI can ask
	// its user to log in again on RefreshReauthRequired. It is called on
	// the refresh's own goroutine once the requests waiting for the
	// refresh have their answer; calls for one provider and bucket do not
	// overlap unless one blocks past the next refresh. It may call
	// Shutdown or Close, and may run after they have returned.
	OnRefresh func(RefreshEvent)

	// IdleTimeout closes a connection through [Server.Serve] that has
	// completed its handshake and then sent nothing for this long; the
	// client reconnects when it next needs to. Zero means 10 minutes;
	// negative keeps idle connections open. Sessions have their own.
	IdleTimeout time.Duration

	// MaxNewTokens caps how many tokens connections through
	// [Server.Serve] may create (save_token for a provider and bucket
	// that has none) over the server's life. Zero means 16; negative
	// means no cap. Sessions have their own.
	MaxNewTokens int

	// DisableRenewal turns off proactive renewal. By default, once
	// get_token has served a token that can be refreshed, the server
	// renews it shortly before it expires (at expiry - max(5 min, 10% of
	// its lifetime) - up to 30 s of jitter) and again after each renewal,
	// until Shutdown or Close. Nothing about it is persisted.
	DisableRenewal bool

	// InjectTransport is how sessions' injection fronts
	// ([SessionOptions].Routes) reach their upstreams. Each session uses
	// a clone of it when it is an *http.Transport, so that its upstream
	// connections close with it; any other RoundTripper is shared as it
	// is. Whatever it is, redirects are passed to the sandbox, never
	// followed. Nil means a transport of the session's own: TLS 1.2 or
	// later with the system's roots, HTTP/2 where the upstream offers it,
	// no proxy from the environment, and the sandbox's Accept-Encoding
	// as sent. Tests set one that trusts their own CA; setting it also
	// allows http upstreams on loopback IP addresses.
	InjectTransport http.RoundTripper
}

func setDefault[T int | time.Duration](v *T, def T) {
	if *v == 0 {
		*v = def
	}
}
