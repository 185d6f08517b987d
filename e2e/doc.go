// Package e2e holds credproxy's end-to-end tests of the CLI against a
// real OpenID provider (package oidcprovider): logging in with the
// authorization code flow and PKCE, and with the device flow, and logging
// out with revocation. It is a module of its own so that the provider's
// dependencies never enter credproxy's go.mod. The tests build the
// credproxy binary from the root module, with that module's own
// dependency versions, and run it as a user would. Package fleet runs
// fleets of credproxy serve processes on one etcd cluster (-store etcd):
// one provider call per token across hosts, and the faults of a fleet.
//
//	go -C e2e test -race ./...
package e2e
