package credproxy

import "os"

// pipeFile returns the read end of a pipe that holds content and whose
// write end is closed, so that a reader meets the end after content.
func pipeFile(content string) (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, errorf("pipe for the capability token: %w", err)
	}
	_, err = w.WriteString(content) // far below a pipe's capacity: never blocks
	w.Close()
	if err != nil {
		r.Close()
		return nil, errorf("write the capability token: %w", err)
	}
	return r, nil
}
