package credproxy

import (
	"bytes"
	"errors"
	"reflect"
	"strconv"
	"strings"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
	"github.com/go-playground/validator/v10"
)

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
