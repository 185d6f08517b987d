// Command floorserver is the floor that examples/loadgen measures servers
// against from outside: the least a server on the credproxy framing can
// do. It is the same server as the floor of the in-process
// BenchmarkGetToken, in a process of its own.
//
//	floorserver -response answer.json
//
// It answers the first frame of each connection with a successful
// handshake and every later frame with the same canned answer (by
// default a get_token answer of the size memserver gives for the
// benchmark's token; -response FILE holds another, such as a real
// server's answer captured by loadgen -compare). It decodes nothing:
// each frame is read unbuffered, its 4-byte header and then its payload,
// and the answer written whole in one call, as the in-process floor does.
//
// When it listens it prints one line, LLXPRT_CREDENTIAL_SOCKET=<path>, on
// stdout. SIGINT or SIGTERM removes the socket and exits 0.
package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
)

// maxFrameSize is the protocol's largest frame payload
// (credproxy.MaxFrameSize; not imported, so that the floor links nothing
// of the server).
const maxFrameSize = 65536

// handshakeOK is the server's answer to a version 1 handshake.
const handshakeOK = `{"v":1,"op":"handshake","ok":true,"data":{"version":1}}`

// defaultResponse is what BenchmarkGetToken's floor answers: a get_token
// answer for the benchmark's token, the size memserver answers with.
const defaultResponse = `{"id":"1","ok":true,"data":{"access_token":"fake-access-token-AAAA1111",` +
	`"expiry":9999999999,"token_type":"Bearer","scope":null,"account_id":"acct-42",` +
	`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}}`

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "floorserver:", err)
		os.Exit(1)
	}
}

func run() error {
	responseFile := flag.String("response", "", "`file` holding the answer payload (JSON) to every request after the handshake")
	flag.Parse()
	response := []byte(defaultResponse)
	if *responseFile != "" {
		var err error
		if response, err = os.ReadFile(*responseFile); err != nil {
			return err
		}
	}
	if len(response) > maxFrameSize {
		return fmt.Errorf("the response is %d bytes, more than a frame holds", len(response))
	}
	dir, err := os.MkdirTemp("", "floor")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("unix", filepath.Join(dir, "floor.sock"))
	if err != nil {
		return err
	}
	fmt.Printf("LLXPRT_CREDENTIAL_SOCKET=%s\n", ln.Addr())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	go func() { <-stop; ln.Close() }()
	hello, answer := frame([]byte(handshakeOK)), frame(response)
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		} else if err != nil {
			return err
		}
		go serve(c, hello, answer)
	}
}

// serve answers c's first frame with hello and every later one with
// answer, until c fails or closes.
func serve(c net.Conn, hello, answer []byte) {
	defer c.Close()
	buf := make([]byte, maxFrameSize)
	var header [4]byte
	for reply := hello; ; reply = answer {
		if _, err := io.ReadFull(c, header[:]); err != nil {
			return
		}
		size := binary.BigEndian.Uint32(header[:])
		if size > maxFrameSize {
			return
		}
		if _, err := io.ReadFull(c, buf[:size]); err != nil {
			return
		}
		if _, err := c.Write(reply); err != nil {
			return
		}
	}
}

// frame seals payload into a frame: a 4-byte big-endian length, then it.
func frame(payload []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
}
