// Package credproxy lets a host program hand credentials to a sandboxed
// process without handing over its refresh tokens.
//
// The host keeps OAuth tokens and API keys in a [Store] and runs a
// [Server]. For each sandbox it launches, it starts a [Session]
// ([Server.NewSession]): a Unix socket alone in a directory of its own,
// a capability token, and a [Grant] of what the sandbox may read. The
// launcher mounts the session's directory into the sandbox, passes the
// socket's path in the environment variable named by [SocketEnv] and the
// token on file descriptor 3 ([Session.HandoffFile]), and closes the
// session when the sandbox exits. The sandboxed process calls
// [NewClientFromEnv] and reads access tokens and API keys. Refresh tokens
// never cross the socket: the server strips them from every token it sends
// and ignores those it receives. The examples (ExampleServer_NewSession,
// examples/quickstart) are the quickest way in.
//
// In injection mode ([SessionOptions].Routes) the sandbox holds no real
// credential at all: a session also serves an HTTP front on a second
// socket that forwards the sandbox's API calls to each provider with the
// session's phantom credential ([Session.Phantom]) replaced by the real
// one, refreshed on the host.
//
// Hosts keep real credentials in a [KeyringStore] ([OpenKeyringStore]): the
// OS keyring, or by default an encrypted file store that works on any
// machine. Code that runs both on the host and in a sandbox can call
// [OpenStore], which returns the keyring store on the host and a connected
// [Client] in the sandbox. The host refreshes tokens for the sandbox with a
// [Refresher] per provider ([Options.Refreshers], [OAuth2Refresher]).
//
// The wire protocol (framed JSON, version 1) is described in PROTOCOL.md and
// is compatible with the TypeScript implementation in the llxprt-code project.
//
// # Security
//
// A sandbox is the unit of trust; PROTOCOL.md, "Sessions", has the rules.
// A session's socket is the only one its sandbox can see, and only a
// connection that presents the session's capability token is served. Each
// request then passes, in order: the peer's uid (read from the kernel when
// the connection is accepted), a rate limit per connection and per
// session, the request schema (exact member names, no duplicate members,
// valid names), and the session's [Policy]: a [Grant] is read-only unless
// it says otherwise and grants nothing it does not name. Only then is the
// store called, with a deadline. A sandbox that may write creates a
// bounded number of tokens. Closing the session revokes all of it. Every
// refusal is logged on the host with the session and the peer. Error
// messages sent to the peer are fixed texts; store errors and payload
// values never cross the socket. Secret-carrying types ([Token], [Secret],
// [Session], [Client]) print and log without their secrets.
//
// Socket and store directories must be private, and every directory above
// them must be owned by root or the host user and not be writable by
// others unless it is sticky, or the server refuses them. A client checks that the
// server runs as its own uid or root before it presents the token. On
// platforms other than Linux and macOS neither side can identify the
// other, and the file modes are the gate. A VM bridge (Docker Desktop,
// Podman machine on macOS) makes every peer look like the bridge process,
// so the uid check there only proves that the bridge runs as the host
// user. A process running as the host's own uid outside the sandbox can
// always read the host's credentials by other means; credproxy does not
// defend against it. [Server.Serve] serves a listener without sessions:
// for embedders whose clients are trusted.
package credproxy

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
)

// SocketEnv is the environment variable that carries the socket path into
// the sandbox. [NewClientFromEnv] reads it.
const SocketEnv = "LLXPRT_CREDENTIAL_SOCKET"

// DefaultBucket is the bucket used when a request names none.
const DefaultBucket = "default"

// Errors reported by the server, the client and the stores. Errors that
// cross the socket arrive at the client as a [*RemoteError] whose Is method
// matches the sentinel for its code, so errors.Is(err, ErrNotFound) works the
// same in process and over the wire.
var (
	// ErrServerClosed is returned by [Server.Serve] after [Server.Shutdown]
	// or [Server.Close].
	ErrServerClosed = errors.New("credproxy: server closed")

	// ErrNotFound means the token or API key does not exist (code NOT_FOUND).
	// Stores return it, or an error wrapping it, for absent items.
	ErrNotFound = errors.New("credproxy: not found")

	// ErrInvalidRequest means the request broke the protocol or its schema
	// (code INVALID_REQUEST): malformed JSON, an unknown operation or member,
	// or an invalid name.
	ErrInvalidRequest = errors.New("credproxy: invalid request")

	// ErrDenied means the [Policy] refused the request (code UNAUTHORIZED).
	ErrDenied = errors.New("credproxy: not allowed")

	// ErrRateLimited means the connection sent more requests than its rate
	// limit allows (code RATE_LIMITED). [RemoteError.RetryAfter] says when
	// to try again.
	ErrRateLimited = errors.New("credproxy: rate limited")

	// ErrInternal means the server could not complete the request, for
	// example because its store failed or timed out (code INTERNAL_ERROR).
	// The cause is logged on the host only. A [Client] also matches it for
	// a code it does not know, from a server of another implementation or
	// version (see [RemoteError.Is]).
	ErrInternal = errors.New("credproxy: internal error")

	// ErrUnknownVersion means client and server share no protocol version
	// (code UNKNOWN_VERSION).
	ErrUnknownVersion = errors.New("credproxy: unsupported protocol version")

	// ErrResourceExhausted means the connection already had the maximum
	// number of requests in flight (code RESOURCE_EXHAUSTED).
	ErrResourceExhausted = errors.New("credproxy: too many requests in flight")

	// ErrRefreshNotAvailable means the stored token has no refresh token
	// (code REFRESH_NOT_AVAILABLE).
	ErrRefreshNotAvailable = errors.New("credproxy: refresh not available")

	// ErrReauthRequired means the provider rejected the refresh token; the
	// user must log in again on the host (code REAUTH_REQUIRED).
	ErrReauthRequired = errors.New("credproxy: re-authentication required")

	// ErrProviderNotFound means the host cannot refresh tokens of that
	// provider (code PROVIDER_NOT_FOUND).
	ErrProviderNotFound = errors.New("credproxy: provider not found")

	// ErrConnectionLost is returned by a [Client] for every call that was
	// pending when its connection broke, and for later calls unless
	// [ClientOptions.Reconnect] is set. Nothing is retried.
	ErrConnectionLost = errors.New("credproxy: credential proxy connection lost; restart the session")

	// ErrHostOnly is returned by a [Client] for API key writes, which the
	// protocol does not carry.
	ErrHostOnly = errors.New("credproxy: API key management is not available in sandbox mode; manage keys on the host")

	// ErrFrameTooLarge means a frame's declared or actual length exceeds
	// [MaxFrameSize].
	ErrFrameTooLarge = errors.New("credproxy: frame too large")
)

// Secret is a credential value, such as an API key or an access token. It
// prints and logs as a redaction marker with every fmt verb and with slog;
// convert it with string(s) where the value itself is needed.
type Secret string

// Peer identifies the process at the other end of a connection, as the
// kernel reported it when the connection was accepted. The zero Peer is an
// unknown peer: a platform that cannot tell who connected yields it, and a
// [Policy] should treat it with suspicion. Peer is a small value type, safe
// to copy and compare.
type Peer struct {
	uid, gid uint32
	pid      int32
	hasIDs   bool
}

// NewPeer returns the Peer of a process with the given uid, gid and pid,
// as the kernel would report it; a pid of 0 or less means the pid is not
// known, and a negative uid or gid gives the unknown (zero) Peer. The
// server never takes a Peer from a client: NewPeer is for tests of a
// [Policy], and for code that identifies peers by other means.
func NewPeer(uid, gid, pid int) Peer {
	if uid < 0 || gid < 0 || uint64(uid) > math.MaxUint32 || uint64(gid) > math.MaxUint32 {
		return Peer{}
	}
	return Peer{uid: uint32(uid), gid: uint32(gid), pid: int32(max(0, min(pid, math.MaxInt32))), hasIDs: true}
}

// UID returns the peer's effective user id, and false if it is unknown.
func (p Peer) UID() (uid int, ok bool) { return int(p.uid), p.hasIDs }

// GID returns the peer's effective group id, and false if it is unknown.
func (p Peer) GID() (gid int, ok bool) { return int(p.gid), p.hasIDs }

// PID returns the peer's process id, and false if it is unknown. On macOS
// and Linux it is the pid of the process that connected, which a
// user-namespace sandbox or a VM bridge may show as another process.
func (p Peer) PID() (pid int, ok bool) { return int(p.pid), p.pid > 0 }

// String returns "uid=U gid=G pid=P", or "unknown" for an unknown peer.
func (p Peer) String() string {
	if !p.hasIDs {
		return "unknown"
	}
	s := "uid=" + strconv.FormatUint(uint64(p.uid), 10) + " gid=" + strconv.FormatUint(uint64(p.gid), 10)
	if p.pid > 0 {
		s += " pid=" + strconv.Itoa(int(p.pid))
	}
	return s
}

// LogValue logs the peer as a group of uid, gid and pid.
func (p Peer) LogValue() slog.Value {
	if !p.hasIDs {
		return slog.StringValue("unknown")
	}
	attrs := []slog.Attr{slog.Uint64("uid", uint64(p.uid)), slog.Uint64("gid", uint64(p.gid))}
	if p.pid > 0 {
		attrs = append(attrs, slog.Int("pid", int(p.pid)))
	}
	return slog.GroupValue(attrs...)
}

// errorf builds an error with the package prefix. Use it only with values
// that are safe to show: never a token, key or payload.
func errorf(format string, args ...any) error {
	return fmt.Errorf("credproxy: "+format, args...)
}
