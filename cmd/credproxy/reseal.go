package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore"
)

const resealSynopsis = `Usage: credproxy reseal [-providers FILE]

With CREDPROXY_STORE=etcd, seals every token and API key of the fleet's etcd
store again with the current data key (data_key in the providers file's
"etcd" member), opening what an old key sealed with old_data_keys. It is the
middle step of a data key rotation: first every host gets the new key as
data_key and the old one in old_data_keys; then one host runs reseal; then
old_data_keys is dropped. Hosts may serve meanwhile: a write that races
reseal wins, and reseal leaves that item to it. Running it again reseals
nothing more. It prints how many items it sealed again, and no secret.
`

const resealExample = `  (umask 077; openssl rand -hex 32 > /etc/credproxy/data-key.new)   # readable by its owner only, from the start
  # on every host: "data_key": "file:/etc/credproxy/data-key.new",
  #                "old_data_keys": ["file:/etc/credproxy/data-key"]; restart serve
  CREDPROXY_STORE=etcd credproxy reseal
  # on every host: drop old_data_keys; then destroy the old key`

func resealCommand(ctx context.Context, args []string, std stdio) error {
	if os.Getenv(credproxy.SocketEnv) != "" {
		return errors.New("reseal works on the host's store; run it on the host, not in a sandbox")
	}
	fs := newFlags("reseal", resealSynopsis, resealExample, std)
	file := fs.String("providers", "", "the providers `file` with the \"etcd\" member (default: $"+providersEnv+", else providers.json in the config directory)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError("reseal takes no arguments")
	}
	if defaultStore() != "etcd" {
		return usageError("reseal works on a fleet's etcd store: set %s=etcd", storeEnv)
	}
	st, err := hostStore(ctx, *file, true, std)
	if err != nil {
		return err
	}
	defer st.Close()
	n, err := st.(*etcdstore.EtcdStore).Reseal(ctx)
	if err != nil {
		return fmt.Errorf("reseal: %w (%d items sealed again before it)", err, n)
	}
	fmt.Fprintf(std.out, "sealed %d items again with the current data key\n", n)
	return nil
}
