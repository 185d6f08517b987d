package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestNodeClientConformance runs interop/node/conformance.mjs, a client
// written in JavaScript from PROTOCOL.md alone, against this program: every
// behaviour the document states must hold for a client in another language.
// It needs Node.js 20 or later; without it the test is skipped, unless
// CREDPROXY_REQUIRE_NODE is set (as .ci/run sets it), when it fails.
func TestNodeClientConformance(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CREDPROXY_REQUIRE_NODE") != "" {
			t.Fatal("node not found and CREDPROXY_REQUIRE_NODE is set")
		}
		t.Skip("node not found; install Node.js 20+ to run the cross-language conformance check")
	}
	bin := filepath.Join(t.TempDir(), "memserver")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(node, "../../interop/node/conformance.mjs", bin).CombinedOutput()
	summary := ""
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "not ok") || strings.HasPrefix(line, "conformance:") {
			summary += line + "\n"
		}
	}
	if err != nil {
		t.Fatalf("conformance run failed: %v\n%s", err, out)
	}
	t.Logf("%s", summary)
	if !strings.Contains(summary, " 0 failed") {
		t.Errorf("unexpected summary:\n%s", out)
	}
}
