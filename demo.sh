#!/usr/bin/env bash
# The credproxy demo: a host keeps a token (with its refresh token) and an API
# key in its keyring store, and a program inside a bubblewrap sandbox, which
# has no network and cannot see the store, fetches the access token and the key
# through its session's socket, with the capability token credproxy run hands
# it on file descriptor 3. The refresh token never enters the sandbox, and the
# sandbox, granted read-only access, cannot change the host's token.
#
# Needs Go and bubblewrap (installed with apt-get when run as root on Debian or
# Ubuntu). Everything it creates lives in a temporary directory, removed at exit.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v bwrap >/dev/null 2>&1; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "demo: installing bubblewrap"
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
	else
		echo "demo: bubblewrap (bwrap) is needed; install it, e.g. sudo apt-get install bubblewrap" >&2
		exit 1
	fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
CGO_ENABLED=0 go -C cmd/credproxy build -o "$work/credproxy" .

# A private host store for the demo (the encrypted file backend), with
# obviously fake credentials. A real host would use its own, in ~/.config/credproxy.
export XDG_CONFIG_HOME="$work/config" CREDPROXY_KEYRING_PASSWORD=demo-password-not-a-secret
unset CREDPROXY_KEYRING_BACKEND LLXPRT_CREDENTIAL_SOCKET
store="$XDG_CONFIG_HOME/credproxy"
echo '{"access_token":"demo-access-token-0000","refresh_token":"demo-refresh-token-STAYS-ON-HOST","expiry":4102444800,"token_type":"Bearer"}' |
	"$work/credproxy" token set anthropic
printf 'sk-demo-not-a-real-key' | "$work/credproxy" key set openai
echo "host:    stored a token for anthropic (with a refresh token) and an API key in $store"

session="$work/session"
inside='
echo "sandbox: uid $(id -u), network interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" " ")"
if test -e "'"$store"'"; then echo "sandbox: can see the host store (unexpected)"; else echo "sandbox: cannot see the host store"; fi
echo "sandbox: its session directory holds: $(ls "'"$session"'")"
echo "sandbox: credproxy token get anthropic -> $(/credproxy token get anthropic)"
echo "sandbox: credproxy key get -raw openai -> $(/credproxy key get -raw openai)"
echo "sandbox: credproxy token set anthropic -> $(echo "{\"access_token\":\"planted\"}" | /credproxy token set anthropic 2>&1)"
'
echo "host:    credproxy run -allow-provider anthropic -allow-key openai -- bwrap --unshare-all ... (only /usr, the session directory and the credproxy binary inside, read-only)"
out=$("$work/credproxy" run -session-dir "$session" -allow-provider anthropic -allow-key openai -- \
	bwrap --unshare-all --die-with-parent --cap-drop ALL --ro-bind /usr /usr \
	--symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/bin /bin \
	--proc /proc --dev /dev --tmpfs /tmp \
	--ro-bind "$session" "$session" --ro-bind "$work/credproxy" /credproxy \
	-- /bin/sh -c "$inside")
echo "$out"

if grep -q STAYS-ON-HOST <<<"$out"; then
	echo "result:  FAILED: the refresh token reached the sandbox" >&2
	exit 1
fi
if ! grep -q 'demo-access-token-0000' <<<"$out"; then
	echo "result:  FAILED: the sandbox did not get the token" >&2
	exit 1
fi
after=$("$work/credproxy" token get -with-refresh-token anthropic)
if grep -q planted <<<"$after"; then
	echo "result:  FAILED: the sandbox changed the host's token" >&2
	exit 1
fi
echo "result:  the sandbox got the access token and the key, and could not change the token; the refresh token stayed on the host:"
echo "host:    $after"
