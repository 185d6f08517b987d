//go:build !unix

package main

import (
	"net"
	"os"
)

// systemdListener returns no listener: socket activation is systemd's,
// and systemd is Linux's.
func systemdListener() (net.Listener, string, error) { return nil, "", nil }

// groupOrOthersCanConnect reports false: only Unix has the file modes it
// checks.
func groupOrOthersCanConnect(string) (os.FileMode, bool) { return 0, false }
