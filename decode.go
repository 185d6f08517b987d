package credproxy

import (
	"bytes"
	"errors"
	"io"
	"strconv"
	"strings"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// envelope is the top level of a frame as the fallback decoder reads it.
// Member names match exactly and unknown members are ignored (PROTOCOL.md,
// "JSON rules"); the json package rejects duplicate names at any depth
// and invalid UTF-8.
type envelope struct {
	V       jsontext.Value `json:"v"`
	ID      jsontext.Value `json:"id"`
	Op      jsontext.Value `json:"op"`
	Payload jsontext.Value `json:"payload"`
}

// decodeOp returns the text of an op value and whether it is a string.
func decodeOp(raw jsontext.Value) (string, bool) {
	if raw.Kind() != '"' {
		return "", false
	}
	if op, known := knownOps[string(raw)]; known { // the compiler makes this lookup without allocating
		return op, true
	}
	op, err := jsontext.AppendUnquote(nil, raw)
	if err != nil {
		return "", false
	}
	return string(op), true
}

// requestDecoder decodes the envelopes of one connection, reusing its
// buffers; the payload of a request it returns is valid until its next
// decode, or until the frame it decoded is overwritten.
//
// Most frames take the token path (decodeTokens): one pass of a
// jsontext.Decoder over the frame, which enforces every rule of the
// spec's JSON (syntax, UTF-8, duplicate names at any depth, one value),
// with no reflection. Whatever that path does not take on (an escaped
// member name, anything malformed) is decoded by json.Unmarshal into
// envelope, which also gives the error its message. FuzzDecodeRequest
// checks that the two agree with a reference decoder on every frame.
type requestDecoder struct {
	frame bytes.Buffer // wraps the frame, which jsontext then reads in place
	dec   jsontext.Decoder

	// The payloads the token path validates (see valid), and the names it
	// last accepted, by payload shape (see decodeArgs).
	tokenArgs                        tokenArgs
	bucket                           string
	names                            providerArgs
	key                              keyArgs
	lastToken, lastProvider, lastKey acceptedNames
}

// request is a decoded envelope.
type request struct {
	id        string         // "" when the id is missing or invalid
	op        string         // "" when missing or not a string
	opOK      bool           // op was a string
	version   int64          // top-level v, when versionOK
	versionOK bool           // v is present and an integer
	payload   jsontext.Value // raw object; nil when absent or null
	// payloadErr is set when payload is present but not an object or null.
	payloadErr bool
	members    payloadMembers // of payload, when the token path read them
}

// decode parses a frame into a request. Only malformed JSON fails here; a
// bad id, op or payload is recorded for the caller to answer in the order
// the protocol sets.
func (d *requestDecoder) decode(frame []byte) (request, *protoError) {
	if req, ok := d.decodeTokens(frame); ok {
		return req, nil
	}
	// The frames the token path leaves (escaped member names, malformed
	// JSON) are rare, so this path is plain: it also words the error.
	var env envelope
	if err := json.Unmarshal(frame, &env); err != nil {
		return request{}, jsonError(err, "request")
	}
	req := request{id: decodeID(env.ID)}
	req.op, req.opOK = decodeOp(env.Op)
	req.version, req.versionOK = clampedInt(env.V)
	switch env.Payload.Kind() {
	case 0, 'n':
	case '{':
		req.payload = env.Payload
	default:
		req.payloadErr = true
	}
	return req, nil
}

// decodeTokens decodes a well-formed frame whose top-level member names
// have no escapes, reading the frame in place: the payload it returns
// aliases the frame. It reports false for anything else, and then the
// caller decodes the frame again.
func (d *requestDecoder) decodeTokens(frame []byte) (req request, ok bool) {
	dec := d.reset(frame)
	if tok, err := dec.ReadToken(); err != nil || tok.Kind() != '{' {
		return request{}, false
	}
	for dec.PeekKind() == '"' {
		name, err := dec.ReadValue()
		if err != nil || bytes.IndexByte(name, '\\') >= 0 {
			return request{}, false
		}
		if string(name) == `"payload"` && dec.PeekKind() == '{' {
			if req.payload, req.members, ok = readPayload(dec, frame); !ok {
				return request{}, false
			}
			req.payloadErr = false
			continue
		}
		value, err := dec.ReadValue()
		if err != nil {
			return request{}, false
		}
		switch string(name[1 : len(name)-1]) {
		case "v":
			req.version, req.versionOK = clampedInt(value)
		case "id":
			req.id = decodeID(value)
		case "op":
			req.op, req.opOK = decodeOp(value)
		case "payload": // not an object
			req.payload, req.members, req.payloadErr = nil, payloadMembers{}, value.Kind() != 'n'
		}
	}
	if tok, err := dec.ReadToken(); err != nil || tok.Kind() != '}' {
		return request{}, false
	}
	if _, err := dec.ReadToken(); err != io.EOF { // one value, and nothing after it
		return request{}, false
	}
	return req, true
}

// reset points the decoder at data, which it reads in place.
func (d *requestDecoder) reset(data []byte) *jsontext.Decoder {
	d.frame = *bytes.NewBuffer(data)
	d.dec.Reset(&d.frame)
	return &d.dec
}

// decodeID returns the request id as it is echoed: a non-empty string as
// itself, an integer as its decimal text, anything else as "".
func decodeID(raw jsontext.Value) string {
	switch raw.Kind() {
	case '"':
		if !bytes.ContainsRune(raw, '\\') { // no escapes: the text between the quotes is the id
			if len(raw)-2 > maxIDLen {
				return ""
			}
			return string(raw[1 : len(raw)-1])
		}
		id, err := jsontext.AppendUnquote(nil, raw)
		if err != nil || len(id) > maxIDLen {
			return ""
		}
		return string(id)
	case '0':
		if !isInteger(raw) || len(raw) > maxIDLen {
			return ""
		}
		return string(raw)
	}
	return ""
}

// isInteger reports whether a JSON number has no fraction and no exponent.
func isInteger(num jsontext.Value) bool {
	return len(num) > 0 && !strings.ContainsAny(string(num), ".eE")
}

// jsonError turns a json package error into a fixed message. The package's
// own text is never used: it can quote input bytes.
func jsonError(err error, what string) *protoError {
	var serr *json.SemanticError
	switch {
	case errors.Is(err, jsontext.ErrDuplicateName):
		return invalid("duplicate member name in " + what)
	case errors.As(err, &serr) && serr.JSONPointer == "" && serr.Err == nil:
		return invalid(what + " must be a JSON object")
	}
	return invalid("malformed JSON in " + what)
}

// handshakeArgs are the members of a handshake payload version 1 reads.
type handshakeArgs struct {
	MinVersion      jsontext.Value `json:"minVersion"`
	MaxVersion      jsontext.Value `json:"maxVersion"`
	CapabilityToken jsontext.Value `json:"capabilityToken"`
}

// presentedToken returns the capabilityToken member of a handshake, and
// false if it is absent or not a string.
func presentedToken(req request) (string, bool) {
	var args handshakeArgs
	if req.payload == nil {
		return "", false
	}
	// The frame already parsed, so the payload is a valid object.
	_ = json.Unmarshal(req.payload, &args)
	if args.CapabilityToken.Kind() != '"' {
		return "", false
	}
	tok, err := jsontext.AppendUnquote(nil, args.CapabilityToken)
	if err != nil {
		return "", false
	}
	return string(tok), true
}

// negotiate returns the version a handshake agrees on, or false
// (PROTOCOL.md, "Handshake"). If the payload has both minVersion and maxVersion as integers, version 1 is
// chosen when min ≤ max, max ≥ 1 and min ≤ 1. If it has neither (or there
// is no payload object), the top-level v must be the integer 1. Anything
// else is incompatible. Other payload members are ignored.
func negotiate(req request) (int, bool) {
	var args handshakeArgs
	if req.payload != nil {
		// The frame already parsed, so the payload is a valid object.
		_ = json.Unmarshal(req.payload, &args)
	}
	hasMin := args.MinVersion.Kind() != 0 && args.MinVersion.Kind() != 'n'
	hasMax := args.MaxVersion.Kind() != 0 && args.MaxVersion.Kind() != 'n'
	switch {
	case hasMin && hasMax:
		lo, ok1 := clampedInt(args.MinVersion)
		hi, ok2 := clampedInt(args.MaxVersion)
		if ok1 && ok2 && lo <= hi && hi >= ProtocolVersion && lo <= ProtocolVersion {
			return ProtocolVersion, true
		}
	case !hasMin && !hasMax:
		if req.versionOK && req.version == ProtocolVersion {
			return ProtocolVersion, true
		}
	}
	return 0, false
}

// clampedInt parses a JSON integer, clamping values beyond int64 to its
// bounds: the comparisons negotiate makes give the same answers either way.
func clampedInt(raw jsontext.Value) (int64, bool) {
	if raw.Kind() != '0' || !isInteger(raw) {
		return 0, false
	}
	n, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, false
	}
	return n, true
}
