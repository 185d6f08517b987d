//go:build unix

package credproxy_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"

	"github.com/credproxy/credproxy"
)

// A launcher hands the session to the sandboxed command: the socket path
// and LLXPRT_CAPABILITY_FD=3 in its environment, the token on its
// descriptor 3. (A real launcher runs bwrap or podman here, with the
// session's directory mounted; podman needs --preserve-fds 1 to pass
// descriptor 3 on.)
func ExampleSession_HandoffFile() {
	srv, _ := credproxy.NewServer(credproxy.Options{Store: credproxy.NewMemoryStore()})
	defer srv.Shutdown(context.Background())
	sess, err := srv.NewSession(credproxy.SessionOptions{Policy: &credproxy.Grant{}})
	if err != nil {
		log.Fatal(err)
	}
	defer sess.Close()

	handoff, err := sess.HandoffFile()
	if err != nil {
		log.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", `read -r token <&3; echo "fd $LLXPRT_CAPABILITY_FD holds ${#token} characters"`)
	cmd.Env = append(os.Environ(), sess.Environ()...)
	cmd.ExtraFiles = []*os.File{handoff} // descriptor 3
	out, err := cmd.Output()
	handoff.Close() // the command has its own copy
	if err != nil {
		log.Fatal(err)
	}
	fmt.Print(string(out))
	// Output: fd 3 holds 64 characters
}
