//go:build !linux

package main

import "os/exec"

// waitCommand waits for CMD, started, to end and returns the status run
// exits with for it. Only on Linux does run reap orphans as PID 1: here it
// waits for CMD alone.
func waitCommand(cmd *exec.Cmd, std stdio) int { return exitStatus(cmd, cmd.Wait(), std) }

// checkReaping has nothing to check: only on Linux does run reap as PID 1.
func (p *proxyFlags) checkReaping() error { return nil }
