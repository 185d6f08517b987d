package oidcprovider

import (
	"context"
	"slices"
	"time"

	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// store is the example storage with what the tests need changed:
// shorter access token lifetimes in the token responses, the device
// grant for the clients in withDevice, device-flow tokens recorded for
// their client and user, and a refresh token lookup that takes the
// storage's lock.
// Every other method is the example's.
type store struct {
	*storage.Storage
	users      storage.UserStore
	lifetime   time.Duration
	withDevice map[string]bool
}

// GetClientByClientID adds the device grant to the clients that have it
// here: the example's constructors give it only to a client of their own.
func (s *store) GetClientByClientID(ctx context.Context, id string) (op.Client, error) {
	c, err := s.Storage.GetClientByClientID(ctx, id)
	if err == nil && s.withDevice[id] {
		c = deviceGrant{c}
	}
	return c, err
}

// deviceGrant is a client that may also use the device grant.
type deviceGrant struct{ op.Client }

func (c deviceGrant) GrantTypes() []oidc.GrantType {
	return append(slices.Clone(c.Client.GrantTypes()), oidc.GrantTypeDeviceCode)
}

// CreateAccessToken is the example's, with the lifetime shortened.
func (s *store) CreateAccessToken(ctx context.Context, req op.TokenRequest) (string, time.Time, error) {
	id, exp, err := s.Storage.CreateAccessToken(ctx, forClient(req))
	return id, s.shorten(exp), err
}

// CreateAccessAndRefreshTokens is the example's, with the lifetime
// shortened.
func (s *store) CreateAccessAndRefreshTokens(ctx context.Context, req op.TokenRequest, current string) (string, string, time.Time, error) {
	id, refresh, exp, err := s.Storage.CreateAccessAndRefreshTokens(ctx, forClient(req), current)
	return id, refresh, s.shorten(exp), err
}

// shorten returns exp, or the end of the configured lifetime if that is
// sooner. Only the token response's expires_in sees it: the example
// keeps its own expiry in its record of the token.
func (s *store) shorten(exp time.Time) time.Time {
	if end := time.Now().Add(s.lifetime); s.lifetime > 0 && end.Before(exp) {
		return end
	}
	return exp
}

// forClient turns a device flow's request into the example's own auth
// request, which the example recognises: it records tokens for the
// client of an auth request or a refresh, and for a device flow's would
// record them for no client, so that the client could neither refresh
// nor revoke them.
func forClient(req op.TokenRequest) op.TokenRequest {
	d, ok := req.(*op.DeviceAuthorizationState)
	if !ok {
		return req
	}
	return &storage.AuthRequest{ApplicationID: d.ClientID, UserID: d.Subject, Scopes: d.Scopes}
}

// GetRefreshTokenInfo is the example's, but reads the refresh token
// under the storage's lock (through TokenRequestByRefreshToken): the
// example reads its map without it, a data race with a refresh that the
// race detector reports.
func (s *store) GetRefreshTokenInfo(ctx context.Context, clientID, token string) (userID, tokenID string, err error) {
	req, err := s.Storage.TokenRequestByRefreshToken(ctx, token)
	if err != nil {
		return "", "", op.ErrInvalidRefreshToken
	}
	return req.GetSubject(), token, nil // the example's refresh token id is the token
}

// CompleteDeviceAuthorization records the user's id as the subject: the
// example's device pages pass the user name, under which the example's
// user lookup, when it makes the ID token, finds nobody.
func (s *store) CompleteDeviceAuthorization(ctx context.Context, userCode, username string) error {
	subject := username
	if u := s.users.GetUserByUsername(username); u != nil {
		subject = u.ID
	}
	return s.Storage.CompleteDeviceAuthorization(ctx, userCode, subject)
}
