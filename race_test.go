//go:build race

package credproxy

// raceEnabled reports whether the race detector is on. It slows the file
// backend's key derivation about tenfold, so the cross-process tests run
// fewer rounds under it; CI runs them again without it at full count.
const raceEnabled = true
