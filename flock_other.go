//go:build !unix

package credproxy

import (
	"context"
	"sync"
)

// fileLocks stands in for flock(2) where there is none: it serialises
// holders within this process only.
var fileLocks keyedMutex

// lockFile takes the in-process lock named by path, waiting until ctx ends.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	unlock, err = fileLocks.lock(ctx, path)
	if err != nil {
		return nil, err
	}
	return sync.OnceFunc(unlock), nil
}
