package credproxy

import (
	"time"
)

// inlineBudget is how long a request may run in its connection's reader
// goroutine before another goroutine takes over reading. Requests run
// inline because starting a goroutine per request costs more than a fast
// store call; the handover keeps a slow store call or refresh from
// holding up the requests behind it on the same connection for more than
// about twice this.
//
// The trade-off, measured with BenchmarkGetToken and
// BenchmarkGetTokenKeyringFile: a goroutine per request (net/rpc's shape)
// gives 0.66 to 0.69 of the floor's throughput on MemoryStore, against
// 0.75 to 0.78 inline, and 0.58 to 0.60 of MemoryStore's on the file
// KeyringStore (its reads served from memory), against 0.65 to 0.67. A
// store whose reads take longer than the budget (the Secret Service, about
// 2 ms; pass, about 34 ms; the file store's first read of a changed item,
// about 3 ms) has every request handed over, which is a goroutine per
// request plus the watchdog's ticking: the inline path stops helping at
// that speed, and costs little more.
const inlineBudget = 500 * time.Microsecond

// handedOver is the busySince of a connection whose reading the watchdog
// has passed to another goroutine.
const handedOver = -1

// begin marks the start, at now, of a request run inline, and wakes the
// watchdog if it sleeps. It returns the mark for end.
func (c *conn) begin(now time.Time) int64 {
	since := int64(now.Sub(c.srv.epoch)) + 1 // never 0
	c.busySince.Store(since)
	if c.srv.watch.Load() != watchActive {
		c.srv.wakeWatchdog()
	}
	return since
}

// end marks the end of the request begun at since, and reports whether the
// watchdog passed the reading on meanwhile. Exactly one of end and the
// watchdog's handover changes busySince from since.
func (c *conn) end(since int64) (handedOver bool) {
	return !c.busySince.CompareAndSwap(since, 0)
}

func (s *Server) wakeWatchdog() {
	if s.watch.Swap(watchActive) == watchStopped {
		// Called from a reader, which the WaitGroup counts, so the Add in
		// Go cannot race with Wait reaching zero.
		s.wg.Go(s.watchdog)
	}
}

// watchdog hands the reading of a connection to a new goroutine when the
// request its reader runs is older than inlineBudget. One goroutine
// watches every connection, and only while requests come, so that a
// request costs an atomic store and a compare-and-swap, not a timer; it
// finds a slow request between one and two budgets after it began. It
// stops once a tick passes without a request, or at shutdown, when nothing
// more will be read. (A reader that begins a request during shutdown may
// start it again; it then stops at once.)
func (s *Server) watchdog() {
	tick := time.NewTicker(inlineBudget)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-s.stopping:
			return
		}
		busy := s.handOverSlowReaders()
		if !s.watch.CompareAndSwap(watchActive, watchQuiet) && !busy &&
			s.watch.CompareAndSwap(watchQuiet, watchStopped) {
			return
		}
	}
}

// handOverSlowReaders starts a new reader for each connection whose
// request has run for inlineBudget, and reports whether any request runs.
func (s *Server) handOverSlowReaders() (busy bool) {
	now := int64(time.Since(s.epoch)) + 1 // as begin counts
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		since := c.busySince.Load()
		if since <= 0 {
			continue
		}
		busy = true
		if now-since >= int64(inlineBudget) && c.busySince.CompareAndSwap(since, handedOver) {
			s.wg.Go(c.readRequests)
		}
	}
	return busy
}

// The watchdog's states. While requests come, begin keeps it active; each
// tick turns active to quiet, and a tick that finds it still quiet, with
// no request running, stops it.
const (
	watchStopped int32 = iota
	watchQuiet
	watchActive
)
