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
	"context"
	"encoding/binary"
	"errors"
	"io"
	"strconv"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
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
