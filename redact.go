package credproxy

import "strings"

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
