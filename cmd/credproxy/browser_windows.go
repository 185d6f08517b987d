package main

// platformBrowser opens u with the shell's handler for URLs, which uses
// the default browser. (start, the other way, is a cmd.exe builtin, and
// cmd.exe would split the URL at each &.)
func platformBrowser(u string) []string {
	return []string{"rundll32", "url.dll,FileProtocolHandler", u}
}
