package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The watcher: one goroutine per store keeps the cache current, and when
// it cannot, says so and makes reads go through to the cluster.
//
// The etcd client hides a lost connection from a watch: it reconnects, to
// any endpoint, for ever, and the watch channel stays open and quiet. So
// the watcher asks for a progress notification every progressEvery and
// counts the watch as broken when it has heard nothing (no event, no
// progress) for silentLimit. A member cut off from the leader would still
// answer; the watch's context carries WithRequireLeader, so such a member
// cancels the watch instead.
const (
	progressEvery = time.Second
	silentLimit   = 5 * time.Second

	// Reloads after a broken watch back off from minBackoff to maxBackoff.
	minBackoff = 100 * time.Millisecond
	maxBackoff = 2 * time.Second
	// A watch that lasted longer than this resets the backoff; one that
	// breaks sooner does not, so a watch that keeps breaking at once
	// cannot spin.
	steadyWatch = 10 * time.Second
)

// runWatch keeps the cache current from revision rev+1 (the cache holds
// every item as of rev) until ctx ends. It runs in its own goroutine,
// which Close stops and waits for.
func (s *EtcdStore) runWatch(ctx context.Context, rev int64) {
	defer close(s.watchDone)
	backoff := minBackoff
	for {
		began := time.Now()
		err := s.watchFrom(ctx, rev+1)
		if ctx.Err() != nil {
			return
		}
		s.cache.setCurrent(false)
		s.log.Warn("etcdstore: watch broken, reading through to the cluster", "err", err)
		if time.Since(began) > steadyWatch {
			backoff = minBackoff
		}
		for {
			if !sleepCtx(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, maxBackoff)
			if rev, err = s.reload(ctx); err == nil {
				break
			}
			if ctx.Err() != nil {
				return
			}
		}
		s.cache.setCurrent(true)
		s.log.Info("etcdstore: watch re-established, serving reads from the cache again", "revision", rev)
	}
}

// reload loads every item under the prefix with one Get and returns the
// revision of that snapshot.
func (s *EtcdStore) reload(ctx context.Context) (int64, error) {
	rctx, cancel := s.requestCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(rctx, s.prefix, clientv3.WithPrefix())
	s.cache.down.Store(err != nil && isUnavailable(err))
	if err != nil {
		return 0, err
	}
	s.cache.load(resp.Kvs, resp.Header.Revision)
	return resp.Header.Revision, nil
}

// watchFrom applies the prefix's changes from revision from on until the
// watch breaks, and returns why it broke.
func (s *EtcdStore) watchFrom(ctx context.Context, from int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := s.cli.Watch(wctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(from), clientv3.WithProgressNotify())
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	heard := time.Now()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case wr, ok := <-wch:
			if !ok {
				return errors.New("watch channel closed")
			}
			if err := wr.Err(); err != nil {
				return err
			}
			heard = time.Now()
			if wr.IsProgressNotify() {
				s.cache.advance(wr.Header.Revision)
			} else {
				s.cache.applyEvents(wr.Events)
			}
		case <-tick.C:
			if silent := time.Since(heard); silent > silentLimit {
				return fmt.Errorf("no word from the cluster for %v", silent.Round(time.Second))
			}
			s.requestProgress(wctx)
		case <-s.cache.progress:
			s.requestProgress(wctx)
		}
	}
}

// requestProgress asks the watch's member for a progress notification.
// The request may wait while the client reconnects, so it is bounded; a
// lost request only means the silence is noticed.
func (s *EtcdStore) requestProgress(wctx context.Context) {
	// The derived context keeps wctx's metadata, which is how the client
	// finds the watch's stream.
	pctx, cancel := context.WithTimeout(wctx, progressEvery)
	defer cancel()
	_ = s.cli.RequestProgress(pctx)
}

// sleepCtx waits for d, or until ctx ends (then it returns false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// requestCtx bounds one request to the cluster by Options.RequestTimeout,
// or by ctx if it ends sooner.
func (s *EtcdStore) requestCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.reqTimeout)
}

// isUnavailable reports whether err means that the cluster could not
// answer (no quorum, no leader, no member reachable, or no answer in
// time), as opposed to an answer that refused the request.
func isUnavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code() == codes.Unavailable || ee.Code() == codes.DeadlineExceeded
	}
	if st, ok := status.FromError(err); ok {
		switch st.Code() {
		case codes.Unavailable, codes.DeadlineExceeded:
			return true
		case codes.Unknown:
			// etcd 3.4 (Debian's) answers a request it could not commit
			// without quorum with its context's error as code Unknown.
			return strings.Contains(st.Message(), context.DeadlineExceeded.Error()) ||
				strings.Contains(st.Message(), "request timed out")
		}
	}
	return false
}

// failure is the error of operation op that failed with err: it wraps
// [ErrUnavailable] when the cluster could not answer, and ctx.Err() when
// ctx has ended (wrapErr).
func failure(ctx context.Context, op string, err error) error {
	if !isUnavailable(err) {
		return wrapErr(ctx, op, err)
	}
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("credproxy: etcdstore: %s: %w (%w: %v)", op, cerr, ErrUnavailable, err)
	}
	return fmt.Errorf("credproxy: etcdstore: %s: %w: %v", op, ErrUnavailable, err)
}
