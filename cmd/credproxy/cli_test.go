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

// Issue 15, item 6: help that was asked for goes to stdout and exits 0;
// a usage error goes to stderr and exits 2. --version and version -help
// work.
func TestHelpAskedForGoesToStdout(t *testing.T) {
	for _, args := range [][]string{{"-help"}, {"--help"}, {"-h"}, {"help"}, {"token", "-help"}, {"token", "set", "-help"},
		{"token", "get", "-h"}, {"key", "--help"}, {"key", "ls", "-help"}, {"run", "-help"}, {"serve", "-help"}, {"version", "-help"}} {
		r := credproxyCmd(t, hostEnv(t), "", args...)
		if r.code != 0 || !strings.Contains(r.stdout, "Usage:") || r.stderr != "" {
			t.Errorf("credproxy %v: exit %d, stdout %q, stderr %q; want exit 0, the help on stdout", args, r.code, r.stdout, r.stderr)
		}
	}
	for _, args := range [][]string{{}, {"bogus"}, {"token"}, {"token", "-bogus"}, {"token", "get"}, {"key", "set", "-raw"},
		{"serve", "-bogus"}, {"version", "x"}} {
		r := credproxyCmd(t, hostEnv(t), "", args...)
		if r.code != 2 || r.stdout != "" || !strings.HasPrefix(r.stderr, "credproxy") {
			t.Errorf("credproxy %v: exit %d, stdout %q, stderr %q; want exit 2, an error on stderr", args, r.code, r.stdout, r.stderr)
		}
		onePrefix(t, r.stderr)
	}
	for _, flag := range []string{"--version", "-version"} {
		if r := credproxyCmd(t, hostEnv(t), "", flag); r.code != 0 || !strings.HasPrefix(r.stdout, "credproxy ") {
			t.Errorf("credproxy %s: %+v", flag, r)
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
