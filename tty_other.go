//go:build !unix

package credproxy

import (
	"errors"
	"os"
)

// openTerminal has no controlling terminal to open here; the password is
// asked for on stdin if that is a terminal.
func openTerminal() (*os.File, error) { return nil, errors.ErrUnsupported }
