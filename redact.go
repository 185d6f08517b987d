package credproxy

import (
	"cmp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// minSecretRun is the length from which redact treats a run of
// token-alphabet characters as a secret when it also has a digit or both
// cases of letters, as random strings do. Access tokens, refresh tokens,
// API keys and JWT segments are that long; the words, item names and
// paths that make a log useful are shorter, lack digits and mixed case, or
// are broken up by '/', '.' and spaces.
const minSecretRun = 20

// redact prepares text that may contain secrets, such as a store's or a
// provider's error message, for the host's log. It replaces each of the
// given secrets, as it is or in the encodings in which providers echo the
// form bodies they were sent (see appendEncodedMatches), and each
// secret-looking run of characters from the token alphabet [A-Za-z0-9_+=-]
// (see minSecretRun), with a redaction marker. Empty secrets are ignored.
// Such text never crosses the socket whatever redact makes of it.
func redact(text string, secrets ...string) string {
	return redactSpans(text, matchSecrets(text, secrets, false))
}

// maxLoggedText is how much of a provider's error text redactCut keeps.
// The text can be as long as the 1 MiB golang.org/x/oauth2 keeps of a
// response, and redact's cost grows with the text times the secret.
const maxLoggedText = 4096

// redactCut is redact for text of any length: it keeps the first
// maxLoggedText bytes, and takes a secret that the cut leaves half-spelled
// at the end for a secret, so that no prefix of one is logged.
func redactCut(text string, secrets ...string) string {
	if len(text) <= maxLoggedText {
		return redact(text, secrets...)
	}
	cut := maxLoggedText
	for cut > 0 && !utf8.RuneStart(text[cut]) {
		cut--
	}
	text = text[:cut]
	return redactSpans(text, matchSecrets(text, secrets, true)) + " [cut at " + strconv.Itoa(cut) + " bytes]"
}

// matchSecrets returns the spans of text that spell one of secrets (see
// appendEncodedMatches), and, with tail, a span for a secret begun and
// cut off at the end of text.
func matchSecrets(text string, secrets []string, tail bool) []span {
	var spans []span
	for _, s := range secrets {
		if s != "" {
			spans = appendEncodedMatches(spans, text, s, tail)
		}
	}
	return spans
}

// redactSpans replaces spans of text, then each secret-looking run of
// characters, with a redaction marker.
func redactSpans(text string, spans []span) string {
	text = replaceSpans(text, spans)
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

// span is the part text[start:end] of a text.
type span struct{ start, end int }

// maxEscapeLen is the most text that one character of a secret takes up
// in any encoding that appendEncodedMatches reads: a JSON surrogate pair,
// \uD83D\uDE00.
const maxEscapeLen = 12

// appendEncodedMatches appends to spans each part of text that spells
// secret with every character as it is or escaped (see escaped), each
// character independently: a provider that echoes a form body inside a JSON
// error percent-encodes some characters and JSON-escapes others, and an
// encoder may write a character as itself, %25 as '%' or \\ as '\', so
// which reading is meant shows only later. Rather than encode the secret
// every way providers might, it reads text once and keeps every reading
// at once: for each of the next maxEscapeLen positions, which prefixes of
// secret end there, and the earliest start of each. That takes
// O(len(text)*len(secret)) at worst and about O(len(text)) for text that
// rarely resembles the secret, with memory for maxEscapeLen+1 positions.
//
// With tail, a part of text that spells a prefix of secret and ends where
// text does is a match too: text was cut there.
func appendEncodedMatches(spans []span, text, secret string, tail bool) []span {
	const rows = maxEscapeLen + 1
	// from[j%rows][k] is the earliest start of a part of text ending at j
	// that spells secret[:k], or -1; active[j%rows] lists the k set there.
	var from, active [rows][]int
	for i := range from {
		from[i] = slices.Repeat([]int{-1}, len(secret))
	}
	for j := range len(text) {
		row := j % rows
		from[row][0] = j
		active[row] = append(active[row], 0)
		for _, k := range active[row] {
			start := from[row][k]
			from[row][k] = -1
			advance := func(n, w int) {
				end, k := j+n, k+w
				if k == len(secret) {
					spans = append(spans, span{start, end})
					return
				}
				if next := from[end%rows]; next[k] < 0 {
					active[end%rows] = append(active[end%rows], k)
					next[k] = start
				} else {
					next[k] = min(next[k], start)
				}
			}
			if text[j] == secret[k] {
				advance(1, 1)
			}
			if n, w := escaped(text[j:], secret[k:]); n > 0 {
				advance(n, w)
			}
		}
		active[row] = active[row][:0]
	}
	if row := len(text) % rows; tail {
		earliest := -1
		for _, k := range active[row] {
			if start := from[row][k]; start >= 0 && (earliest < 0 || start < earliest) {
				earliest = start
			}
		}
		if earliest >= 0 {
			spans = append(spans, span{earliest, len(text)})
		}
	}
	return spans
}

// escaped reports how many bytes of text and of secret it takes if text
// starts with an escape of secret's first character, or its first rune:
// percent-encoded, in either case of hex digit, or '+' for a space, as
// form bodies and URLs write them; or JSON-escaped, as \" \\ \/ \b \f \n
// \r \t, or \uXXXX (two of them, a surrogate pair, above U+FFFF). It
// returns 0, 0 if not.
func escaped(text, secret string) (n, w int) {
	switch {
	case text[0] == '+' && secret[0] == ' ':
		return 1, 1
	case text[0] == '%' && len(text) >= 3:
		if b, err := strconv.ParseUint(text[1:3], 16, 8); err == nil && byte(b) == secret[0] {
			return 3, 1
		}
	case text[0] == '\\' && len(text) >= 2:
		if i := strings.IndexByte(`"\/bfnrt`, text[1]); i >= 0 && "\"\\/\b\f\n\r\t"[i] == secret[0] {
			return 2, 1
		}
		r, n := unescapeRune(text)
		if s := string(r); n > 0 && strings.HasPrefix(secret, s) {
			return n, len(s)
		}
	}
	return 0, 0
}

// unescapeRune returns the rune that text starts with as a JSON \uXXXX
// escape, or a surrogate pair of two, and the length of the escape, or 0.
func unescapeRune(text string) (rune, int) {
	r := hex4(text)
	switch {
	case r < 0:
		return 0, 0
	case !utf16.IsSurrogate(r):
		return r, 6
	}
	if len(text) >= 12 {
		if pair := utf16.DecodeRune(r, hex4(text[6:])); pair != utf8.RuneError {
			return pair, 12
		}
	}
	return 0, 0 // half a pair decodes to U+FFFD, never to a secret's rune
}

// hex4 returns the value of the \uXXXX escape text starts with, or -1.
func hex4(text string) rune {
	if len(text) < 6 || text[0] != '\\' || text[1] != 'u' {
		return -1
	}
	v, err := strconv.ParseUint(text[2:6], 16, 16)
	if err != nil {
		return -1
	}
	return rune(v)
}

// replaceSpans replaces each span of text with a redaction marker; spans
// that overlap or touch get one marker between them.
func replaceSpans(text string, spans []span) string {
	if len(spans) == 0 {
		return text
	}
	slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.start, b.start) })
	var b strings.Builder
	last := 0
	for i := 0; i < len(spans); {
		start, end := spans[i].start, spans[i].end
		for i++; i < len(spans) && spans[i].start <= end; i++ {
			end = max(end, spans[i].end)
		}
		b.WriteString(text[last:start])
		b.WriteString(redacted)
		last = end
	}
	b.WriteString(text[last:])
	return b.String()
}
