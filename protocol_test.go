package credproxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
	"testing/synctest"
	"unicode/utf16"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

func frameOf(payload string) []byte {
	f, _ := sealFrame(append(startFrame(nil), payload...))
	return f
}

// R5.1, R5.2: readFrame reads frames whole from any split of the stream,
// and rejects empty and oversize headers before allocating.
func TestReadFrame(t *testing.T) {
	over := binary.BigEndian.AppendUint32(nil, MaxFrameSize+1)
	for _, tc := range []struct {
		name    string
		stream  []byte
		want    string
		wantErr error
	}{
		{"one frame", frameOf(`{"a":1}`), `{"a":1}`, nil},
		{"max size", frameOf(strings.Repeat("x", MaxFrameSize)), strings.Repeat("x", MaxFrameSize), nil},
		{"empty stream", nil, "", io.EOF},
		{"partial header", []byte{0, 0}, "", io.ErrUnexpectedEOF},
		{"partial payload", frameOf(`{"a":1}`)[:7], "", io.ErrUnexpectedEOF},
		{"header only", []byte{0, 0, 0, 5}, "", io.ErrUnexpectedEOF},
		{"zero length", []byte{0, 0, 0, 0, '{', '}'}, "", errEmptyFrame},
		{"one over the limit", append(over, make([]byte, MaxFrameSize+1)...), "", ErrFrameTooLarge},
		{"4 GiB", []byte{0xff, 0xff, 0xff, 0xff}, "", ErrFrameTooLarge},
	} {
		for _, split := range []struct {
			name string
			r    func([]byte) io.Reader
		}{
			{"whole", func(b []byte) io.Reader { return bytes.NewReader(b) }},
			{"byte by byte", func(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) }},
			{"half", func(b []byte) io.Reader { return iotest.HalfReader(bytes.NewReader(b)) }},
		} {
			got, err := readFrame(split.r(tc.stream), nil)
			if !errors.Is(err, tc.wantErr) || string(got) != tc.want {
				t.Errorf("%s, %s: readFrame = %.20q, %v; want %.20q, %v", tc.name, split.name, got, err, tc.want, tc.wantErr)
			}
		}
	}
}

// R5.2: a reader never allocates for a header it refuses, whatever length
// it declares: refusing a 4 GiB header costs a few hundred bytes (the error
// value), not the declared length.
func TestReadFrameDoesNotAllocateForRefusedHeader(t *testing.T) {
	buf := make([]byte, 0, 512)
	r := bytes.NewReader(nil)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	const runs = 100
	for range runs {
		r.Reset([]byte{0xff, 0xff, 0xff, 0xff})
		if _, err := readFrame(r, buf); !errors.Is(err, ErrFrameTooLarge) {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if perCall := (after.TotalAlloc - before.TotalAlloc) / runs; perCall > 1024 {
		t.Errorf("%d bytes allocated per refused header", perCall)
	}
}

// R5: the encoder refuses a frame over the limit.
func TestWriteFrameRefusesOversizePayload(t *testing.T) {
	var out bytes.Buffer
	if err := writeFrame(&out, make([]byte, MaxFrameSize+1)); !errors.Is(err, ErrFrameTooLarge) || out.Len() != 0 {
		t.Errorf("writeFrame(65537 bytes) = %v, wrote %d bytes", err, out.Len())
	}
	if err := writeFrame(&out, make([]byte, MaxFrameSize)); err != nil || out.Len() != MaxFrameSize+frameHeaderLen {
		t.Errorf("writeFrame(65536 bytes) = %v, wrote %d bytes", err, out.Len())
	}
}

// R6.1: version negotiation, rule by rule.
func TestNegotiate(t *testing.T) {
	for _, tc := range []struct {
		frame string
		ok    bool
	}{
		{`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`, true},
		{`{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}}`, true},
		{`{"op":"handshake","payload":{"minVersion":-5,"maxVersion":1}}`, true},
		{`{"op":"handshake","payload":{"minVersion":-99999999999999999999,"maxVersion":99999999999999999999}}`, true},
		{`{"op":"handshake","payload":{"minVersion":99999999999999999999,"maxVersion":99999999999999999999}}`, false},
		{`{"op":"handshake","payload":{"minVersion":2,"maxVersion":1}}`, false},
		{`{"op":"handshake","payload":{"minVersion":1,"maxVersion":0}}`, false},
		{`{"op":"handshake","payload":{"minVersion":1,"maxVersion":1.5}}`, false},
		{`{"op":"handshake","payload":{"minVersion":1,"maxVersion":null},"v":1}`, false},
		{`{"op":"handshake","payload":{"minVersion":true,"maxVersion":1}}`, false},
		{`{"v":1,"op":"handshake","payload":{"capabilityToken":"x"}}`, true},
		{`{"v":1,"op":"handshake","payload":[1]}`, true},
		{`{"v":-1,"op":"handshake"}`, false},
		{`{"v":1e0,"op":"handshake"}`, false},
		{`{"v":null,"op":"handshake"}`, false},
	} {
		req, perr := decodeRequest([]byte(tc.frame))
		if perr != nil {
			t.Fatalf("%s: %v", tc.frame, perr)
		}
		if _, ok := negotiate(req); ok != tc.ok {
			t.Errorf("negotiate(%s) = %v, want %v", tc.frame, ok, tc.ok)
		}
	}
}

// FuzzReadFrame checks, for any byte stream, that readFrame never panics,
// never returns more than the declared and allowed length, and that what it
// reads re-encodes to the same bytes.
func FuzzReadFrame(f *testing.F) {
	f.Add(frameOf(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`))
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1})
	f.Add([]byte{0, 1, 0, 0})
	f.Add(append(frameOf(`{}`), frameOf(`{"id":"x"}`)...))
	f.Fuzz(func(t *testing.T, stream []byte) {
		r := bytes.NewReader(stream)
		for {
			before := r.Len()
			payload, err := readFrame(r, nil)
			if err != nil {
				if errors.Is(err, ErrFrameTooLarge) || errors.Is(err, errEmptyFrame) {
					if before-r.Len() != frameHeaderLen {
						t.Fatalf("refused header consumed %d bytes", before-r.Len())
					}
				}
				return
			}
			declared := int(binary.BigEndian.Uint32(stream[len(stream)-before:]))
			if len(payload) != declared || declared == 0 || declared > MaxFrameSize {
				t.Fatalf("payload of %d bytes for a header of %d", len(payload), declared)
			}
			var out bytes.Buffer
			if err := writeFrame(&out, payload); err != nil || !bytes.Equal(out.Bytes(), stream[len(stream)-before:len(stream)-r.Len()]) {
				t.Fatalf("re-encoding differs: %v", err)
			}
		}
	})
}

// FuzzDecodeRequest checks, for any frame, that decoding and validation
// never panic, that whatever passes has valid names and a token with a
// string access token, and that no frame with a duplicate member name
// passes (R7, section 5 JSON rules).
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"id":"1","op":"get_token","payload":{"provider":"anthropic"}}`,
		`{"v":1,"id":2,"op":"save_token","payload":{"provider":"a","bucket":"b","token":{"access_token":"x","refresh_token":"y","n":1.50}}}`,
		`{"v":1,"id":"3","op":"list_buckets","payload":{"provider":"a"}}`,
		`{"v":1,"id":"4","op":"has_api_key","payload":{"name":"k"}}`,
		`{"v":1,"id":"5","op":"list_providers","payload":null}`,
		`{"v":1,"id":"6","op":"get_token","payload":{"provider":"a","provider":"b"}}`,
		`{"v":1,"id":"7","op":"get_token","payload":{"Provider":"a"}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`,
		"{\"id\":\"\xff\"}",
	} {
		f.Add([]byte(s))
	}
	// In a synctest bubble the clock stands still, so that the several
	// parses of a token with expires_in compare equal even when they
	// would otherwise straddle a second.
	f.Fuzz(func(t *testing.T, frame []byte) { synctest.Test(t, func(t *testing.T) { fuzzDecodeRequest(t, frame) }) })
}

func fuzzDecodeRequest(t *testing.T, frame []byte) {
	var d requestDecoder
	req, perr := d.decode(frame)
	compareWithReference(t, frame, req, perr)
	negotiate(req)
	if perr != nil {
		if perr.code != CodeInvalidRequest || perr.msg == "" {
			t.Fatalf("decode error %v", perr)
		}
		return
	}
	if hasDuplicateNames(frame) {
		t.Fatalf("frame with duplicate member names decoded: %q", frame)
	}
	a, perr := decodeArgs(Op(req.op), req.payload)
	// The connection's decoder, with its token path and its memory of
	// accepted names, must answer as the reflection decoder does: on
	// first sight, on a repeat, and after another payload.
	for i, p := range []jsontext.Value{req.payload, req.payload, jsontext.Value(`{"provider":"p","name":"n"}`), jsontext.Value(`{"provider":"p","bucket":"b"}`), jsontext.Value(`{"provider":"p"}`), jsontext.Value(`{"name":"n"}`), req.payload} {
		var members payloadMembers // read by decodeArgs
		if i == 0 {
			members = req.members // as decode read them
		}
		want, wantErr := decodeArgs(Op(req.op), p)
		got, gotErr := d.decodeArgs(Op(req.op), p, members)
		if !sameArgs(got, want) || (gotErr == nil) != (wantErr == nil) || (gotErr != nil && *gotErr != *wantErr) {
			t.Fatalf("payload %q of %q: decoder %+v %v, reference %+v %v", p, req.op, got, gotErr, want, wantErr)
		}
	}
	if perr != nil {
		return
	}
	switch Op(req.op) {
	case OpGetToken, OpSaveToken, OpRemoveToken, OpGetBucketStats, OpRefreshToken:
		if !validName(a.provider) || !validName(a.bucket) {
			t.Fatalf("invalid names passed: %q %q", a.provider, a.bucket)
		}
	case OpListBuckets:
		if !validName(a.provider) {
			t.Fatalf("invalid provider passed: %q", a.provider)
		}
	case OpGetAPIKey, OpHasAPIKey:
		if !validName(a.name) {
			t.Fatalf("invalid name passed: %q", a.name)
		}
	}
	if Op(req.op) == OpSaveToken {
		if a.token.AccessToken() == "" {
			t.Fatal("token without access token passed")
		}
		js := a.token.Reveal()
		if back, err := ParseToken(js); err != nil || !back.Equal(a.token) {
			t.Fatalf("token does not survive its own encoding %s: %v", js, err)
		}
	}
}

func sameArgs(a, b args) bool {
	return a.provider == b.provider && a.bucket == b.bucket && a.name == b.name && a.token.Equal(b.token)
}

// hasDuplicateNames is an independent check for duplicate member names: a
// small recursive descent over the JSON, written without the json package
// the server uses, so the fuzz target compares two implementations.
func hasDuplicateNames(data []byte) bool {
	p := &dupScanner{s: data}
	p.value()
	return p.dup
}

type dupScanner struct {
	s   []byte
	i   int
	dup bool
}

func (p *dupScanner) ws() {
	for p.i < len(p.s) && strings.IndexByte(" \t\r\n", p.s[p.i]) >= 0 {
		p.i++
	}
}

func (p *dupScanner) value() {
	p.ws()
	if p.i >= len(p.s) {
		return
	}
	switch p.s[p.i] {
	case '{':
		p.i++
		seen := map[string]bool{}
		for {
			p.ws()
			if p.i >= len(p.s) || p.s[p.i] == '}' {
				p.i++
				return
			}
			if p.s[p.i] == ',' {
				p.i++
				continue
			}
			name := p.str()
			if seen[name] {
				p.dup = true
			}
			seen[name] = true
			p.ws()
			if p.i < len(p.s) && p.s[p.i] == ':' {
				p.i++
			}
			p.value()
		}
	case '[':
		p.i++
		for {
			p.ws()
			if p.i >= len(p.s) || p.s[p.i] == ']' {
				p.i++
				return
			}
			if p.s[p.i] == ',' {
				p.i++
				continue
			}
			p.value()
		}
	case '"':
		p.str()
	default:
		for p.i < len(p.s) && strings.IndexByte(",}] \t\r\n", p.s[p.i]) < 0 {
			p.i++
		}
	}
}

// str reads a JSON string and returns its decoded value.
func (p *dupScanner) str() string {
	if p.i >= len(p.s) || p.s[p.i] != '"' {
		p.i++
		return ""
	}
	p.i++
	var b strings.Builder
	for p.i < len(p.s) && p.s[p.i] != '"' {
		c := p.s[p.i]
		if c == '\\' && p.i+1 < len(p.s) {
			p.i++
			switch e := p.s[p.i]; e {
			case 'u':
				r := p.hex4()
				if utf16.IsSurrogate(r) && p.i+2 < len(p.s) && p.s[p.i+1] == '\\' && p.s[p.i+2] == 'u' {
					p.i += 2
					r = utf16.DecodeRune(r, p.hex4())
				}
				b.WriteRune(r)
			case 'n':
				b.WriteByte('\n')
			case 't':
				b.WriteByte('\t')
			case 'r':
				b.WriteByte('\r')
			case 'b':
				b.WriteByte('\b')
			case 'f':
				b.WriteByte('\f')
			default:
				b.WriteByte(e)
			}
		} else {
			b.WriteByte(c)
		}
		p.i++
	}
	p.i++
	return b.String()
}

// hex4 reads the four hex digits after p.i and leaves p.i on the last.
func (p *dupScanner) hex4() rune {
	if p.i+4 >= len(p.s) {
		p.i = len(p.s)
		return 0
	}
	var r rune
	for _, h := range p.s[p.i+1 : p.i+5] {
		r = r<<4 | rune(strings.IndexByte("0123456789abcdef", h|0x20))
	}
	p.i += 4
	return r
}

// referenceEnvelope and decodeReferenceRequest are the straightforward
// decoder the allocation-saving one replaced: plain jsontext.Value members.
// FuzzDecodeRequest checks that both decode every frame alike.
type referenceEnvelope struct {
	V       jsontext.Value `json:"v"`
	ID      jsontext.Value `json:"id"`
	Op      jsontext.Value `json:"op"`
	Payload jsontext.Value `json:"payload"`
}

func compareWithReference(t *testing.T, frame []byte, req request, perr *protoError) {
	t.Helper()
	var env referenceEnvelope
	if err := json.Unmarshal(frame, &env); err != nil {
		want := jsonError(err, "request")
		if perr == nil || *perr != *want {
			t.Fatalf("frame %q: error %v, reference %v", frame, perr, want)
		}
		return
	}
	if perr != nil {
		t.Fatalf("frame %q: error %v, reference none", frame, perr)
	}
	want := request{id: decodeID(env.ID)}
	if env.Op.Kind() == '"' {
		if op, err := jsontext.AppendUnquote(nil, env.Op); err == nil {
			want.op, want.opOK = string(op), true
		}
	}
	want.version, want.versionOK = clampedInt(env.V)
	switch env.Payload.Kind() {
	case 0, 'n':
	case '{':
		want.payload = env.Payload
	default:
		want.payloadErr = true
	}
	if req.id != want.id || req.op != want.op || req.opOK != want.opOK || req.versionOK != want.versionOK ||
		(req.versionOK && req.version != want.version) || !bytes.Equal(req.payload, want.payload) ||
		(req.payload == nil) != (want.payload == nil) || req.payloadErr != want.payloadErr {
		t.Fatalf("frame %q: decoded %+v, reference %+v", frame, req, want)
	}
}
