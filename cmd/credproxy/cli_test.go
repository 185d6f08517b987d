package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// onePrefix fails the test unless every line of stderr that carries the
// credproxy: prefix carries it once.
func onePrefix(t *testing.T, stderr string) {
	t.Helper()
	for line := range strings.Lines(stderr) {
		if strings.Count(line, "credproxy:") > 1 {
			t.Errorf("two prefixes in %q", line)
		}
	}
}

// Issue 15, item 6: run exits 125 for its own errors, flag errors
// included, 127 when CMD is not found and 126 when it cannot be executed,
// as container runtimes do; otherwise with CMD's status.
func TestRunExitCodes(t *testing.T) {
	env := pathEnv(t)
	notExec := filepath.Join(t.TempDir(), "script")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"run", "-bogus", "--", "true"}, 125},
		{[]string{"run", "-store", "memory"}, 125},
		{[]string{"run", "-store", "nosuch", "--", "true"}, 125},
		{[]string{"run", "-store", "memory", "--", "credproxy-no-such-command"}, 127},
		{[]string{"run", "-store", "memory", "--", filepath.Join(t.TempDir(), "missing")}, 127},
		{[]string{"run", "-store", "memory", "--", notExec}, 126},
		{[]string{"run", "-store", "memory", "--", t.TempDir()}, 126},
		{[]string{"run", "-store", "memory", "--", "sh", "-c", "exit 3"}, 3},
	} {
		r := credproxyCmd(t, env, "", tc.args...)
		if r.code != tc.code {
			t.Errorf("credproxy %v: exit %d, want %d; stderr %q", tc.args, r.code, tc.code, r.stderr)
		}
		if tc.code >= 125 && !strings.Contains("\n"+r.stderr, "\ncredproxy: ") {
			t.Errorf("credproxy %v: stderr %q, want a reason", tc.args, r.stderr)
		}
		onePrefix(t, r.stderr)
	}
}
