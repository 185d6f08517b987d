// Command quickstart shows credproxy end to end in one process: a host
// serves a token (with a refresh token) and an API key from a MemoryStore
// on a private Unix socket, and a client reads them as a sandboxed process
// would. The refresh token stays on the host.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"github.com/credproxy/credproxy"
)

// Obviously fake credentials.
const demoToken = `{
	"access_token": "demo-access-token-0000",
	"refresh_token": "demo-refresh-token-NEVER-LEAVES-THE-HOST",
	"expiry": 4102444800,
	"token_type": "Bearer",
	"account_id": "acct-demo-42"
}`

func main() {
	if err := run(os.Stdout); err != nil {
		log.Fatal("quickstart: ", err)
	}
}

func run(out io.Writer) error {
	ctx := context.Background()

	// Host side: a store, a server, a private socket.
	store := credproxy.NewMemoryStore()
	tok, err := credproxy.ParseToken([]byte(demoToken))
	if err != nil {
		return err
	}
	if err := store.SaveToken(ctx, "anthropic", "", tok); err != nil {
		return err
	}
	if err := store.SaveAPIKey(ctx, "openai", "sk-demo-not-a-real-key"); err != nil {
		return err
	}
	srv, err := credproxy.NewServer(credproxy.Options{Store: store})
	if err != nil {
		return err
	}
	ln, err := credproxy.Listen("")
	if err != nil {
		return err
	}
	path := ln.Addr().String()
	go srv.Serve(ln)
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "host:    serving on %s (mode %v)\n", path, fi.Mode())
	fmt.Fprintf(out, "host:    a launcher would now start the sandbox with %s=%s\n", credproxy.SocketEnv, path)

	// Sandbox side: a client on the socket.
	client := credproxy.NewClient(path, credproxy.ClientOptions{})
	defer client.Close()
	got, err := client.GetToken(ctx, "anthropic", "")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "sandbox: get_token anthropic -> %s\n", got.Reveal())
	key, err := client.GetAPIKey(ctx, "openai")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "sandbox: get_api_key openai  -> %s\n", string(key))

	stored, err := store.GetToken(ctx, "anthropic", "")
	if err != nil {
		return err
	}
	if got.RefreshToken() != "" || stored.RefreshToken() == "" {
		return fmt.Errorf("refresh token handling is broken")
	}
	fmt.Fprintln(out, "result:  the refresh token did not cross the socket: the sandbox's token has no refresh_token; the host's store still has it")

	shutdownCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if _, err := os.Stat(path); os.IsNotExist(err) {
		fmt.Fprintln(out, "host:    shut down; socket removed")
	}
	return nil
}
