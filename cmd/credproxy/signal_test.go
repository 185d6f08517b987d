//go:build unix

package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// init makes the test binary, run with CREDPROXY_TEST_COUNT_SIGINT set, a
// CMD for run that counts the SIGINTs it gets: it prints run's pid, then
// "INT n" for each SIGINT, and exits on SIGTERM.
func init() {
	if os.Getenv("CREDPROXY_TEST_COUNT_SIGINT") == "" {
		return
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	fmt.Printf("run %d\n", os.Getppid())
	for n := 1; ; n++ {
		if <-sigs == syscall.SIGTERM {
			fmt.Println("TERM")
			os.Exit(0)
		}
		fmt.Printf("INT %d\n", n)
	}
}

// Issue 15, item 5: one Ctrl-C reaches CMD once. The terminal sends
// SIGINT to its whole foreground process group, run and CMD both; run
// must not send CMD a second one, which programs that take a second
// Ctrl-C as "abort now" obey. In a pty (script), Ctrl-C, then SIGTERM to
// run, which run forwards after any SIGINT it forwarded: CMD must print
// "INT 1" and then "TERM".
func TestOneCtrlCReachesTheCommandOnce(t *testing.T) {
	needTool(t, "script", "util-linux") // for a pty
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("script", "-qec", binary+" run -store memory -- "+self, "/dev/null")
	cmd.Env = append(hostEnv(t), "CREDPROXY_TEST_COUNT_SIGINT=1")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	next := func() string {
		for lines.Scan() {
			line := strings.TrimSpace(strings.ReplaceAll(lines.Text(), "^C", ""))
			if strings.HasPrefix(line, "run ") || strings.HasPrefix(line, "INT ") || line == "TERM" {
				return line // not run's log, which shares the pty
			}
		}
		return ""
	}
	first := next()
	runPID, err := strconv.Atoi(strings.TrimPrefix(first, "run "))
	if err != nil {
		t.Fatalf("CMD's first line %q", first)
	}
	stdin.Write([]byte{3}) // Ctrl-C
	if got := next(); got != "INT 1" {
		t.Fatalf("after Ctrl-C CMD printed %q, want INT 1", got)
	}
	syscall.Kill(runPID, syscall.SIGTERM)
	if got := next(); got != "TERM" {
		t.Errorf("after one Ctrl-C and SIGTERM CMD printed %q, want TERM", got)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Error("run did not end after CMD did")
	}
}
