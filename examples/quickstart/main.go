// Command quickstart shows credproxy end to end in one process: a host
// starts a session for a sandbox, granting it one provider's token
// (stored with a refresh token) and one API key from a MemoryStore, and a
// client reads them as the sandboxed process would, with the session's
// capability token. The refresh token stays on the host, a client without
// the capability token is refused, and closing the session revokes it.
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
	sess, err := srv.NewSession(credproxy.SessionOptions{
		Policy: &credproxy.Grant{Providers: []string{"anthropic"}, Keys: []string{"openai"}},
	})
	if err != nil {
		return err // the socket directory is unsafe: do not start the sandbox
	}
	path := sess.SocketPath()
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "host:    session %s on %s (mode %v), alone in its directory\n", sess.ID(), path, fi.Mode())
	fmt.Fprintf(out, "host:    a launcher would mount %s into the sandbox, read-only, and pass %q and the token on fd 3\n",
		sess.Dir(), sess.Environ())

	// Sandbox side: a client on the socket, with the session's token (a
	// sandboxed process gets it from NewClientFromEnv, which reads fd 3).
	client := credproxy.NewClient(path, credproxy.ClientOptions{CapabilityToken: sess.CapabilityToken()})
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
	err = client.SaveToken(ctx, "anthropic", "", tok)
	fmt.Fprintf(out, "sandbox: save_token anthropic -> %v (the grant is read-only)\n", err)

	stranger := credproxy.NewClient(path, credproxy.ClientOptions{})
	defer stranger.Close()
	_, err = stranger.GetToken(ctx, "anthropic", "")
	fmt.Fprintf(out, "other:   get_token without the capability token -> %v\n", err)

	stored, err := store.GetToken(ctx, "anthropic", "")
	if err != nil {
		return err
	}
	if got.RefreshToken() != "" || stored.RefreshToken() == "" {
		return fmt.Errorf("refresh token handling is broken")
	}
	fmt.Fprintln(out, "result:  the refresh token did not cross the socket: the sandbox's token has no refresh_token; the host's store still has it")

	// The sandbox exited: close its session. Its token is worthless now.
	if err := sess.Close(); err != nil {
		return err
	}
	if _, err := os.Stat(sess.Dir()); os.IsNotExist(err) {
		fmt.Fprintln(out, "host:    session closed; its socket and directory are gone")
	}
	shutdownCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return srv.Shutdown(shutdownCtx)
}
