package credproxy

import (
	"context"
	"net"
	"testing"
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
