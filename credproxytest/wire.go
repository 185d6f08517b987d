package credproxytest

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// rawConn speaks the protocol frame by frame (PROTOCOL.md, "Frames"), so
// that a subtest can see what the server sends on the wire: the Client
// drops a refresh token it is sent, so only the wire shows that none was.
type rawConn struct {
	t *testing.T
	c net.Conn
}

// dialRaw connects to path and completes the handshake. Reads and writes
// give up after 10 s, so a subtest waiting for a frame that never comes
// fails instead of hanging.
func dialRaw(t *testing.T, path string) *rawConn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	r := &rawConn{t: t, c: c}
	r.send(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`)
	r.recv()
	return r
}

// send writes one frame: a 4-byte big-endian length, then the payload.
func (r *rawConn) send(payload string) {
	r.t.Helper()
	frame := binary.BigEndian.AppendUint32(nil, uint32(len(payload)))
	if _, err := r.c.Write(append(frame, payload...)); err != nil {
		r.t.Fatalf("write frame: %v", err)
	}
}

// recv reads one frame and returns its payload.
func (r *rawConn) recv() string {
	r.t.Helper()
	var header [4]byte
	if _, err := io.ReadFull(r.c, header[:]); err != nil {
		r.t.Fatalf("read frame: %v", err)
	}
	n := binary.BigEndian.Uint32(header[:])
	if n == 0 || n > 65536 {
		r.t.Fatalf("frame of %d bytes, outside the protocol's 1 to 65536", n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r.c, payload); err != nil {
		r.t.Fatalf("read frame: %v", err)
	}
	return string(payload)
}
