package main

import (
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestCompare runs loadgen -compare briefly: it builds the four programs,
// starts the servers, measures each from a loadgen process and prints the
// table. It checks the table's shape, never the figures, which a shared
// machine cannot promise.
func TestCompare(t *testing.T) {
	if testing.Short() {
		t.Skip("builds four programs and runs them for a few seconds")
	}
	if runtime.GOOS == "windows" {
		t.Skip("the servers listen on Unix sockets and get the capability token on descriptor 3")
	}
	var out strings.Builder
	if err := runCompare(compareConfig{Duration: 400 * time.Millisecond, Slices: 2, Conns: []int{1, 4}, Pin: "0,1", Out: &out}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	t.Log("\n" + out.String())
	for _, server := range []string{"floor", "MemoryStore", "keyring", "serve"} {
		for _, conns := range []string{"| 1", "| 4 |"} {
			if !strings.Contains(out.String(), "| "+server+" "+conns) {
				t.Errorf("no row for %s at %s connections", server, conns[2:])
			}
		}
	}
	if !strings.Contains(out.String(), "| floor | 4 | ") || strings.Count(out.String(), "| 1.00 |") < 2 {
		t.Errorf("the floor's rows are not its own reference:\n%s", out.String())
	}
}
