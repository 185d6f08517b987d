package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"github.com/credproxy/credproxy"
	"golang.org/x/sys/unix"
)

// waitCommand waits for CMD, started, to end and returns the status run
// exits with for it. When run is PID 1 (a container's entrypoint, or
// unshare --pid --fork), every process orphaned in its pid namespace is
// reparented to it, and stays a zombie until it is reaped: there is no
// init above run to do it. So then run reaps every child itself, CMD
// included, rather than wait for CMD alone; otherwise, as before, it
// waits with cmd.Wait.
func waitCommand(cmd *exec.Cmd, std stdio) int {
	if os.Getpid() != 1 {
		return exitStatus(cmd, cmd.Wait(), std)
	}
	ws, err := reapUntil(cmd.Process.Pid)
	if err != nil {
		fmt.Fprintln(std.err, "credproxy:", err)
		return exitError
	}
	return waitStatusCode(ws)
}

// checkReaping refuses, when run is PID 1 and so reaps every child, a
// store whose backend runs programs and waits for them: the pass backend
// runs pass (and gpg) for every read, and the reaping would take their
// exit from that wait, failing reads at random. Better a clear error up
// front.
func (p *proxyFlags) checkReaping() error {
	if os.Getpid() != 1 || p.store != "keyring" || os.Getenv(credproxy.KeyringBackendEnv) != "pass" {
		return nil
	}
	return errors.New("run is PID 1 here, so it reaps every process that ends in this pid namespace, and the pass backend's programs would be reaped under it; use CREDPROXY_KEYRING_BACKEND=file or -store memory, or run under an init (podman run --init)")
}

// reapUntil reaps this process's children as they end, orphans and CMD
// (pid) alike, and returns CMD's wait status once CMD has ended. A
// goroutine goes on reaping the orphans that end afterwards, while run
// shuts its proxy down, until none is left; when run, PID 1, exits, the
// kernel kills what remains of its namespace.
//
// Once CMD is reaped here, cmd.Wait must not be called: its process is
// gone, and waiting would fail (ECHILD). cmd.Process.Signal stays safe,
// since os/exec holds a pidfd for CMD on Linux: a signal forwarded after
// the reaping reaches no other process that reused the pid, and fails.
// run's standard streams are its own files, so os/exec started no
// goroutines copying them that only Wait would see finished.
//
// The reaping is of every child, so a child that run started otherwise
// and waits for with os/exec would be taken from that wait (ECHILD):
// with -store keyring, the pass backend runs pass for each read. run
// starts no other child itself; keep -store memory or the file backend
// in a container where run is PID 1.
func reapUntil(pid int) (syscall.WaitStatus, error) {
	type ended struct {
		ws  syscall.WaitStatus
		err error
	}
	cmdEnded := make(chan ended, 1)
	go func() {
		found := false
		for {
			var ws unix.WaitStatus
			got, err := unix.Wait4(-1, &ws, 0, nil)
			switch {
			case err == unix.EINTR:
				continue
			case err != nil: // ECHILD: no child left
				if !found {
					cmdEnded <- ended{err: fmt.Errorf("waiting for the command (pid %d) as PID 1: wait4: %w", pid, err)}
				}
				return
			case got == pid && !found:
				found = true
				cmdEnded <- ended{ws: syscall.WaitStatus(ws)}
			}
		}
	}()
	e := <-cmdEnded
	return e.ws, e.err
}
