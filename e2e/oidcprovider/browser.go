package oidcprovider

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"

	"golang.org/x/net/html"
)

// Login plays the user in a browser for the authorization code flow: it
// opens authURL (the URL a client such as credproxy login prints), is
// redirected to the provider's login form, fills it in with user and
// password and posts it as a browser would (the form's action and hidden
// inputs come from the page), and follows the redirects back to the
// client's redirect URI, which it requests. It returns nil once that
// request was answered with a 2xx status, and otherwise an error that
// says where it stopped: a login the provider refused, a redirect URI
// that did not answer or answered with an error.
//
// Login works with any provider run by this package, or by the example
// server of github.com/zitadel/oidc, without a Provider value: it is what
// demoprovider's browse command runs, in a process of its own.
func Login(ctx context.Context, authURL, user, password string) error {
	u, err := url.Parse(authURL)
	if err != nil {
		return fmt.Errorf("oidcprovider: login: %w", err)
	}
	redirect, err := url.Parse(u.Query().Get("redirect_uri"))
	if err != nil || redirect.Host == "" {
		return fmt.Errorf("oidcprovider: login: the authorization URL has no redirect_uri")
	}
	b := newBrowser()
	login, err := b.get(ctx, authURL)
	if err != nil {
		return err
	}
	if login.form == nil {
		return fmt.Errorf("oidcprovider: login: no login form at %s: %s", login.url, login.text)
	}
	end, err := b.submit(ctx, login, map[string]string{"username": user, "password": password})
	if err != nil {
		return err
	}
	if end.url.Scheme != redirect.Scheme || end.url.Host != redirect.Host || end.url.Path != redirect.Path {
		return fmt.Errorf("oidcprovider: login: the provider refused it, at %s: %s", end.url.Redacted(), end.text)
	}
	if end.status/100 != 2 {
		return fmt.Errorf("oidcprovider: login: the redirect URI answered %d: %s", end.status, end.text)
	}
	return nil
}

// ApproveDevice plays the user who approves a device flow on another
// machine: it opens verificationURI with userCode, logs in with user and
// password on the provider's device login form, and presses Allow on the
// confirmation page. It returns nil once the provider says the device is
// authorized; the client polling the token endpoint then gets its token.
// Like [Login], it needs no Provider value.
func ApproveDevice(ctx context.Context, verificationURI, userCode, user, password string) error {
	u, err := url.Parse(verificationURI)
	if err != nil {
		return fmt.Errorf("oidcprovider: approve: %w", err)
	}
	q := u.Query()
	q.Set("user_code", userCode)
	u.RawQuery = q.Encode()
	b := newBrowser()
	login, err := b.get(ctx, u.String())
	if err != nil {
		return err
	}
	if login.form == nil || login.form.fields["user_code"] != userCode {
		return fmt.Errorf("oidcprovider: approve: no device login form for the code at %s: %s", login.url, login.text)
	}
	confirm, err := b.submit(ctx, login, map[string]string{"username": user, "password": password})
	if err != nil {
		return err
	}
	if confirm.allow == "" {
		return fmt.Errorf("oidcprovider: approve: the provider refused the login: %s", confirm.text)
	}
	allow, err := confirm.url.Parse(confirm.allow)
	if err != nil {
		return fmt.Errorf("oidcprovider: approve: the Allow button's target %q: %w", confirm.allow, err)
	}
	allowed, err := b.get(ctx, allow.String())
	if err != nil {
		return err
	}
	if !strings.Contains(allowed.text, "allowed") {
		return fmt.Errorf("oidcprovider: approve: the provider did not authorize the device: %s", allowed.text)
	}
	return nil
}

// browser is an HTTP client with cookies that follows redirects.
type browser struct{ c *http.Client }

func newBrowser() *browser {
	jar, _ := cookiejar.New(nil) // never fails
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil // loopback only; a proxy from the environment must not see it
	return &browser{&http.Client{Jar: jar, Transport: t}}
}

// page is what the browser shows: the first form on it, the target of
// an Allow button, and its text.
type page struct {
	url    *url.URL
	status int
	form   *form
	allow  string
	text   string
}

type form struct {
	action string
	fields map[string]string
}

func (b *browser) get(ctx context.Context, u string) (*page, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("oidcprovider: %w", err)
	}
	return b.do(req)
}

// submit posts p's form with its fields, the given ones set.
func (b *browser) submit(ctx context.Context, p *page, set map[string]string) (*page, error) {
	v := url.Values{}
	for k, val := range p.form.fields {
		v.Set(k, val)
	}
	for k, val := range set {
		v.Set(k, val)
	}
	action, err := p.url.Parse(p.form.action)
	if err != nil {
		return nil, fmt.Errorf("oidcprovider: the form's action %q: %w", p.form.action, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, action.String(), strings.NewReader(v.Encode()))
	if err != nil {
		return nil, fmt.Errorf("oidcprovider: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return b.do(req)
}

// maxPage bounds what the browser reads of a page.
const maxPage = 1 << 20

func (b *browser) do(req *http.Request) (*page, error) {
	resp, err := b.c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("oidcprovider: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPage))
	if err != nil {
		return nil, fmt.Errorf("oidcprovider: reading %s: %w", resp.Request.URL.Redacted(), err)
	}
	p := &page{url: resp.Request.URL, status: resp.StatusCode}
	if err := p.parse(string(body)); err != nil {
		return nil, fmt.Errorf("oidcprovider: the page at %s: %w", p.url.Redacted(), err)
	}
	return p, nil
}

// allowButton finds the URL an Allow button's onclick goes to, as the
// example's device confirmation page writes it.
var allowButton = regexp.MustCompile(`location\.href='([^']*action=allowed[^']*)'`)

// maxText is how much of a page's text the errors quote.
const maxText = 300

// parse reads the page's first form (its action and inputs), the Allow
// button's target and the page's text.
func (p *page) parse(body string) error {
	doc, err := html.Parse(strings.NewReader(body))
	if err != nil {
		return err
	}
	var text []string
	for n := range doc.Descendants() {
		switch {
		case n.Type == html.TextNode && n.Parent != nil && n.Parent.Data != "style" && n.Parent.Data != "script":
			if t := strings.TrimSpace(n.Data); t != "" {
				text = append(text, t)
			}
		case n.Type == html.ElementNode && n.Data == "form" && p.form == nil:
			p.form = &form{action: attr(n, "action"), fields: map[string]string{}}
			for in := range n.Descendants() {
				if in.Type == html.ElementNode && in.Data == "input" && attr(in, "name") != "" {
					p.form.fields[attr(in, "name")] = attr(in, "value")
				}
			}
		case n.Type == html.ElementNode && n.Data == "button" && p.allow == "":
			if m := allowButton.FindStringSubmatch(attr(n, "onclick")); m != nil {
				p.allow = m[1]
			}
		}
	}
	p.text = strings.Join(text, " ")
	if len(p.text) > maxText {
		p.text = p.text[:maxText] + "..."
	}
	if p.form != nil && p.form.action == "" {
		p.form.action = p.url.String() // a form without action posts to its page
	}
	return nil
}

func attr(n *html.Node, name string) string {
	for _, a := range n.Attr {
		if a.Key == name {
			return a.Val
		}
	}
	return ""
}
