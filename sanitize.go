package credproxy

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
)

// redacted is what secret-carrying values print and log as.
const redacted = "[REDACTED]"

// WithoutRefreshToken returns t without its refresh_token member; the key is
// removed, not emptied, and every other member is kept as it is. Every path
// that sends a token over the socket goes through this method (R8.1, R10).
func (t Token) WithoutRefreshToken() Token {
	i := t.index(fieldRefreshToken)
	if i < 0 {
		return t
	}
	members := make([]member, 0, len(t.members)-1)
	members = append(members, t.members[:i]...)
	members = append(members, t.members[i+1:]...)
	return newToken(members)
}

// Merge returns t overlaid with newer, member by member: each member of
// newer replaces the member of t with the same name or is added after t's
// members. If newer has no refresh_token, or an empty one, t's refresh token
// is kept (R12). The server merges this way on save_token, so a sandbox can
// update an access token but never drop or replace the host's refresh token.
func (t Token) Merge(newer Token) Token {
	members := make([]member, len(t.members), len(t.members)+len(newer.members))
	copy(members, t.members)
	merged := Token{members: members}
	for _, m := range newer.members {
		if m.name == fieldRefreshToken && string(m.value) == `""` {
			continue
		}
		if i := merged.index(m.name); i >= 0 {
			merged.members[i] = m
		} else {
			merged.members = append(merged.members, m)
		}
	}
	return newToken(merged.members)
}

func (t Token) index(name string) int {
	for i, m := range t.members {
		if m.name == name {
			return i
		}
	}
	return -1
}

// String returns a redaction marker, never the token.
func (t Token) String() string { return redacted }

// GoString returns a redaction marker, so %#v does not print the token.
func (t Token) GoString() string { return "credproxy.Token{" + redacted + "}" }

// Format prints a redaction marker for every verb, so no verb (%v, %+v,
// %#v, %s, %x, %d ...) can reach the token's fields through reflection.
func (t Token) Format(f fmt.State, verb rune) { formatRedacted(f, verb, t.GoString()) }

// LogValue logs a redaction marker, so slog.Any("token", t) is safe.
func (t Token) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalJSON fails, so that a token cannot reach a log or a file through
// encoding/json, or slog's JSON handler, by accident: a struct holding a
// Token does not marshal. Use [Token.Reveal] to store a token. (slog's
// JSON handler writes the error text in place of the value.)
func (t Token) MarshalJSON() ([]byte, error) { return nil, errImplicitMarshal }

var errImplicitMarshal = errors.New("credproxy: secrets are not marshalled implicitly, to keep them out of logs; use Token.Reveal or string(secret)")

// String returns a redaction marker, never the secret.
func (s Secret) String() string { return redacted }

// MarshalJSON fails, as [Token.MarshalJSON] does; use string(s) to put the
// secret into JSON on purpose.
func (s Secret) MarshalJSON() ([]byte, error) { return nil, errImplicitMarshal }

// GoString returns a redaction marker, so %#v does not print the secret.
func (s Secret) GoString() string { return "credproxy.Secret(" + redacted + ")" }

// Format prints a redaction marker for every verb.
func (s Secret) Format(f fmt.State, verb rune) { formatRedacted(f, verb, s.GoString()) }

// LogValue logs a redaction marker.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

func formatRedacted(f fmt.State, verb rune, goSyntax string) {
	if verb == 'v' && f.Flag('#') {
		fmt.Fprint(f, goSyntax)
		return
	}
	fmt.Fprint(f, redacted)
}

// minSecretRun is the length from which redact treats a run of
// token-alphabet characters as a secret when it also has a digit or both
// cases of letters, as random strings do. Access tokens, refresh tokens,
// API keys and JWT segments are that long; the words, item names and
// paths that make a log useful are shorter, lack digits and mixed case, or
// are broken up by '/', '.' and spaces.
const minSecretRun = 20

// redact prepares text that may contain secrets, such as a store's or a
// provider's error message, for the host's log. It replaces each of the
// given secrets, and each secret-looking run of characters from the token
// alphabet [A-Za-z0-9_+=-] (see minSecretRun), with a redaction marker.
// Such text never crosses the socket whatever redact makes of it.
func redact(text string, secrets ...string) string {
	for _, s := range secrets {
		if s != "" {
			text = strings.ReplaceAll(text, s, redacted)
		}
	}
	var b strings.Builder
	start := 0
	for i := 0; i <= len(text); i++ {
		if i < len(text) && isTokenAlphabet(text[i]) {
			continue
		}
		if run := text[start:i]; looksSecret(run) {
			b.WriteString(redacted)
		} else {
			b.WriteString(run)
		}
		if i < len(text) {
			b.WriteByte(text[i])
		}
		start = i + 1
	}
	return b.String()
}

func looksSecret(run string) bool {
	if len(run) < minSecretRun {
		return false
	}
	var digit, lower, upper bool
	for i := 0; i < len(run); i++ {
		c := run[i]
		digit = digit || '0' <= c && c <= '9'
		lower = lower || 'a' <= c && c <= 'z'
		upper = upper || 'A' <= c && c <= 'Z'
	}
	return digit || lower && upper
}

func isTokenAlphabet(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '_' || c == '-' || c == '+' || c == '='
}

// maxNameLen is the longest provider, bucket or API-key name.
const maxNameLen = 64

// validName reports whether s is a valid provider, bucket or API-key name:
// 1 to 64 characters from [A-Za-z0-9._@-]. Names become store item names,
// lock keys and log fields, so nothing else (no '/', ':', space or control
// character) can pass.
func validName(s string) bool {
	if len(s) == 0 || len(s) > maxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '.' || c == '_' || c == '@' || c == '-') {
			return false
		}
	}
	return true
}
