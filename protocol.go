package credproxy

// The wire protocol, version 1 (PROTOCOL.md has the full text):
//
//	frame    = length payload
//	length   = 4 bytes, unsigned big-endian, 1 ≤ length ≤ MaxFrameSize
//	payload  = length bytes of UTF-8 JSON holding one object
//
//	handshake  {"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}
//	reply      {"v":1,"op":"handshake","ok":true,"data":{"version":1}}
//	request    {"v":1,"id":"<id>","op":"<op>","payload":{...}}
//	success    {"id":"<id>","ok":true,"data":{...}}
//	failure    {"id":"<id>","ok":false,"code":"<CODE>","error":"<text>"[,"retryAfter":<s>][,"denied":"<kind>"]}
//
// Every function here is pure, over byte slices, io.Reader and io.Writer, so
// the decoders can be fuzzed without a socket.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"strconv"
	"strings"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
	"github.com/go-playground/validator/v10"
)

// ProtocolVersion is the protocol version this package speaks.
const ProtocolVersion = 1

// MaxFrameSize is the largest frame payload, in bytes, that either side
// sends or accepts (PROTOCOL.md, "Frames").
const MaxFrameSize = 65536

const frameHeaderLen = 4

// maxIDLen bounds a request id, so that an error response echoing it always
// fits in a frame. Clients use UUIDs (36 bytes) or counters.
const maxIDLen = 256

// Op is the name of a protocol operation.
type Op string

// The operations of protocol version 1.
const (
	OpGetToken       Op = "get_token"
	OpSaveToken      Op = "save_token"
	OpRemoveToken    Op = "remove_token"
	OpListProviders  Op = "list_providers"
	OpListBuckets    Op = "list_buckets"
	OpGetBucketStats Op = "get_bucket_stats"
	OpGetAPIKey      Op = "get_api_key"
	OpListAPIKeys    Op = "list_api_keys"
	OpHasAPIKey      Op = "has_api_key"
	OpRefreshToken   Op = "refresh_token"
)

const opHandshake = "handshake"

// knownOps are the operation names, quoted as they appear on the wire, so
// that decoding a request's op needs no allocation in the common case.
var knownOps = func() map[string]string {
	m := make(map[string]string)
	for _, op := range []string{opHandshake, string(OpGetToken), string(OpSaveToken), string(OpRemoveToken),
		string(OpListProviders), string(OpListBuckets), string(OpGetBucketStats), string(OpGetAPIKey),
		string(OpListAPIKeys), string(OpHasAPIKey), string(OpRefreshToken)} {
		m[`"`+op+`"`] = op
	}
	return m
}()

// Code is an error code carried by a failure response.
type Code string

// The error codes of protocol version 1. Each maps to the sentinel error of
// the same meaning (see [RemoteError.Is]).
const (
	CodeNotFound            Code = "NOT_FOUND"
	CodeInvalidRequest      Code = "INVALID_REQUEST"
	CodeUnauthorized        Code = "UNAUTHORIZED"
	CodeRateLimited         Code = "RATE_LIMITED"
	CodeInternalError       Code = "INTERNAL_ERROR"
	CodeUnknownVersion      Code = "UNKNOWN_VERSION"
	CodeResourceExhausted   Code = "RESOURCE_EXHAUSTED"
	CodeRefreshNotAvailable Code = "REFRESH_NOT_AVAILABLE"
	CodeReauthRequired      Code = "REAUTH_REQUIRED"
	CodeProviderNotFound    Code = "PROVIDER_NOT_FOUND"
)

// sentinel returns the package error for c. The codes other
// implementations send (the reference project's hosts, whose protocol
// version 2 adds login over the socket and a GitHub broker) map to the
// nearest sentinel, and a code nobody defines to ErrInternal, the
// catch-all: the server could not complete the request (PROTOCOL.md,
// "Responses").
func (c Code) sentinel() error {
	switch c {
	case CodeNotFound,
		// A login session the host no longer has: it drops an expired
		// one at once (the next request for it gets SESSION_NOT_FOUND),
		// and a used one when it next sweeps, so one sentinel for the
		// three keeps the answer from depending on timing.
		"SESSION_NOT_FOUND", "SESSION_EXPIRED", "SESSION_ALREADY_USED":
		return ErrNotFound
	case CodeInvalidRequest, "INVALID_PARAM", "UNKNOWN_OP":
		return ErrInvalidRequest
	case CodeUnauthorized, "FORBIDDEN", "PERMISSION_DENIED", "ACCESS_DENIED":
		return ErrDenied
	case CodeRateLimited:
		return ErrRateLimited
	case CodeUnknownVersion:
		return ErrUnknownVersion
	case CodeResourceExhausted:
		return ErrResourceExhausted
	case CodeRefreshNotAvailable:
		return ErrRefreshNotAvailable
	case CodeReauthRequired, "HOST_AUTH_REQUIRED":
		return ErrReauthRequired
	case CodeProviderNotFound, "PROVIDER_NOT_CONFIGURED":
		return ErrProviderNotFound
	case "CANCELLED": // the host cancelled the operation
		return context.Canceled
	}
	// INTERNAL_ERROR, and REFRESH_FAILED, EXCHANGE_FAILED, POLL_FAILED,
	// FLOW_INITIATION_FAILED, RESPONSE_TOO_LARGE, GITHUB_ERROR,
	// HOST_GH_UNAVAILABLE and any code not named here.
	return ErrInternal
}

// errEmptyFrame is returned by readFrame for a zero-length header.
var errEmptyFrame = errors.New("credproxy: empty frame")

// readFrame reads one frame from r into buf, which it grows as needed, and
// returns the payload. The declared length is checked against MaxFrameSize
// before anything is allocated, so a reader never holds more than the
// declared, allowed length. A header over the limit yields an error
// wrapping ErrFrameTooLarge; a zero header yields errEmptyFrame. A stream
// that ends inside a frame yields io.ErrUnexpectedEOF, and one that ends
// between frames io.EOF.
func readFrame(r io.Reader, buf []byte) ([]byte, error) {
	if cap(buf) < frameHeaderLen {
		buf = make([]byte, 0, 512)
	}
	header := buf[:frameHeaderLen]
	if _, err := io.ReadFull(r, header); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(header)
	switch {
	case n == 0:
		return nil, errEmptyFrame
	case n > MaxFrameSize:
		return nil, errorf("frame of %d bytes exceeds the %d-byte limit: %w", n, MaxFrameSize, ErrFrameTooLarge)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	payload := buf[:n]
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return payload, nil
}

// startFrame appends room for a frame header to dst; the frame's JSON is
// appended after it and sealFrame fills the header in.
func startFrame(dst []byte) []byte { return append(dst, 0, 0, 0, 0) }

// sealFrame fills in the header of a frame begun with startFrame. It
// refuses a payload over MaxFrameSize.
func sealFrame(frame []byte) ([]byte, error) {
	n := len(frame) - frameHeaderLen
	if n > MaxFrameSize {
		return nil, errorf("frame of %d bytes exceeds the %d-byte limit: %w", n, MaxFrameSize, ErrFrameTooLarge)
	}
	binary.BigEndian.PutUint32(frame, uint32(n))
	return frame, nil
}

// writeFrame writes payload as one frame with a single Write call.
func writeFrame(w io.Writer, payload []byte) error {
	frame, err := sealFrame(append(startFrame(make([]byte, 0, frameHeaderLen+len(payload))), payload...))
	if err != nil {
		return err
	}
	_, err = w.Write(frame)
	return err
}

// protoError is a failure to answer with a code and a fixed, safe message,
// and for a policy's refusal, the kind of thing refused (see denial).
type protoError struct {
	code   Code
	msg    string
	denied string
}

func (e *protoError) Error() string { return string(e.code) + ": " + e.msg }

func invalid(msg string) *protoError { return &protoError{code: CodeInvalidRequest, msg: msg} }

// unknownID is echoed when a request's id cannot be read.
const unknownID = "unknown"

// envelope is the top level of every frame. Member names match exactly and
// unknown members are ignored (PROTOCOL.md, "JSON rules"); the json package
// rejects duplicate names at any depth and invalid UTF-8. Each member decodes itself from the
// raw value as it is read, so that decoding copies nothing but the id and
// the payload, and the payload into a buffer its requestDecoder reuses.
type envelope struct {
	V       envVersion `json:"v"`
	ID      envID      `json:"id"`
	Op      envOp      `json:"op"`
	Payload envPayload `json:"payload"`
}

type envVersion struct {
	n  int64
	ok bool // an integer
}

func (v *envVersion) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	raw, err := dec.ReadValue()
	v.n, v.ok = clampedInt(raw)
	return err
}

type envID string

func (id *envID) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	raw, err := dec.ReadValue()
	*id = envID(decodeID(raw))
	return err
}

type envOp struct {
	op string
	ok bool // a string
}

func (o *envOp) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	raw, err := dec.ReadValue()
	*o = envOp{}
	if err == nil {
		o.op, o.ok = decodeOp(raw)
	}
	return err
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

type envPayload struct {
	buf   []byte // the payload object, when there is one
	isObj bool
	bad   bool // present, but neither an object nor null
}

func (p *envPayload) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	raw, err := dec.ReadValue()
	if err != nil {
		return err
	}
	p.isObj, p.bad = false, false
	switch raw.Kind() {
	case 'n':
	case '{':
		p.buf, p.isObj = append(p.buf[:0], raw...), true
	default:
		p.bad = true
	}
	return nil
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
	env   envelope

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

// decodeRequest parses a frame into a request. Only malformed JSON fails
// here; a bad id, op or payload is recorded for the caller to answer in the
// order the protocol sets.
func decodeRequest(frame []byte) (request, *protoError) {
	var d requestDecoder
	return d.decode(frame)
}

func (d *requestDecoder) decode(frame []byte) (request, *protoError) {
	if req, ok := d.decodeTokens(frame); ok {
		return req, nil
	}
	d.env = envelope{Payload: envPayload{buf: d.env.Payload.buf[:0]}}
	if err := json.Unmarshal(frame, &d.env); err != nil {
		return request{}, jsonError(err, "request")
	}
	env := &d.env
	req := request{id: string(env.ID), op: env.Op.op, opOK: env.Op.ok, version: env.V.n, versionOK: env.V.ok,
		payloadErr: env.Payload.bad}
	if env.Payload.isObj {
		req.payload = env.Payload.buf
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

// Payload schemas, one struct per operation. Member names match exactly,
// unknown members are rejected, null means absent, and the validator
// checks presence and the name pattern before anything else runs ("Requests").
type (
	tokenArgs struct {
		Provider string  `json:"provider" validate:"required,credname"`
		Bucket   *string `json:"bucket" validate:"omitnil,credname"`
	}
	saveTokenArgs struct {
		Provider string  `json:"provider" validate:"required,credname"`
		Bucket   *string `json:"bucket" validate:"omitnil,credname"`
		Token    *Token  `json:"token" validate:"required"`
	}
	providerArgs struct {
		Provider string `json:"provider" validate:"required,credname"`
	}
	keyArgs struct {
		Name string `json:"name" validate:"required,credname"`
	}
	noArgs struct{}
)

// args is a validated payload, with the bucket normalised.
type args struct {
	provider string
	bucket   string
	name     string
	token    Token
}

var validate = newValidator()

func newValidator() *validator.Validate {
	v := validator.New(validator.WithRequiredStructEnabled())
	if err := v.RegisterValidation("credname", func(fl validator.FieldLevel) bool {
		return validName(fl.Field().String())
	}); err != nil {
		panic(err)
	}
	v.RegisterTagNameFunc(func(f reflect.StructField) string {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		return name
	})
	return v
}

// decodeArgs parses and validates the payload of a known operation, as
// the function decodeArgs does; members are the payload's, if decode read
// them. Payloads whose members are all names, given as strings without
// escapes, take the token path and the same validator; anything else, and
// anything the validator refuses, is left to the function, which also
// words the error.
//
// The names the validator last accepted are kept, one set per payload
// shape: a connection mostly asks for the same provider again, and the
// validator's verdict on the same names cannot change, so a repeat is
// answered without it and without copying the names again.
func (d *requestDecoder) decodeArgs(op Op, payload jsontext.Value, members payloadMembers) (args, *protoError) {
	var last *acceptedNames
	var name0, name1 string // quoted, as on the wire
	switch op {
	case OpGetToken, OpRemoveToken, OpGetBucketStats, OpRefreshToken:
		last, name0, name1 = &d.lastToken, `"provider"`, `"bucket"`
	case OpListBuckets:
		last, name0 = &d.lastProvider, `"provider"`
	case OpGetAPIKey, OpHasAPIKey:
		last, name0 = &d.lastKey, `"name"`
	default:
		return decodeArgs(op, payload)
	}
	if !members.read {
		members = d.membersOf(payload)
	}
	raw, set, ok := members.match(name0, name1)
	if !ok {
		return decodeArgs(op, payload)
	}
	if !last.matches(raw, set) {
		names := acceptedNames{values: [2]string{string(raw[0]), string(raw[1])}, set: set, ok: true}
		if !d.valid(op, &names) {
			return decodeArgs(op, payload)
		}
		*last = names
	}
	return last.args(op), nil
}

// acceptedNames are the member values of a payload the validator accepted.
type acceptedNames struct {
	values [2]string
	set    [2]bool // present and not null
	ok     bool
}

func (n *acceptedNames) matches(raw [2][]byte, set [2]bool) bool {
	return n.ok && n.set == set && string(raw[0]) == n.values[0] && string(raw[1]) == n.values[1]
}

func (n *acceptedNames) args(op Op) args {
	switch op {
	case OpGetAPIKey, OpHasAPIKey:
		return args{name: n.values[0]}
	case OpListBuckets:
		return args{provider: n.values[0]}
	}
	a := args{provider: n.values[0], bucket: DefaultBucket}
	if n.set[1] {
		a.bucket = n.values[1]
	}
	return a
}

// valid runs the validator on names as the payload struct of op. The
// struct is kept in d, so that handing it to the validator does not move
// it to the heap.
func (d *requestDecoder) valid(op Op, n *acceptedNames) bool {
	switch op {
	case OpGetAPIKey, OpHasAPIKey:
		d.key = keyArgs{Name: n.values[0]}
		return validate.Struct(&d.key) == nil
	case OpListBuckets:
		d.names = providerArgs{Provider: n.values[0]}
		return validate.Struct(&d.names) == nil
	}
	d.tokenArgs = tokenArgs{Provider: n.values[0]}
	if n.set[1] {
		d.bucket = n.values[1]
		d.tokenArgs.Bucket = &d.bucket
	}
	return validate.Struct(&d.tokenArgs) == nil
}

// payloadMembers are the members of a payload object, as a pass over it
// found them, when there are at most two, each a string without escapes or
// null, under a name without escapes: the shape of every payload the token
// path decodes. Names are quoted, values unquoted (nil for null); both
// alias the frame.
type payloadMembers struct {
	read   bool // a pass has filled this in
	simple bool // the payload has that shape
	n      int
	names  [2][]byte
	values [2][]byte
	null   [2]bool
}

// readPayload reads the payload object dec is at, validating all of it,
// and returns it as it is in frame, which dec is reading in place, with its
// members.
func readPayload(dec *jsontext.Decoder, frame []byte) (jsontext.Value, payloadMembers, bool) {
	m := payloadMembers{read: true, simple: true}
	if tok, err := dec.ReadToken(); err != nil || tok.Kind() != '{' {
		return nil, m, false
	}
	start := dec.InputOffset() - 1
	for dec.PeekKind() == '"' {
		name, err := dec.ReadValue()
		if err != nil {
			return nil, m, false
		}
		m.simple = m.simple && m.n < len(m.names) && bytes.IndexByte(name, '\\') < 0
		if m.simple {
			m.names[m.n] = name
		}
		value, err := dec.ReadValue()
		switch {
		case err != nil:
			return nil, m, false
		case !m.simple:
		case value.Kind() == 'n':
			m.values[m.n], m.null[m.n] = nil, true
			m.n++
		case value.Kind() == '"' && bytes.IndexByte(value, '\\') < 0:
			m.values[m.n] = value[1 : len(value)-1]
			m.n++
		default:
			m.simple = false
		}
	}
	if tok, err := dec.ReadToken(); err != nil || tok.Kind() != '}' {
		return nil, m, false
	}
	return frame[start:dec.InputOffset()], m, true
}

// membersOf reads the members of payload, a valid object or nil.
func (d *requestDecoder) membersOf(payload []byte) payloadMembers {
	if payload == nil {
		return payloadMembers{read: true, simple: true}
	}
	_, m, ok := readPayload(d.reset(payload), payload)
	m.simple = m.simple && ok
	return m
}

// match returns the values of members named name0 and name1, given quoted
// ("" for none), and which of them are set (present and not null); or
// false if the payload has another member or another shape.
func (m *payloadMembers) match(name0, name1 string) (values [2][]byte, set [2]bool, ok bool) {
	if !m.simple {
		return values, set, false
	}
	for i := range m.n {
		j := 0
		switch string(m.names[i]) {
		case name0:
		case name1:
			j = 1
		default: // unknown: json.Unmarshal words the error
			return values, set, false
		}
		values[j], set[j] = m.values[i], !m.null[i]
	}
	return values, set, true
}

// decodeArgs parses and validates the payload of a known operation. The
// error messages name the member at fault, never its value.
func decodeArgs(op Op, payload jsontext.Value) (args, *protoError) {
	if payload == nil {
		payload = jsontext.Value("{}")
	}
	var a args
	switch op {
	case OpGetToken, OpRemoveToken, OpGetBucketStats, OpRefreshToken:
		var p tokenArgs
		if err := decodePayload(payload, &p); err != nil {
			return a, err
		}
		a.provider, a.bucket = p.Provider, bucketOrDefault(p.Bucket)
	case OpSaveToken:
		var p saveTokenArgs
		if err := decodePayload(payload, &p); err != nil {
			return a, err
		}
		a.provider, a.bucket, a.token = p.Provider, bucketOrDefault(p.Bucket), *p.Token
	case OpListBuckets:
		var p providerArgs
		if err := decodePayload(payload, &p); err != nil {
			return a, err
		}
		a.provider = p.Provider
	case OpGetAPIKey, OpHasAPIKey:
		var p keyArgs
		if err := decodePayload(payload, &p); err != nil {
			return a, err
		}
		a.name = p.Name
	case OpListProviders, OpListAPIKeys:
		if err := decodePayload(payload, &noArgs{}); err != nil {
			return a, err
		}
	default:
		return a, invalid("unknown operation")
	}
	return a, nil
}

func bucketOrDefault(b *string) string {
	if b == nil {
		return DefaultBucket
	}
	return *b
}

func decodePayload(payload jsontext.Value, dst any) *protoError {
	if err := json.Unmarshal(payload, dst, json.RejectUnknownMembers(true)); err != nil {
		return payloadError(err)
	}
	if err := validate.Struct(dst); err != nil {
		var verrs validator.ValidationErrors
		if errors.As(err, &verrs) && len(verrs) > 0 {
			field := verrs[0].Field()
			if verrs[0].Tag() == "required" {
				return invalid(field + " is required")
			}
			return invalid(field + " must match ^[A-Za-z0-9._@-]{1,64}$")
		}
		return invalid("invalid payload")
	}
	return nil
}

// payloadError explains a json error in a payload by the member's name.
// Names of unknown members are echoed only when they are valid names.
func payloadError(err error) *protoError {
	var terr *TokenError
	if errors.As(err, &terr) {
		return invalid("token: " + terr.reason)
	}
	var serr *json.SemanticError
	if !errors.As(err, &serr) {
		return jsonError(err, "payload")
	}
	field := strings.TrimPrefix(string(serr.JSONPointer), "/")
	if errors.Is(err, json.ErrUnknownName) {
		if validName(field) {
			return invalid("unknown payload member " + strconv.Quote(field))
		}
		return invalid("unknown payload member")
	}
	switch field {
	case "provider", "bucket", "name":
		return invalid(field + " must be a string")
	case "token":
		return invalid("token must be an object")
	}
	return invalid("invalid payload")
}

// Response encoding. Each append function writes one JSON object; callers
// frame it with startFrame and sealFrame.

var (
	handshakeOK   = []byte(`{"v":1,"op":"handshake","ok":true,"data":{"version":1}}`)
	handshakeFail = []byte(`{"v":1,"op":"handshake","ok":false,"code":"UNKNOWN_VERSION","error":"unsupported protocol version"}`)
	// handshakeUnauthorized refuses a handshake without the session's
	// capability token.
	handshakeUnauthorized = []byte(`{"v":1,"op":"handshake","ok":false,"code":"UNAUTHORIZED","error":"invalid or missing capability token"}`)
)

// appendOKStart appends the opening of a success response, up to its data
// member's value; the caller appends the data object and a closing '}'.
func appendOKStart(dst []byte, id string) []byte {
	dst = append(dst, `{"id":`...)
	dst, _ = jsontext.AppendQuote(dst, id)
	return append(dst, `,"ok":true,"data":`...)
}

// appendFailure appends the failure response of e. retryAfter (whole
// seconds) is written only when positive, and the kind of a denial only
// when e has one.
func appendFailure(dst []byte, id string, e *protoError, retryAfter int) []byte {
	dst = append(dst, `{"id":`...)
	dst, _ = jsontext.AppendQuote(dst, id)
	dst = append(dst, `,"ok":false,"code":"`...)
	dst = append(dst, e.code...)
	dst = append(dst, `","error":`...)
	dst, _ = jsontext.AppendQuote(dst, e.msg)
	if retryAfter > 0 {
		dst = append(dst, `,"retryAfter":`...)
		dst = strconv.AppendInt(dst, int64(retryAfter), 10)
	}
	if e.denied != "" {
		dst = append(dst, `,"denied":`...)
		dst, _ = jsontext.AppendQuote(dst, e.denied)
	}
	return append(dst, '}')
}

// appendNames appends {"<member>":[names...]}.
func appendNames(dst []byte, member string, names []string) []byte {
	dst = append(dst, `{"`...)
	dst = append(dst, member...)
	dst = append(dst, `":[`...)
	for i, n := range names {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst, _ = jsontext.AppendQuote(dst, n)
	}
	return append(dst, "]}"...)
}

// response is a decoded response, as the client reads it. Denied is kept
// raw, so that a server that gives it another type does not make the
// response malformed: only a string names a kind.
type response struct {
	ID         jsontext.Value `json:"id"`
	OK         bool           `json:"ok"`
	Data       jsontext.Value `json:"data"`
	Code       Code           `json:"code"`
	Error      string         `json:"error"`
	RetryAfter float64        `json:"retryAfter"`
	Denied     jsontext.Value `json:"denied"`
}

// deniedKind returns the kind a failure's "denied" member names, or "".
func (r *response) deniedKind() string {
	if r.Denied.Kind() != '"' {
		return ""
	}
	kind, err := jsontext.AppendUnquote(nil, r.Denied)
	if err != nil {
		return ""
	}
	return string(kind)
}

func decodeResponse(frame []byte) (response, error) {
	var r response
	if err := json.Unmarshal(frame, &r); err != nil {
		return response{}, errorf("malformed response from server: %w", ErrInternal)
	}
	return r, nil
}
