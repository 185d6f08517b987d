//go:build !darwin && !windows

package main

import "os"

// platformBrowser opens u with xdg-open when there is a display to open
// it on (X11 or Wayland), and gives nil otherwise: on a console or over
// SSH, xdg-open would start a text browser in the terminal that credproxy
// prints its prompts to, or fail.
func platformBrowser(u string) []string {
	if os.Getenv("DISPLAY") == "" && os.Getenv("WAYLAND_DISPLAY") == "" {
		return nil
	}
	return []string{"xdg-open", u}
}
