package main

import (
	"regexp"
	"strings"
	"testing"
)

// The quickstart runs end to end: the socket is private and alone in its
// session's directory, the sandbox's token has every member but the
// refresh token, writes and tokenless clients are refused, and closing the
// session removes its directory.
func TestQuickstart(t *testing.T) {
	var out strings.Builder
	if err := run(&out); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`session [0-9a-f]{8} on /\S+/llxprt-cred-\d+/session-[0-9a-f]{8}/llxprt-cred-\d+-[0-9a-f]{8}\.sock \(mode Srw-------\)`),
		regexp.MustCompile(`get_token anthropic -> \{"access_token":"demo-access-token-0000","expiry":4102444800,"token_type":"Bearer","account_id":"acct-demo-42"\}`),
		regexp.MustCompile(`get_api_key openai  -> sk-demo-not-a-real-key`),
		regexp.MustCompile(`the refresh token did not cross the socket`),
		regexp.MustCompile(`save_token anthropic -> credproxy: save_token: sandbox connections cannot modify tokens \(UNAUTHORIZED\)`),
		regexp.MustCompile(`without the capability token -> credproxy: handshake: invalid or missing capability token \(UNAUTHORIZED\)`),
		regexp.MustCompile(`session closed; its socket and directory are gone`),
	} {
		if !want.MatchString(got) {
			t.Errorf("output lacks %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, "NEVER-LEAVES-THE-HOST") {
		t.Errorf("the refresh token was printed:\n%s", got)
	}
}
