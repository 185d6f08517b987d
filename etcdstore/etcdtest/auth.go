package etcdtest

import (
	"crypto/rand"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
)

const rootUser = "root"

// EnableAuth adds an etcd user with password whose role, also named user,
// may read and write the keys under prefix and nothing else, and turns on
// the cluster's authentication if it is off. The first call also adds a
// root user, with a random password, which [Cluster.Client] uses from then
// on. Call it again to add more users. It fails the test on any error.
//
// With authentication on, a request that carries no password is refused,
// unless it comes with a client certificate whose common name is a user
// ([StartTLS]'s is [ClientCommonName], which no call adds unless asked to).
func (c *Cluster) EnableAuth(t testing.TB, user, password, prefix string) {
	t.Helper()
	c.authMu.Lock() // one at a time: the first call adds root
	defer c.authMu.Unlock()
	cli := c.Client(t)
	ctx := t.Context()
	c.mu.Lock()
	enabled := c.rootPass != ""
	c.mu.Unlock()
	var rootPass string
	if !enabled {
		rootPass = rand.Text()
		if _, err := cli.UserAdd(ctx, rootUser, rootPass); err != nil {
			t.Fatalf("etcdtest: add user %s: %v", rootUser, err)
		}
		if _, err := cli.UserGrantRole(ctx, rootUser, rootUser); err != nil {
			t.Fatalf("etcdtest: grant %s its role: %v", rootUser, err)
		}
	}
	if _, err := cli.RoleAdd(ctx, user); err != nil {
		t.Fatalf("etcdtest: add role %s: %v", user, err)
	}
	end := clientv3.GetPrefixRangeEnd(prefix)
	if _, err := cli.RoleGrantPermission(ctx, user, prefix, end, clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
		t.Fatalf("etcdtest: grant role %s %s: %v", user, prefix, err)
	}
	if _, err := cli.UserAdd(ctx, user, password); err != nil {
		t.Fatalf("etcdtest: add user %s: %v", user, err)
	}
	if _, err := cli.UserGrantRole(ctx, user, user); err != nil {
		t.Fatalf("etcdtest: grant %s its role: %v", user, err)
	}
	if !enabled {
		if _, err := cli.AuthEnable(ctx); err != nil {
			t.Fatalf("etcdtest: enable authentication: %v", err)
		}
		c.mu.Lock()
		c.rootPass = rootPass
		c.mu.Unlock()
	}
}
