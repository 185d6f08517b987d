package credproxy

import "testing"

// redact removes given secrets and secret-looking runs from log text, and
// leaves ordinary words, names and paths alone.
func TestRedact(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"keyring locked", "keyring locked"},
		{"item credproxy.token.anthropic.default not found", "item credproxy.token.anthropic.default not found"},
		{"open /root/.config/credproxy/keyring: permission denied", "open /root/.config/credproxy/keyring: permission denied"},
		{"bad token sk-ant-api03-abcdefghijklmnop0123 here", "bad token [REDACTED] here"},
		{"jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc", "jwt [REDACTED].[REDACTED].abc"},
		{"MixedCaseRandomLookingRun!", "[REDACTED]!"},
		{"org-freedesktop-secrets-collection", "org-freedesktop-secrets-collection"},
		{"", ""},
	} {
		if got := redact(tc.in); got != tc.want {
			t.Errorf("redact(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	if got := redact("value was short1 and pw", "short1"); got != "value was [REDACTED] and pw" {
		t.Errorf("redact with a known secret = %q", got)
	}
}
