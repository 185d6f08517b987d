//go:build unix

package credproxy

import "os"

// openTerminal opens the process's controlling terminal, so that a
// password is asked for there whatever stdin carries (a token piped into
// credproxy token set, say).
func openTerminal() (*os.File, error) { return os.OpenFile("/dev/tty", os.O_RDWR, 0) }
