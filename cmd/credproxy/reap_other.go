//go:build !linux

package main

import "os/exec"

// waitCommand waits for CMD, started, to end and returns the status run
// exits with for it. Only on Linux does run reap orphans as PID 1: here it
// waits for CMD alone.
func waitCommand(cmd *exec.Cmd, std stdio) int { return exitStatus(cmd, cmd.Wait(), std) }
