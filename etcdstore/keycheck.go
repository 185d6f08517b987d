package etcdstore

import (
	"context"
	"fmt"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The key check: one value under the prefix, sealed with the fleet's data
// key, that Open must be able to open. Without it, a host given the wrong
// key would start, and its writes (a token set, a refresh) would seal
// items that no other host can open, locking the fleet out of them.
const (
	keyCheckName = "keycheck"
	keyCheckText = "credproxy etcdstore: this store's data key"
)

func (s *EtcdStore) keyCheckKey() string { return s.prefix + keyCheckName }

// checkDataKey makes sure that the store's data keys open the store under
// its prefix, given kvs, everything Open read under it. A key check that
// does not open fails; so does a store with items of which none opens, so
// that a wrong key is not taken for the fleet's when the check is
// missing. A store without a key check gets one, sealed with DataKey,
// unless another host's appeared first, which must then open.
func (s *EtcdStore) checkDataKey(ctx context.Context, kvs []*mvccpb.KeyValue) error {
	key := s.keyCheckKey()
	items, opened := 0, false
	var firstErr error
	for _, kv := range kvs {
		k := string(kv.Key)
		switch {
		case k == key:
			if _, err := s.seal.open(key, kv.Value); err != nil {
				return s.wrongKey(err)
			}
			return nil
		case strings.HasPrefix(k, s.prefix+tokensDir) || strings.HasPrefix(k, s.prefix+apiKeysDir):
			items++
			if _, err := s.seal.open(k, kv.Value); err == nil {
				opened = true
			} else if firstErr == nil {
				firstErr = err
			}
		}
	}
	if items > 0 && !opened {
		return s.wrongKey(firstErr)
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(s.seal.seal(key, []byte(keyCheckText))))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return failure(ctx, "create the data key check", err)
	}
	if !resp.Succeeded {
		if got := resp.Responses[0].GetResponseRange().Kvs; len(got) == 1 {
			if _, err := s.seal.open(key, got[0].Value); err != nil {
				return s.wrongKey(err)
			}
		}
	}
	return nil
}

// wrongKey is Open's error for a data key that does not open the store.
func (s *EtcdStore) wrongKey(err error) error {
	return fmt.Errorf("credproxy: etcdstore: this host's data key (id %x) does not open the store under %s: %w; "+
		"give this host the fleet's data key (during a rotation, with the old one among the old data keys: "+
		"Options.OldDataKeys, old_data_keys in credproxy's providers file)", s.seal.current.id, s.prefix, err)
}

// resealKeyCheck seals the key check again with DataKey, after Reseal has
// done the items: hosts that have only an old key then fail at Open,
// rather than serve a store they can no longer read.
func (s *EtcdStore) resealKeyCheck(ctx context.Context) error {
	key := s.keyCheckKey()
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return wrapErr(ctx, "reseal the data key check", err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	_, err = s.resealItem(ctx, key, resp.Kvs[0].Value, resp.Kvs[0].ModRevision)
	return err
}
