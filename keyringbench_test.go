package credproxy

import (
	"context"
	"flag"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkGetTokenKeyringFile measures get_token through the server at
// 16 connections (rate limit off) on the store hosts run by default, the
// file KeyringStore, and in the same run on a MemoryStore holding the same
// token: the two are measured in alternating slices, as in
// BenchmarkGetToken. Custom metrics: req/s and the process's CPU time per
// request (client and server) for both, and the ratios file/memory.
func BenchmarkGetTokenKeyringFile(b *testing.B) {
	const conns = 16
	request := frameOf(`{"v":1,"id":"1","op":"get_token","payload":{"provider":"anthropic"}}`)
	handshake := `{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`
	stores := [2]Store{NewMemoryStore(), openFileStore(b, storeDir(b))}
	var dialed [2][]net.Conn
	var served [2]load
	for i, st := range stores {
		if err := st.SaveToken(context.Background(), "anthropic", "", mustToken(b, anthropicToken)); err != nil {
			b.Fatal(err)
		}
		_, path := startServer(b, Options{Store: st, RateLimit: -1})
		dialed[i] = dial(b, path, conns, handshake)
	}
	b.ResetTimer()
	for i := range benchSlices {
		n := b.N/benchSlices + min(1, max(0, b.N%benchSlices-i))
		for j := range stores {
			served[j].add(b, dialed[j], n, request)
		}
	}
	b.StopTimer()
	memory, file := &served[0], &served[1]
	cpu := func(l *load) float64 { return us(l.cpu) / float64(len(l.latencies)) }
	b.ReportMetric(file.perSecond(), "file-req/s")
	b.ReportMetric(memory.perSecond(), "memory-req/s")
	b.ReportMetric(file.perSecond()/memory.perSecond(), "ratio-req/s")
	b.ReportMetric(cpu(file), "file-cpu-µs/req")
	b.ReportMetric(cpu(memory), "memory-cpu-µs/req")
	b.ReportMetric(cpu(file)/cpu(memory), "ratio-cpu")
	b.ReportMetric(us(file.quantile(0.50)), "file-p50-µs")
	b.ReportMetric(us(memory.quantile(0.50)), "memory-p50-µs")
	b.ReportMetric(0, "ns/op") // the custom metrics say it better
}

// BenchmarkKeyringBackends measures what one KeyringStore.GetToken costs
// on each backend that runs here: wall time per read (ns/op) and this
// process's CPU per read. The file backend is measured with the item
// unchanged since the last read (from memory) and changed (decrypted);
// pass runs pass and gpg, whose CPU is not this process's; Secret
// Service's work is in gnome-keyring-daemon, and is measured in a child
// test process under its own D-Bus session.
func BenchmarkKeyringBackends(b *testing.B) {
	ctx := context.Background()
	tok := mustToken(b, anthropicToken)
	bench := func(b *testing.B, st Store, between func()) {
		b.Helper()
		if err := st.SaveToken(ctx, "anthropic", "", tok); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { st.RemoveToken(ctx, "anthropic", "") })
		// CPU is measured around the reads alone when something runs
		// between them; else around the loop, which costs less.
		var cpu time.Duration
		start := processCPU()
		for b.Loop() {
			if between != nil {
				cpu += processCPU() - start
				b.StopTimer()
				between()
				b.StartTimer()
				start = processCPU()
			}
			if _, err := st.GetToken(ctx, "anthropic", ""); err != nil {
				b.Fatal(err)
			}
		}
		cpu += processCPU() - start
		b.ReportMetric(us(cpu)/float64(b.N), "cpu-µs/op")
	}
	b.Run("file/unchanged", func(b *testing.B) {
		bench(b, openFileStore(b, storeDir(b)), nil)
	})
	b.Run("file/changed", func(b *testing.B) {
		dir := storeDir(b)
		writer := openFileStore(b, dir)
		bench(b, openFileStore(b, dir), func() {
			if err := writer.SaveToken(ctx, "anthropic", "", tok); err != nil {
				b.Fatal(err)
			}
		})
	})
	b.Run("keyctl", func(b *testing.B) {
		if runtime.GOOS != "linux" {
			b.Skip("the kernel keyring is Linux's")
		}
		st, err := OpenKeyringStore(KeyringOptions{Backend: "keyctl", Dir: storeDir(b)})
		if err != nil {
			b.Fatal(err)
		}
		bench(b, st, nil)
	})
	b.Run("pass", func(b *testing.B) {
		st, err := OpenKeyringStore(KeyringOptions{Backend: "pass", Dir: storeDir(b),
			Keyring: keyringConfig(setUpPass(b), "bench")})
		if err != nil {
			b.Fatal(err)
		}
		bench(b, st, nil)
	})
	b.Run("secret-service", func(b *testing.B) {
		if os.Getenv("CREDPROXY_TEST_SECRET_SERVICE") != "" {
			st, err := OpenKeyringStore(KeyringOptions{Backend: "secret-service", Dir: storeDir(b)})
			if err != nil {
				b.Fatal(err)
			}
			bench(b, st, nil)
			return
		}
		// The child's figures are the measurement: report them as this
		// benchmark's, however many times the framework runs it.
		out := runSecretServiceChild(b, "-test.run=^$", "-test.bench=^BenchmarkKeyringBackends$/^secret-service$",
			"-test.benchtime="+benchtime())
		for line := range strings.Lines(out) {
			if f := strings.Fields(line); len(f) >= 6 && strings.HasPrefix(f[0], "BenchmarkKeyringBackends") {
				for i := 2; i+1 < len(f); i += 2 {
					v, _ := strconv.ParseFloat(f[i], 64)
					b.ReportMetric(v, f[i+1])
				}
			}
		}
	})
}

// benchtime returns the -test.benchtime of this run, for a child to use.
func benchtime() string {
	if f := flag.Lookup("test.benchtime"); f != nil {
		return f.Value.String()
	}
	return "1s"
}
