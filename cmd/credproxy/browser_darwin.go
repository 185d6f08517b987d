package main

// platformBrowser opens u with open(1), which uses the default browser.
func platformBrowser(u string) []string { return []string{"open", u} }
