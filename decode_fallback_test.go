package credproxy

import (
	"strings"
	"testing"
)

// Hostile frames for the fallback decoder (escaped member names force it),
// each with what PROTOCOL.md's JSON rules ask, stated independently of the
// json package.
func TestDecodeFallbackHostileFrames(t *testing.T) {
	deep := strings.Repeat(`[`, 9000) + strings.Repeat(`]`, 9000)
	deeper := strings.Repeat(`[`, 10001) + strings.Repeat(`]`, 10001)
	for _, c := range []struct {
		frame      string
		wantErr    bool
		op, id     string
		versionOK  bool
		version    int64
		payload    bool
		payloadErr bool
	}{
		{frame: `{"\u0076":1,"id":"a","op":"get_token","payload":{"provider":"p"}}`, op: "get_token", id: "a", versionOK: true, version: 1, payload: true},
		// member names match exactly: "V", "Op", "ID", "Payload" are unknown members
		{frame: `{"\u0056":1,"\u004fp":"get_token","I\u0044":"x","Payload":{}}`},
		{frame: `{"\u0076":1,"v":1}`, wantErr: true},                        // duplicate after unescaping
		{frame: `{"\u006fp":"a","o\u0070":"b"}`, wantErr: true},             // duplicate, both escaped
		{frame: `{"\u0076":1,"payload":{"a":1,"\u0061":2}}`, wantErr: true}, // duplicate at depth
		{frame: `{"\u0076":1e999999,"id":1e3}`},                             // numbers beyond float64, non-integer id
		{frame: `{"\u0076":123456789012345678901234567890,"id":-0}`, versionOK: true, version: 1<<63 - 1, id: "-0"},
		{frame: `{"\u0076":-123456789012345678901234567890}`, versionOK: true, version: -1 << 63},
		{frame: `{"\u0076":1,"x":` + deep + `}`, versionOK: true, version: 1},
		{frame: `{"\u0076":1,"x":` + deeper + `}`, wantErr: true},
		{frame: `{"\u0076":1,"payload":"x"}`, versionOK: true, version: 1, payloadErr: true},
		{frame: `{"\u0076":1,"payload":[]}`, versionOK: true, version: 1, payloadErr: true},
		{frame: `{"\u0076":1} {}`, wantErr: true},
		{frame: `{"\u0076":1}` + "\x00", wantErr: true},
		{frame: "{\"\\u0076\":1,\"id\":\"\\ud800\"}", wantErr: true}, // lone surrogate: invalid per v2
		{frame: `{"\u0000":1}`},
		{frame: `{"op":"\u0067et_token","\u0069d":"` + strings.Repeat("x", 257) + `"}`, op: "get_token"},
	} {
		req, perr := decodeRequest([]byte(c.frame))
		short := c.frame
		if len(short) > 80 {
			short = short[:80] + "..."
		}
		if (perr != nil) != c.wantErr {
			t.Errorf("%s: error %v, want error %v", short, perr, c.wantErr)
			continue
		}
		if perr != nil {
			continue
		}
		if req.op != c.op || req.id != c.id || req.versionOK != c.versionOK || (c.versionOK && req.version != c.version) ||
			(req.payload != nil) != c.payload || req.payloadErr != c.payloadErr {
			t.Errorf("%s: got op %q id %q v %v/%d payload %v err %v", short, req.op, req.id, req.versionOK, req.version,
				req.payload != nil, req.payloadErr)
		}
	}
}
