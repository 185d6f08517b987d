package credproxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// OAuth2Refresher does not follow a redirect from the token endpoint: a
// 307 or 308 would re-post the refresh token (and the client secret) to
// whatever the Location names, past the https-only rule of the providers
// file. Found by an attacking review.
func TestOAuth2RefresherDoesNotReplayTheRefreshTokenToARedirectTarget(t *testing.T) {
	var stolen atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		stolen.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"access_token":"fake-access-9","token_type":"Bearer","expires_in":3600}`))
	}))
	defer other.Close()
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/steal", http.StatusTemporaryRedirect)
	}))
	defer redirector.Close()
	r := &OAuth2Refresher{TokenURL: redirector.URL + "/token", ClientID: testClientID, ClientSecret: testClientSecret}
	r.Refresh(context.Background(), expiringToken(t, -time.Second))
	if n := stolen.Load(); n != 0 {
		t.Errorf("the redirect target got %d refresh requests carrying the refresh token", n)
	}
}
