package credproxy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/go-json-experiment/json"
)

// credentialsFile is the format ImportCredentials reads.
type credentialsFile struct {
	Tokens map[string]map[string]Token `json:"tokens"`
	Keys   map[string]string           `json:"keys"`
}

// ImportCredentials saves into st the tokens and API keys in data, a JSON
// object of the form
//
//	{"tokens": {PROVIDER: {BUCKET: TOKEN}}, "keys": {NAME: KEY}}
//
// where both members are optional; examples/memserver -tokens and
// credproxy run --import read files of this form. Unknown members,
// duplicate names, invalid names and invalid tokens are errors, and so is
// a token that holds its refresh token under another name than
// refresh_token (refreshToken, say; see [Token.NormalizeRefreshToken]);
// error messages give the location, never a value. Items are saved in
// name order, and an error stops the import: what was saved before it
// stays saved.
func ImportCredentials(ctx context.Context, st Store, data []byte) error {
	var f credentialsFile
	if err := json.Unmarshal(data, &f, json.RejectUnknownMembers(true)); err != nil {
		return errorf("credentials: %s", safeJSONError(err))
	}
	for _, provider := range slices.Sorted(maps.Keys(f.Tokens)) {
		buckets := f.Tokens[provider]
		for _, bucket := range slices.Sorted(maps.Keys(buckets)) {
			// A refresh token under another name would never be used, nor
			// served; refuse it rather than store it unnoticed.
			if _, renamed, err := buckets[bucket].NormalizeRefreshToken(); err != nil {
				return errorf("credentials: token %q/%q: %w", provider, bucket, err)
			} else if renamed != "" {
				return errorf("credentials: token %q/%q: member %q holds a refresh token; rename it refresh_token", provider, bucket, renamed)
			}
			if err := st.SaveToken(ctx, provider, bucket, buckets[bucket]); err != nil {
				return errorf("credentials: token %q/%q: %w", provider, bucket, err)
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(f.Keys)) {
		if err := st.SaveAPIKey(ctx, name, Secret(f.Keys[name])); err != nil {
			return errorf("credentials: key %q: %w", name, err)
		}
	}
	return nil
}

// safeJSONError describes a parse error without the json package's own
// text, which can quote a value, a secret perhaps.
func safeJSONError(err error) string {
	var terr *TokenError
	var serr *json.SemanticError
	switch {
	case errors.As(err, &serr) && errors.As(err, &terr):
		return fmt.Sprintf("%v (at %s)", terr, serr.JSONPointer)
	case errors.As(err, &serr) && errors.Is(err, json.ErrUnknownName):
		return fmt.Sprintf("unknown member at %s; the format is {\"tokens\":{PROVIDER:{BUCKET:TOKEN}},\"keys\":{NAME:KEY}}", serr.JSONPointer)
	case errors.As(err, &serr):
		return fmt.Sprintf("invalid value at %s", serr.JSONPointer)
	}
	return "malformed JSON"
}
