package etcdstore

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// resealPage is how many items Reseal reads at once, to bound its memory
// and the size of each response, whatever the size of the store.
const resealPage = 256

// Reseal seals again, with [Options.DataKey], every item under the store's
// prefix that is sealed otherwise (with an old key, or in the format of
// stores that could not rotate keys), and returns how many it rewrote. It
// is step 2 of a rotation (see the package doc); running it again rewrites
// nothing more. It seals the store's data key check again too (not
// counted), so that hosts with only the old key fail at Open afterwards.
//
// Each item is rewritten in a transaction that compares its revision with
// the one read, so a write by any host in between is never overwritten:
// Reseal reads the item again and reseals the new value if it needs it
// (a write by a host that already has the new key does not).
//
// An item that no key opens stops Reseal with an error wrapping
// [ErrUnseal] that names it, after the items before it were resealed; add
// the key it names to [Options.OldDataKeys] and run Reseal again.
func (s *EtcdStore) Reseal(ctx context.Context) (resealed int, err error) {
	if err := s.begin(ctx); err != nil {
		return 0, err
	}
	// Only the item directories: lock keys hold no sealed value.
	for _, dir := range []string{s.prefix + tokensDir, s.prefix + apiKeysDir} {
		end := clientv3.GetPrefixRangeEnd(dir)
		from := dir
		for {
			resp, err := s.cli.Get(ctx, from, clientv3.WithRange(end), clientv3.WithLimit(resealPage))
			if err != nil {
				return resealed, wrapErr(ctx, "reseal", err)
			}
			for _, kv := range resp.Kvs {
				done, err := s.resealItem(ctx, string(kv.Key), kv.Value, kv.ModRevision)
				if err != nil {
					return resealed, err
				}
				if done {
					resealed++
				}
			}
			if !resp.More || len(resp.Kvs) == 0 {
				break
			}
			from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00" // the next key after the last
		}
	}
	// The key check last, once every item opens with DataKey: from then
	// on a host without DataKey fails at Open.
	return resealed, s.resealKeyCheck(ctx)
}

// resealItem seals value, read from key at mod revision rev, again with the
// current data key, unless it already is, in a transaction on rev. When
// the item changed since, it starts over from its new value (absent: done),
// at most maxUpdateAttempts times, then fails with ErrConflict. It reports
// whether it rewrote the item.
func (s *EtcdStore) resealItem(ctx context.Context, key string, value []byte, rev int64) (bool, error) {
	for range maxUpdateAttempts {
		pt, current, err := s.seal.openCurrent(key, value)
		if err != nil {
			return false, err
		}
		if current {
			return false, nil
		}
		sealed := s.seal.seal(key, pt)
		resp, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, string(sealed))).
			Else(clientv3.OpGet(key)).
			Commit()
		if err != nil {
			return false, wrapErr(ctx, "reseal", err)
		}
		if resp.Succeeded {
			// Read-your-writes, as for every write of the store.
			s.cache.put(key, s.cache.decode(key, sealed, resp.Header.Revision))
			return true, nil
		}
		// Another write won; the Else branch read it.
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			return false, nil // removed in between: nothing to reseal
		}
		value, rev = kvs[0].Value, kvs[0].ModRevision
	}
	return false, fmt.Errorf("credproxy: etcdstore: reseal %s: %w", key, ErrConflict)
}
