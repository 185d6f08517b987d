package credproxy

import "hash/maphash"

// What a session was last given, per token: refresh_token uses it to tell
// a sandbox that holds an outdated token (give it the stored one) from one
// whose current token stopped working (ask the provider).

type tokenID struct{ provider, bucket string }

// accessDigestSeed keys the digests in Session.served.
var accessDigestSeed = maphash.MakeSeed()

func accessDigest(tok Token) uint64 {
	v, _ := tok.lookup(fieldAccessToken)
	return maphash.Bytes(accessDigestSeed, v)
}

// noteServed records that the session was given tok.
func (ss *Session) noteServed(provider, bucket string, tok Token) {
	d := accessDigest(tok)
	id := tokenID{provider, bucket}
	ss.servedMu.Lock()
	defer ss.servedMu.Unlock()
	if ss.served == nil {
		ss.served = make(map[tokenID]uint64)
	}
	if ss.served[id] != d {
		ss.served[id] = d
	}
}

// servedOther reports whether the session was last given a token of
// provider and bucket other than tok.
func (ss *Session) servedOther(provider, bucket string, tok Token) bool {
	ss.servedMu.Lock()
	d, ok := ss.served[tokenID{provider, bucket}]
	ss.servedMu.Unlock()
	return ok && d != accessDigest(tok)
}
