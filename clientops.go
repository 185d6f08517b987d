package credproxy

import (
	"context"
	"errors"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

func tokenPayload(provider, bucket string) []byte {
	p := append([]byte(`{"provider":`), quote(provider)...)
	if bucket != "" {
		p = append(append(p, `,"bucket":`...), quote(bucket)...)
	}
	return append(p, '}')
}

func quote(s string) []byte {
	q, _ := jsontext.AppendQuote(nil, s)
	return q
}

// GetToken returns the token of provider and bucket ("" for the default
// bucket), without its refresh token. An absent token is an error matching
// [ErrNotFound].
func (c *Client) GetToken(ctx context.Context, provider, bucket string) (Token, error) {
	return c.token(ctx, OpGetToken, provider, bucket)
}

// token runs op, get_token or refresh_token, and returns its token.
func (c *Client) token(ctx context.Context, op Op, provider, bucket string) (Token, error) {
	data, err := c.call(ctx, op, tokenPayload(provider, bucket))
	if err != nil {
		return Token{}, err
	}
	tok, err := parseTokenAsIs(data)
	if err != nil {
		return Token{}, errorf("%s: malformed token from server: %w", op, ErrInternal)
	}
	return tok.WithoutRefreshToken(), nil
}

// RefreshToken asks the host to refresh the token of provider and bucket
// ("" for the default bucket), because the one this process holds stopped
// working, and returns the new token, without its refresh token, which
// stays on the host. The host asks the provider unless the token was
// refreshed moments ago or the store holds a newer one than this session
// was given; then it returns that one (PROTOCOL.md, "Operations").
// Failures match [ErrNotFound], [ErrProviderNotFound] (the host cannot
// refresh this provider), [ErrRefreshNotAvailable] and [ErrReauthRequired]
// (the user must log in again on the host), [ErrRateLimited] (refreshed,
// or failed, moments ago; see [RemoteError].RetryAfter; not retried), and
// [ErrInternal] (the provider failed).
func (c *Client) RefreshToken(ctx context.Context, provider, bucket string) (Token, error) {
	return c.token(ctx, OpRefreshToken, provider, bucket)
}

// SaveToken asks the host to merge token into the stored token of provider
// and bucket. Its refresh token, if any, is not sent: the host keeps its
// own.
func (c *Client) SaveToken(ctx context.Context, provider, bucket string, token Token) error {
	p := tokenPayload(provider, bucket)
	p = append(p[:len(p)-1], `,"token":`...)
	p = token.appendSanitised(p)
	_, err := c.call(ctx, OpSaveToken, append(p, '}'))
	return err
}

// RemoveToken asks the host to delete the token of provider and bucket. It
// succeeds if the token was already absent.
func (c *Client) RemoveToken(ctx context.Context, provider, bucket string) error {
	_, err := c.call(ctx, OpRemoveToken, tokenPayload(provider, bucket))
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// ListProviders returns the providers with tokens that this client may
// use, sorted.
func (c *Client) ListProviders(ctx context.Context) ([]string, error) {
	return c.listNames(ctx, OpListProviders, []byte("{}"), "providers")
}

// ListBuckets returns the buckets of provider that this client may use,
// sorted.
func (c *Client) ListBuckets(ctx context.Context, provider string) ([]string, error) {
	return c.listNames(ctx, OpListBuckets, tokenPayload(provider, ""), "buckets")
}

// ListAPIKeys returns the names of the API keys this client may use,
// sorted.
func (c *Client) ListAPIKeys(ctx context.Context) ([]string, error) {
	return c.listNames(ctx, OpListAPIKeys, []byte("{}"), "keys")
}

func (c *Client) listNames(ctx context.Context, op Op, payload []byte, member string) ([]string, error) {
	data, err := c.call(ctx, op, payload)
	if err != nil {
		return nil, err
	}
	var lists map[string][]string
	if err := json.Unmarshal(data, &lists); err != nil {
		return nil, errorf("%s: malformed list from server: %w", op, ErrInternal)
	}
	names := lists[member]
	if names == nil {
		names = []string{}
	}
	return names, nil
}

// BucketStats is the usage record of a bucket. Version 1 servers report no
// usage: the counts are zero.
type BucketStats struct {
	Bucket       string  `json:"bucket"`
	RequestCount int64   `json:"requestCount"`
	Percentage   float64 `json:"percentage"`
}

// GetBucketStats returns the usage record of provider's bucket. An absent
// token is an error matching [ErrNotFound].
func (c *Client) GetBucketStats(ctx context.Context, provider, bucket string) (BucketStats, error) {
	data, err := c.call(ctx, OpGetBucketStats, tokenPayload(provider, bucket))
	if err != nil {
		return BucketStats{}, err
	}
	var st BucketStats
	if err := json.Unmarshal(data, &st); err != nil {
		return BucketStats{}, errorf("get_bucket_stats: malformed stats from server: %w", ErrInternal)
	}
	return st, nil
}

// GetAPIKey returns the API key called name. An absent key is an error
// matching [ErrNotFound].
func (c *Client) GetAPIKey(ctx context.Context, name string) (Secret, error) {
	data, err := c.call(ctx, OpGetAPIKey, keyPayload(name))
	if err != nil {
		return "", err
	}
	var v struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return "", errorf("get_api_key: malformed key from server: %w", ErrInternal)
	}
	return Secret(v.Key), nil
}

// HasAPIKey reports whether an API key called name exists.
func (c *Client) HasAPIKey(ctx context.Context, name string) (bool, error) {
	data, err := c.call(ctx, OpHasAPIKey, keyPayload(name))
	if err != nil {
		return false, err
	}
	var v struct {
		Exists bool `json:"exists"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return false, errorf("has_api_key: malformed answer from server: %w", ErrInternal)
	}
	return v.Exists, nil
}

func keyPayload(name string) []byte {
	return append(append([]byte(`{"name":`), quote(name)...), '}')
}

// SaveAPIKey fails with [ErrHostOnly]: API keys are managed on the host.
func (c *Client) SaveAPIKey(context.Context, string, Secret) error { return ErrHostOnly }

// RemoveAPIKey fails with [ErrHostOnly]: API keys are managed on the host.
func (c *Client) RemoveAPIKey(context.Context, string) error { return ErrHostOnly }
