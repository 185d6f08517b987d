package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sdkModules returns testdata/sdk/node_modules, which .ci/run installs
// with npm ci; the test is skipped without it, or fails when
// CREDPROXY_REQUIRE_SANDBOXES is set, as CI sets it.
func sdkModules(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("testdata", "sdk"))
	if err != nil {
		t.Fatal(err)
	}
	modules := filepath.Join(dir, "node_modules")
	for _, pkg := range []string{"@anthropic-ai/sdk", "openai"} {
		if _, err := os.Stat(filepath.Join(modules, pkg, "package.json")); err != nil {
			msg := fmt.Sprintf("%s is not installed in %s: run 'npm ci --prefix cmd/credproxy/testdata/sdk' (.ci/run does)", pkg, modules)
			if os.Getenv("CREDPROXY_REQUIRE_SANDBOXES") != "" {
				t.Fatal(msg + ", and CREDPROXY_REQUIRE_SANDBOXES is set")
			}
			t.Skip(msg)
		}
	}
	return dir
}

// Issue 16, done when: credproxy run -inject anthropic -inject openai
// runs the official SDKs, unmodified and configured by the environment
// alone, in bubblewrap with no network but loopback, through credproxy
// forward. The local HTTPS upstream (its CA given by ca_file) gets the
// real keys, and for the token route "acme" the stored access token, then
// the one the host refreshed it into when it came due (one call to the
// token endpoint); the SDK gets each streamed event as it is sent. The
// sandbox's processes (environment, command line and readable memory), its
// files and all it printed hold the phantom and no real credential. The
// anthropic and openai members are the built-in ones with only upstream
// and ca_file changed, so the built-ins' headers, paths and variables are
// what the SDKs use.
func TestInjectWithOfficialSDKsInBubblewrap(t *testing.T) {
	needTool(t, "bwrap", "bubblewrap")
	needTool(t, "node", "nodejs")
	sdk := sdkModules(t)
	caPEM, cert := testCA(t)
	api := newFakeAPI(t, cert)
	api.paced = true
	tokens, refreshes := fakeTokenEndpoint(t, acmeRefresh, acmeFreshToken, acmeNewRefresh)

	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	anthropic, openai := builtinInject["anthropic"], builtinInject["openai"]
	anthropic.Upstream, anthropic.CAFile = api.URL, caFile
	openai.Upstream, openai.CAFile = api.URL+"/v1", caFile
	provs := map[string]map[string]any{"providers": {
		"anthropic": map[string]any{"inject": anthropic},
		"openai":    map[string]any{"inject": openai},
		"acme": map[string]any{"client_id": "acme-cli", "token_url": tokens.URL + "/token", "inject": injectConfig{
			Upstream: api.URL + "/acme", CAFile: caFile, BaseURLEnv: "ACME_BASE_URL", KeyEnv: "ACME_TOKEN"}},
	}}
	// Due for refresh (within the host's 60 s margin) 3 s from now.
	expiry := time.Now().Add(63 * time.Second)
	creds := map[string]any{
		"tokens": map[string]any{"acme": map[string]any{"default": map[string]any{
			"access_token": acmeStaleToken, "refresh_token": acmeRefresh, "expiry": expiry.Unix()}}},
		"keys": map[string]string{"anthropic": realAnthropicKey, "openai": realOpenAIKey},
	}
	for file, v := range map[string]any{"ca.pem": string(caPEM), "providers.json": provs, "creds.json": creds} {
		data, ok := v.(string)
		if !ok {
			b, _ := json.Marshal(v)
			data = string(b)
		}
		if err := os.WriteFile(filepath.Join(dir, file), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	sessionDir := filepath.Join(t.TempDir(), "session")
	cmd := exec.Command(binary, append([]string{"run", "-store", "memory", "-import", filepath.Join(dir, "creds.json"),
		"-providers", filepath.Join(dir, "providers.json"), "-session-dir", sessionDir,
		"-inject", "anthropic", "-inject", "openai", "-inject", "acme", "--", "bwrap"},
		bwrapArgs(sessionDir, "--ro-bind", filepath.Join(sdk, "node_modules"), "/app/node_modules",
			"--ro-bind", filepath.Join(sdk, "app.mjs"), "/app/app.mjs", "--chdir", "/app",
			"--", "/credproxy", "forward", "--", "node", "/app/app.mjs")...)...)
	cmd.Env = append(pathEnv(t), "CP_TEST_ACME_DUE_MS="+strconv.FormatInt(expiry.Add(-60*time.Second+500*time.Millisecond).UnixMilli(), 10))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	printed := map[string]string{}
	var all strings.Builder
	lines := bufio.NewScanner(stdout)
	lines.Buffer(nil, 1<<20)
	for lines.Scan() {
		all.WriteString(lines.Text() + "\n")
		name, value, _ := strings.Cut(lines.Text(), ": ")
		printed[name] = value
		if name == "ready" {
			break
		}
	}
	if _, ok := printed["ready"]; !ok {
		cmd.Wait()
		t.Fatalf("the app did not get to the end:\n%s\nstderr:\n%s", all.String(), stderr.String())
	}
	t.Logf("the sandbox's calls took %v", time.Since(start))

	secrets := []string{realAnthropicKey, realOpenAIKey, acmeStaleToken, acmeFreshToken, acmeRefresh, acmeNewRefresh}
	phantom := envValue(strings.Fields(printed["environ"]), "ANTHROPIC_API_KEY")
	if !strings.HasPrefix(phantom, "cp-phantom-") {
		t.Fatalf("the sandbox's ANTHROPIC_API_KEY is %q, not a phantom", phantom)
	}
	scanSandbox(t, cmd.Process.Pid, append(secrets, phantom))

	stdin.Close() // the app ends
	rest, _ := bufio.NewReader(stdout).ReadString(0)
	all.WriteString(rest)
	if err := cmd.Wait(); err != nil {
		t.Errorf("run: %v\nstderr:\n%s", err, stderr.String())
	}
	for name, want := range map[string]string{
		"anthropic events":  "message_start,content_block_start,content_block_delta,content_block_delta,content_block_delta,content_block_stop,message_delta,message_stop",
		"anthropic text":    "Hello from upstream",
		"openai reply":      "Hi from the fake OpenAI",
		"ack 2":             "200 ok",
		"acme after expiry": "200 acme-user",
	} {
		if printed[name] != want {
			t.Errorf("the app printed %s: %q; want %q", name, printed[name], want)
		}
	}
	env := strings.Fields(printed["environ"])
	for name, want := range map[string]string{"ANTHROPIC_BASE_URL": "http://127.0.0.1:8787/anthropic", "OPENAI_BASE_URL": "http://127.0.0.1:8787/openai",
		"OPENAI_API_KEY": phantom, "ACME_TOKEN": phantom, "LLXPRT_INJECT_ADDR": "127.0.0.1:8787"} {
		if got := envValue(env, name); got != want {
			t.Errorf("the sandbox's %s is %q; want %q", name, got, want)
		}
	}

	seen, problems := api.credentials()
	for _, p := range problems {
		t.Errorf("upstream: %s", p)
	}
	for route, want := range map[string][]string{"anthropic": {"Bearer " + realAnthropicKey}, "openai": {"Bearer " + realOpenAIKey},
		"acme": {"Bearer " + acmeStaleToken, "Bearer " + acmeFreshToken}} {
		got := seen[route]
		if len(got) == 0 || slices.ContainsFunc(got, func(c string) bool { return !slices.Contains(want, c) }) {
			t.Errorf("upstream %s got credentials %q; want only %q", route, got, want)
		}
	}
	t.Logf("the acme upstream got, in turn: %q", seen["acme"])
	if acme := seen["acme"]; len(acme) == 0 || acme[len(acme)-1] != "Bearer "+acmeFreshToken {
		t.Errorf("after the acme token came due, the upstream got %q; want the refreshed token last", acme)
	}
	if n := refreshes.Load(); n != 1 {
		t.Errorf("the token endpoint was called %d times; want one refresh", n)
	}

	output := all.String() + stderr.String()
	for _, s := range secrets {
		if strings.Contains(output, s) {
			t.Errorf("run's output (the app's, or the host's log) holds the real credential %q", s)
		}
	}
	if t.Failed() {
		t.Logf("stdout:\n%s\nstderr:\n%s", all.String(), stderr.String())
	}
}

// scanSandbox scans every process below run (bwrap, forward, node) and
// the sandbox's files, seen from the host through /proc: none may hold a
// real credential (all but the last of needles), and node, as a check
// that the scan can find one, must hold the phantom (the last).
func scanSandbox(t *testing.T, runPid int, needles []string) {
	t.Helper()
	secrets, phantom := needles[:len(needles)-1], needles[len(needles)-1]
	pids := descendants(runPid)
	var read int64
	phantomInMemory := false
	for _, pid := range pids {
		found, n, err := scanProcess(pid, needles)
		if err != nil {
			t.Errorf("scanning pid %d: %v", pid, err)
			continue
		}
		read += n
		for _, s := range secrets {
			if where := found[s]; len(where) > 0 {
				t.Errorf("a real credential %q is in the sandbox: %s", s, strings.Join(where, "; "))
			}
		}
		for _, where := range found[phantom] {
			phantomInMemory = phantomInMemory || strings.Contains(where, "memory")
		}
	}
	if !phantomInMemory {
		t.Errorf("the scan of %d processes (%d MiB of memory) did not find the phantom in memory: it cannot be trusted", len(pids), read>>20)
	}
	if len(pids) == 0 {
		return
	}
	found, files, err := scanFiles(fmt.Sprintf("/proc/%d/root", pids[len(pids)-1]), secrets)
	if err != nil {
		t.Errorf("scanning the sandbox's files: %v", err)
	}
	for s, where := range found {
		t.Errorf("a real credential %q is in the sandbox's files: %s", s, strings.Join(where, ", "))
	}
	t.Logf("scanned %d processes (%d MiB of memory) and %d files", len(pids), read>>20, files)
}

// The README's walk-through of run -inject, taken from README.md, runs as
// written but for three things: its /tmp paths are under a directory of
// the test's own, npm install is a copy of the SDK testdata/sdk pins (no
// registry at test time), and the providers file (CREDPROXY_PROVIDERS)
// points the anthropic route at a local upstream, as the built-in one
// otherwise, with its CA. The SDK streams the upstream's message, and the
// upstream gets the key the walk-through stores. Then the README's Podman
// command runs the same app in a container of node and its libraries.
func TestREADMEInjectWalkThroughRuns(t *testing.T) {
	needTool(t, "bwrap", "bubblewrap")
	needTool(t, "node", "nodejs")
	sdk := sdkModules(t)
	blocks := readmeBlocks(t, "### Injection: run -inject and forward")
	const install = "npm install --no-audit --no-fund @anthropic-ai/sdk"
	if len(blocks) != 2 || !strings.Contains(blocks[0], install) || !strings.Contains(blocks[1], "podman run") {
		t.Fatalf("the walk-through has changed; update this test:\n%s", strings.Join(blocks, "\n"))
	}
	tmp, err := os.MkdirTemp("", "cpr") // short: the session's socket paths live under it
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	local := func(script string) string { return strings.ReplaceAll(script, "/tmp/", tmp+"/") }

	caPEM, cert := testCA(t)
	api := newFakeAPI(t, cert)
	caFile := filepath.Join(tmp, "ca.pem")
	os.WriteFile(caFile, caPEM, 0o600)
	anthropic := builtinInject["anthropic"]
	anthropic.Upstream, anthropic.CAFile = api.URL, caFile
	provs, _ := json.Marshal(map[string]any{"providers": map[string]any{"anthropic": map[string]any{"inject": anthropic}}})
	providersFile := filepath.Join(tmp, "providers.json")
	os.WriteFile(providersFile, provs, 0o600)
	env := append(hostEnv(t), providersEnv+"="+providersFile, "PATH="+filepath.Dir(binary)+":"+os.Getenv("PATH"))

	r := runBinary(t, "sh", env, "", nil, "-ec", strings.Replace(local(blocks[0]), install, "cp -R "+filepath.Join(sdk, "node_modules")+" .", 1))
	if r.code != 0 || r.stdout != "Hello from upstream\n" {
		t.Fatalf("the walk-through: %+v", r)
	}
	seen, problems := api.credentials()
	if want := []string{"Bearer sk-ant-your-key"}; !slices.Equal(seen["anthropic"], want) || len(problems) > 0 {
		t.Errorf("the upstream got %q (%q); want %q", seen["anthropic"], problems, want)
	}

	t.Run("podman", func(t *testing.T) {
		needTool(t, "podman", "podman runc")
		needRoot(t, "rootful Podman needs root")
		image := nodeImage(t)
		// This VM's rootful Podman needs the flags the other Podman tests pass.
		podman := strings.Replace(local(blocks[1]), "podman run --rm", "podman --runtime runc --cgroup-manager cgroupfs run --rm "+
			"--ulimit nofile=1024:1024 --ulimit nproc=1024:1024", 1)
		r := runBinary(t, "sh", env, "", nil, "-ec", strings.Replace(podman, "IMAGE", image, 1))
		if r.code != 0 || r.stdout != "Hello from upstream\n" {
			t.Fatalf("the Podman command: %+v", r)
		}
	})
}

// nodeImage makes a container image holding node and the libraries it
// loads, as ldd lists them, and nothing else.
func nodeImage(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal(err)
	}
	node, _ = filepath.EvalSymlinks(node)
	out, err := exec.Command("ldd", node).Output()
	if err != nil {
		t.Fatalf("ldd %s: %v", node, err)
	}
	files := []string{node}
	for _, f := range strings.Fields(string(out)) {
		if strings.HasPrefix(f, "/") {
			files = append(files, f)
		}
	}
	tarball := filepath.Join(t.TempDir(), "node.tar")
	// -h stores what the library links point to, under the links' names.
	if out, err := exec.Command("tar", append([]string{"-chf", tarball, "-C", "/"}, relative(files)...)...).CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	const image = "localhost/credproxy-node-test:latest"
	if out, err := exec.Command("podman", "import", "-q", "--change", "ENV PATH="+filepath.Dir(node), tarball, image).CombinedOutput(); err != nil {
		t.Fatalf("podman import: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("podman", "rmi", "-f", image).Run() })
	return image
}

func relative(paths []string) []string {
	out := make([]string, len(paths))
	for i, p := range paths {
		out[i] = strings.TrimPrefix(p, "/")
	}
	return out
}

// readmeBlocks returns the sh code blocks of the README.md section that
// starts with the line heading, up to the next heading of its level.
func readmeBlocks(t *testing.T, heading string) []string {
	t.Helper()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "\n"+heading+"\n")
	if !ok {
		t.Fatalf("README.md has no %q", heading)
	}
	level, _, _ := strings.Cut(heading, " ")
	section, _, _ = strings.Cut(section, "\n"+level+" ")
	var blocks []string
	for {
		_, rest, ok := strings.Cut(section, "```sh\n")
		if !ok {
			return blocks
		}
		block, after, _ := strings.Cut(rest, "\n```\n")
		blocks = append(blocks, block+"\n")
		section = after
	}
}
