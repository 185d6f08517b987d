package credproxy

import (
	"math"
	"testing"
	"time"
)

// R22: the per-connection bucket, step by step at fixed instants: a full
// burst passes, the next request waits for a refill, and retryAfter is the
// whole seconds until a request would pass, at least 1.
func TestConnLimiterSteps(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	type step struct {
		at         time.Time
		n          int // requests at this instant
		wantOK     int // how many of them pass
		retryAfter int // of the last refused one
	}
	for _, tc := range []struct {
		name  string
		rate  float64
		burst int
		steps []step
	}{
		{"default 60/s burst 60", defaultRateLimit, defaultRateBurst, []step{
			{at(0), 60, 60, 0},
			{at(0), 1, 0, 1},
			{at(16 * time.Millisecond), 1, 0, 1}, // 0.96 of a token back
			{at(17 * time.Millisecond), 1, 1, 0}, // 1.02 tokens back
			{at(17 * time.Millisecond), 1, 0, 1},
			{at(time.Second + 17*time.Millisecond), 60, 60, 0}, // full again
			{at(time.Hour), 61, 60, 1},                         // never more than the burst
		}},
		{"1 per 10s", 0.1, 1, []step{
			{at(0), 2, 1, 10},
			{at(4 * time.Second), 1, 0, 6},
			{at(9500 * time.Millisecond), 1, 0, 1},
			{at(10 * time.Second), 1, 1, 0},
		}},
	} {
		l := newConnLimiter(tc.rate, tc.burst)
		for i, s := range tc.steps {
			passed, retry := 0, 0
			for range s.n {
				if ok, r := l.allow(s.at); ok {
					passed++
				} else {
					retry = r
				}
			}
			if passed != s.wantOK || retry != s.retryAfter {
				t.Errorf("%s step %d: %d of %d passed, retryAfter %d; want %d, %d", tc.name, i, passed, s.n, retry, s.wantOK, s.retryAfter)
			}
		}
	}
}

// R22: a negative or infinite rate means no limit.
func TestConnLimiterOff(t *testing.T) {
	for _, rate := range []float64{-1, math.Inf(1)} {
		l := newConnLimiter(rate, 0)
		for i := range 10_000 {
			if ok, _ := l.allow(time.Unix(0, 0)); !ok {
				t.Fatalf("rate %v: request %d refused", rate, i)
			}
		}
	}
}
