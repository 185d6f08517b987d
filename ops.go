package credproxy

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/go-json-experiment/json/jsontext"
)

// exec performs op for a connection of the session ss and appends its
// data object to dst.
func (s *Server) exec(ctx context.Context, ss *Session, req *Request, a args, dst []byte) result {
	op := req.Op
	policy := ss.policy
	if err := policy.Authorize(ctx, req); err != nil {
		return denied(err)
	}
	st := s.opts.Store
	switch op {
	case OpGetToken:
		tok, err := st.GetToken(ctx, a.provider, a.bucket)
		if err != nil {
			return s.storeFailure(ctx, op, a, err, "token not found")
		}
		if tok, err = s.tokenToServe(ctx, a.provider, a.bucket, tok); err != nil {
			return s.refreshFailure(ctx, op, a, err)
		}
		s.tokenServed(ss, a.provider, a.bucket, tok)
		return result{data: tok.appendSanitised(dst)}

	case OpSaveToken:
		if res, ok := writeBudget(ss); !ok {
			return res
		}
		switch err := s.saveToken(ctx, ss, a.provider, a.bucket, a.token); {
		case errors.Is(err, ErrNewTokenLimit):
			return denied(err)
		case errors.Is(err, errTokenTooLarge):
			return failure(CodeInvalidRequest, "token too large once merged with the stored one")
		case err != nil:
			return s.storeFailure(ctx, op, a, err, "")
		}
		return result{data: append(dst, "{}"...)}

	case OpRemoveToken:
		if res, ok := writeBudget(ss); !ok {
			return res
		}
		if err := s.removeToken(ctx, a.provider, a.bucket); err != nil {
			// Best effort: a logout must not fail in the sandbox.
			s.logStoreError(op, a, err)
		}
		return result{data: append(dst, "{}"...)}

	case OpListProviders:
		names, err := st.ListProviders(ctx)
		if err != nil {
			s.logStoreError(op, a, err)
		}
		names = filterNames(ctx, policy, *req, names, func(r *Request, n string) { r.Provider = n })
		// A provider is listed only if the sandbox may use one of its
		// buckets: a name it could not read is not its business.
		names = slices.DeleteFunc(names, func(provider string) bool {
			buckets, err := st.ListBuckets(ctx, provider)
			r := *req
			r.Provider = provider
			return err != nil || len(filterNames(ctx, policy, r, buckets, func(r *Request, n string) { r.Bucket = n })) == 0
		})
		return s.namesResult(op, dst, "providers", names)

	case OpListBuckets:
		names, err := st.ListBuckets(ctx, a.provider)
		if err != nil {
			s.logStoreError(op, a, err)
		}
		names = filterNames(ctx, policy, *req, names, func(r *Request, n string) { r.Bucket = n })
		return s.namesResult(op, dst, "buckets", names)

	case OpGetBucketStats:
		if _, err := st.GetToken(ctx, a.provider, a.bucket); err != nil {
			return s.storeFailure(ctx, op, a, err, "token not found")
		}
		dst = append(dst, `{"bucket":`...)
		dst, _ = jsontext.AppendQuote(dst, a.bucket)
		return result{data: append(dst, `,"requestCount":0,"percentage":0}`...)}

	case OpGetAPIKey:
		key, err := st.GetAPIKey(ctx, a.name)
		if err != nil {
			return s.storeFailure(ctx, op, a, err, "API key not found")
		}
		dst = append(dst, `{"key":`...)
		dst, _ = jsontext.AppendQuote(dst, string(key))
		return result{data: append(dst, '}')}

	case OpListAPIKeys:
		names, err := st.ListAPIKeys(ctx)
		if err != nil {
			s.logStoreError(op, a, err)
		}
		names = filterNames(ctx, policy, *req, names, func(r *Request, n string) { r.Key = n })
		return s.namesResult(op, dst, "keys", names)

	case OpHasAPIKey:
		_, err := st.GetAPIKey(ctx, a.name)
		switch {
		case err == nil:
			return result{data: append(dst, `{"exists":true}`...)}
		case errors.Is(err, ErrNotFound):
			return result{data: append(dst, `{"exists":false}`...)}
		}
		return s.storeFailure(ctx, op, a, err, "")

	case OpRefreshToken:
		tok, err := s.refresh.refresh(ctx, a.provider, a.bucket, want{session: ss})
		if err != nil {
			return s.refreshFailure(ctx, op, a, err)
		}
		ss.noteServed(a.provider, a.bucket, tok)
		return result{data: tok.appendSanitised(dst)}
	}
	return failure(CodeInvalidRequest, "unknown operation")
}

// tokenToServe returns stored, the token of provider and bucket that
// get_token (or the injection front) is about to serve, refreshed first
// if it expires within the margin and can be refreshed. If that refresh
// fails, stored is served while it is still valid; the error is returned
// only for a token that has expired.
func (s *Server) tokenToServe(ctx context.Context, provider, bucket string, stored Token) (Token, error) {
	if !s.refresh.due(provider, stored) {
		return stored, nil
	}
	fresh, err := s.refresh.beforeServe(ctx, provider, bucket, stored)
	switch {
	case err == nil:
		return fresh, nil
	case validFor(stored, time.Now()) > 0:
		s.log.Debug("credproxy: serving the stored token; refresh before get_token failed",
			"provider", provider, "bucket", bucket, "err", err)
		return stored, nil
	}
	return Token{}, err
}

// tokenServed records that session ss was given tok: its renewal is
// scheduled, and refresh_token knows which token the session holds.
func (s *Server) tokenServed(ss *Session, provider, bucket string, tok Token) {
	s.refresh.watch(provider, bucket, tok, false)
	ss.noteServed(provider, bucket, tok)
}

// maxSavedToken bounds the JSON of a token a client saves, merged with the
// stored one: with room for any response envelope (an id of 256 bytes
// quoted at worst 6 bytes each), it can always be served, and saves that
// each add members cannot grow a stored token without limit.
const maxSavedToken = MaxFrameSize - 2048

// errTokenTooLarge refuses a save_token whose result would exceed
// maxSavedToken.
var errTokenTooLarge = errors.New("credproxy: token too large once merged")

// saveToken merges token into the stored one under the per-key lock:
// the incoming refresh token is dropped and the stored one kept. A token
// that does not exist yet counts against the session's MaxNewTokens, and
// the store's cross-process lock (a lock file, with KeyringStore) is
// taken only once that allows it, so that a sandbox cannot grow the store
// by naming new tokens.
func (s *Server) saveToken(ctx context.Context, ss *Session, provider, bucket string, token Token) error {
	incoming := token.WithoutRefreshToken()
	unlock, err := s.locks.lock(ctx, tokenKey(provider, bucket))
	if err != nil {
		return err
	}
	defer unlock()
	st := s.opts.Store
	if _, err := st.GetToken(ctx, provider, bucket); errors.Is(err, ErrNotFound) && !ss.reserveNewToken() {
		return ErrNewTokenLimit
	}
	unlockStore, err := s.lockStore(ctx, provider, bucket)
	if err != nil {
		return err
	}
	defer unlockStore()
	// Merge with what is stored now, under the store's lock: another
	// process may have saved since the read above.
	saved, err := s.updateToken(ctx, provider, bucket, func(stored Token, found bool) (Token, error) {
		merged := incoming
		if found {
			merged = stored.Merge(incoming)
		}
		if len(merged.Reveal()) > maxSavedToken {
			return Token{}, errTokenTooLarge
		}
		return merged, nil
	})
	if err != nil {
		return err
	}
	s.refresh.savedByPeer(tokenKey(provider, bucket), saved)
	return nil
}

// removeToken deletes a token under its per-key lock, so that a
// logout during a refresh or save waits for it and then wins. A token
// that does not exist is left alone without taking the store's
// cross-process lock, which would leave a lock file behind for the name.
func (s *Server) removeToken(ctx context.Context, provider, bucket string) error {
	unlock, err := s.locks.lock(ctx, tokenKey(provider, bucket))
	if err != nil {
		return err
	}
	defer unlock()
	st := s.opts.Store
	if _, err := st.GetToken(ctx, provider, bucket); errors.Is(err, ErrNotFound) {
		return nil
	}
	unlockStore, err := s.lockStore(ctx, provider, bucket)
	if err != nil {
		return err
	}
	defer unlockStore()
	if err := st.RemoveToken(ctx, provider, bucket); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	return nil
}

// filterNames returns the sorted names policy allows, asking once per name
// with set filling the name into a copy of req.
func filterNames(ctx context.Context, policy Policy, req Request, names []string, set func(*Request, string)) []string {
	kept := make([]string, 0, len(names))
	for _, n := range names {
		if !validName(n) {
			continue
		}
		r := req
		set(&r, n)
		if policy.Authorize(ctx, &r) == nil {
			kept = append(kept, n)
		}
	}
	slices.Sort(kept)
	return slices.Compact(kept)
}

// namesResult appends a list's data object, with as many of the sorted
// names as fit in a frame: a list never fails for its size. A list cut
// short is logged on the host.
func (s *Server) namesResult(op Op, dst []byte, member string, names []string) result {
	// What the frame holds besides the names: the envelope so far, the
	// data object's member name, brackets and braces.
	room := MaxFrameSize - (len(dst) - frameHeaderLen) - len(member) - len(`{"":[]}}`)
	n := 0
	for i, name := range names {
		if room -= len(name) + len(`"",`); room < 0 {
			break
		}
		n = i + 1
	}
	if n < len(names) {
		s.log.Warn("credproxy: list cut short to fit a frame", "op", op, "names", len(names), "sent", n)
	}
	return result{data: appendNames(dst, member, names[:n])}
}

// refreshFailure maps a refresh error to its code and a fixed message; the
// provider's or store's own text has been logged by the coordinator or is
// logged here, never sent.
func (s *Server) refreshFailure(ctx context.Context, op Op, a args, err error) result {
	var later *retryLater
	switch {
	case errors.Is(err, ErrProviderNotFound):
		return failure(CodeProviderNotFound, "no refresher for this provider")
	case errors.Is(err, ErrNotFound):
		return failure(CodeNotFound, "token not found")
	case errors.Is(err, ErrRefreshNotAvailable):
		return failure(CodeRefreshNotAvailable, "no refresh token stored; log in again on the host")
	case errors.Is(err, ErrReauthRequired):
		return failure(CodeReauthRequired, "the provider rejected the refresh token; log in again on the host")
	case errors.As(err, &later):
		res := failure(CodeRateLimited, "token refreshed moments ago; retry later")
		if later.failed {
			res = failure(CodeRateLimited, "the last refresh failed; retry later")
		}
		res.retryAfter = max(1, int((later.after+time.Second-1)/time.Second))
		return res
	case errors.Is(err, context.DeadlineExceeded) && (ctx.Err() != nil || op == OpGetToken):
		return failure(CodeInternalError, "refresh timed out")
	case errors.Is(err, errBadExpiry) || errors.Is(err, errTokenTooLarge) || isRedacted(err):
		return failure(CodeInternalError, "refresh failed") // logged by the coordinator
	}
	s.logStoreError(op, a, err)
	return failure(CodeInternalError, "refresh failed")
}

// writeBudget takes a token write from the session's budget
// ([SessionOptions].WriteRate), or returns RATE_LIMITED when it is spent.
func writeBudget(ss *Session) (result, bool) {
	ok, retryAfter := ss.writes.allow(time.Now())
	if ok {
		return result{}, true
	}
	res := failure(CodeRateLimited, "token writes too frequent; retry later")
	res.retryAfter = retryAfter
	return res, false
}

// denied turns a policy error into UNAUTHORIZED with a message and a
// "denied" member naming the kind of thing refused, never the policy's own
// text, which is logged on the host.
func denied(err error) result {
	fail := &protoError{code: CodeUnauthorized, msg: "request not allowed"}
	var d *denial
	if errors.As(err, &d) {
		fail.msg, fail.denied = d.msg, d.kind
	}
	return result{fail: fail, cause: err}
}

// storeFailure maps a store error to a response: NOT_FOUND with notFound
// as the message when the error is ErrNotFound and notFound is set, and
// otherwise INTERNAL_ERROR, whose cause is logged on the host only.
func (s *Server) storeFailure(ctx context.Context, op Op, a args, err error, notFound string) result {
	if notFound != "" && errors.Is(err, ErrNotFound) {
		return failure(CodeNotFound, notFound)
	}
	s.logStoreError(op, a, err)
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return failure(CodeInternalError, "credential store timed out")
	}
	return failure(CodeInternalError, "credential store error")
}

func (s *Server) logStoreError(op Op, a args, err error) {
	var secrets []string
	if !a.token.IsZero() {
		secrets = []string{string(a.token.AccessToken()), string(a.token.RefreshToken())}
	}
	s.log.Warn("credproxy: store error", "op", op, "provider", a.provider, "bucket", a.bucket, "key", a.name,
		"err", redact(err.Error(), secrets...))
}
