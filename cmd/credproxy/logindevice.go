package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"

	"github.com/credproxy/credproxy"
	"golang.org/x/oauth2"
)

// device runs the device authorization grant (RFC 8628): it asks for a
// device code, tells the user where to enter the user code, and polls the
// token endpoint, as often as the provider allows, until the user has
// approved or denied it, the code expires, or ctx ends.
func (f *loginFlow) device(ctx context.Context) (*oauth2.Token, error) {
	cfg := f.pv.oauth2Config(f.secret, "")
	var opts []oauth2.AuthCodeOption
	if f.secret != "" && cfg.Endpoint.AuthStyle == oauth2.AuthStyleInParams {
		// golang.org/x/oauth2 sends only client_id to the device
		// endpoint; a client that authenticates in the form does so
		// there too (RFC 8628, section 3.1).
		opts = append(opts, oauth2.SetAuthURLParam("client_secret", string(f.secret)))
	}
	da, err := cfg.DeviceAuth(ctx, opts...)
	if err != nil {
		return nil, f.providerError("asking for a device code", err)
	}
	fmt.Fprintf(f.std.err, "credproxy: to log in to %s, open\n\n  %s\n\non any device and enter the code\n\n  %s\n\n", f.pv.name, printable(da.VerificationURI), printable(da.UserCode))
	if da.VerificationURIComplete != "" {
		fmt.Fprintf(f.std.err, "credproxy: or open %s, which carries the code\n", printable(da.VerificationURIComplete))
	}
	fmt.Fprintf(f.std.err, "credproxy: waiting for the provider to say the code was approved (at most %s)\n", f.timeout)
	tok, err := cfg.DeviceAccessToken(ctx, da)
	var re *oauth2.RetrieveError
	switch {
	case err == nil:
		return tok, nil
	case ctx.Err() != nil:
		return nil, fmt.Errorf("the code was not approved within %s (-timeout)", f.timeout)
	case errors.Is(err, context.DeadlineExceeded):
		return nil, errors.New("the device code expired before it was approved; run login again for a new one")
	case errors.As(err, &re) && re.ErrorCode == "access_denied":
		return nil, errors.New("the login was denied at the provider")
	case errors.As(err, &re) && re.ErrorCode == "expired_token":
		return nil, errors.New("the device code expired before it was approved; run login again for a new one")
	}
	return nil, f.providerError("waiting for the approval", err, credproxy.Secret(da.DeviceCode))
}

// printable is s, from the provider's answer, as it is if it has no
// control character, else Go-quoted, so that it cannot move the cursor or
// forge a line of ours on the terminal.
func printable(s string) string {
	if strings.ContainsFunc(s, unicode.IsControl) {
		return strconv.Quote(s)
	}
	return s
}
