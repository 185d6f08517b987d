//go:build linux

package main

import (
	"strings"
	"testing"
)

// runAsPID1 runs credproxy run with script as CMD, as the first process
// of a new pid namespace (unshare --pid --fork, with a /proc of its own),
// which is what run is as a container's entrypoint.
func runAsPID1(t *testing.T, script string) result {
	t.Helper()
	needTool(t, "unshare", "util-linux")
	needRoot(t, "unshare --pid needs root")
	return runBinary(t, "unshare", pathEnv(t), "", nil, "--pid", "--fork", "--mount-proc", binary,
		"run", "-store", "memory", "-import", writeCreds(t), "-allow-provider", "anthropic", "--", "sh", "-c", script)
}

// As PID 1, run reaps the orphans reparented to it: CMD starts a process
// whose parent exits at once, so that it is reparented to PID 1, waits
// (a bounded poll) for it to end and leave /proc, then counts the zombies
// in the namespace: none. run still exits with CMD's status.
func TestRunAsPID1ReapsOrphans(t *testing.T) {
	r := runAsPID1(t, `echo "parent: $PPID"
		orphan=$(sh -c 'sleep 0.1 >/dev/null 2>&1 & echo $!')
		i=0
		while [ -e /proc/$orphan ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
		zombies=0
		for stat in /proc/[0-9]*/stat; do
			{ read -r line < "$stat"; } 2>/dev/null || continue
			case "${line##*) }" in Z*) zombies=$((zombies+1)); echo "zombie: $line";; esac
		done
		echo "zombies: $zombies"
		exit 7`)
	if r.code != 7 || r.stdout != "parent: 1\nzombies: 0\n" {
		t.Errorf("run as PID 1: exit %d, stdout %q; want exit 7, no zombie\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
}

// As PID 1, run has handlers for the signals it forwards, so a SIGTERM
// from inside its namespace (kill -TERM 1), which the kernel would drop
// for a PID 1 without one, reaches CMD, and run exits with CMD's status.
func TestRunAsPID1ForwardsSIGTERMFromInside(t *testing.T) {
	r := runAsPID1(t, `trap 'echo "got TERM"; exit 9' TERM
		kill -TERM 1
		sleep 5 & wait $!
		echo "no TERM within 5 s"`)
	if r.code != 9 || r.stdout != "got TERM\n" {
		t.Errorf("kill -TERM 1 from CMD: exit %d, stdout %q; want exit 9 and CMD's trap\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
}

// As PID 1, run reports a CMD killed by a signal as shells do, 128 plus
// the signal, from the wait status it reaped itself.
func TestRunAsPID1ExitsWith128PlusTheSignalThatKilledTheCommand(t *testing.T) {
	if r := runAsPID1(t, `kill -KILL $$`); r.code != 128+9 {
		t.Errorf("CMD killed by SIGKILL: run exited %d, want 137\nstderr:\n%s", r.code, r.stderr)
	}
}

// As PID 1, run refuses the pass backend, whose programs its reaping would
// take from the store's own waits, and says what to use instead, before
// CMD starts (exit 125).
func TestRunAsPID1RefusesThePassBackend(t *testing.T) {
	needTool(t, "unshare", "util-linux")
	needRoot(t, "unshare --pid needs root")
	env := append(pathEnv(t), "CREDPROXY_KEYRING_BACKEND=pass")
	r := runBinary(t, "unshare", env, "", nil, "--pid", "--fork", "--mount-proc", binary,
		"run", "-allow-provider", "anthropic", "--", "sh", "-c", "echo started")
	if r.code != exitNoProxy || r.stdout != "" || !strings.Contains(r.stderr, "use CREDPROXY_KEYRING_BACKEND=file or -store memory") {
		t.Errorf("run as PID 1 with pass: exit %d, stdout %q, stderr %q; want 125 and a way out", r.code, r.stdout, r.stderr)
	}
}
