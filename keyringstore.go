package credproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/99designs/keyring"
	"golang.org/x/term"
)

// Environment variables read by [OpenKeyringStore] when the matching
// [KeyringOptions] field is zero.
const (
	// KeyringPasswordEnv holds the password of the encrypted file backend.
	// A host that reads it should not pass it on to sandboxed children.
	KeyringPasswordEnv = "CREDPROXY_KEYRING_PASSWORD"
	// KeyringBackendEnv names the keyring backend, as in
	// [KeyringOptions.Backend].
	KeyringBackendEnv = "CREDPROXY_KEYRING_BACKEND"
)

// KeyringOptions configures [OpenKeyringStore]. The zero value opens the
// encrypted file backend in [DefaultKeyringDir], with the password from
// [KeyringPasswordEnv] or, on a terminal, a prompt.
type KeyringOptions struct {
	// Backend chooses where the items live. "" means the value of
	// [KeyringBackendEnv], and "file" when that is unset too.
	//
	//   - "file": files encrypted with a password (JWE, PBES2 and
	//     AES-256-GCM) in Dir. Works on any machine, with no desktop.
	//   - "auto": the first of "keychain" (macOS), "wincred" (Windows) and
	//     "secret-service" (Linux, when a D-Bus session bus was reachable as
	//     the program started) that can store and read back an item; else
	//     "file".
	//   - "keychain", "wincred", "secret-service", "kwallet": the desktop
	//     keyrings. Secret Service uses the collection "login" unless
	//     Keyring.LibSecretCollectionName says otherwise; the collection
	//     must exist and be unlocked (gnome-keyring cannot create one
	//     without a graphical prompt).
	//   - "pass": the pass password manager, in Keyring.PassDir (default
	//     ~/.password-store), under a folder named after the service.
	//   - "keyctl": the Linux kernel keyring, scope Keyring.KeyCtlScope
	//     (default "user"). Items live in memory and are lost at reboot.
	Backend string

	// Dir is the store's directory: the file backend keeps its items
	// there, and every backend keeps its lock files there (see
	// [KeyringStore.LockToken]). It is created with mode 0700 and must
	// not be open to other users. "" means [DefaultKeyringDir].
	Dir string

	// Password returns the file backend's password. It is called at most
	// once, when the store opens. nil means the value of
	// [KeyringPasswordEnv], or a prompt on the terminal when standard input
	// is one; with neither, OpenKeyringStore fails.
	Password func() (string, error)

	// Keyring carries backend settings for github.com/99designs/keyring,
	// such as PassDir or LibSecretCollectionName. Its ServiceName ("" means
	// "credproxy") names the store: it is the first part of every item
	// name, so several stores can share one keyring. AllowedBackends,
	// FileDir and FilePasswordFunc are set by OpenKeyringStore.
	Keyring keyring.Config
}

// DefaultKeyringDir returns the store directory used when
// [KeyringOptions.Dir] is empty: "credproxy" in [os.UserConfigDir]
// (~/.config/credproxy on Linux).
func DefaultKeyringDir() (string, error) {
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", errorf("find the credential store directory: %w; set KeyringOptions.Dir", err)
	}
	return filepath.Join(dir, "credproxy"), nil
}

// KeyringStore is a [Store] on the host's keyring, through
// github.com/99designs/keyring. It is the store hosts use for real
// credentials; [OpenKeyringStore] opens one.
//
// Each token is one item named "<service>+token+<provider>+<bucket>" and
// each API key one item named "<service>+apikey+<name>", where service is
// "credproxy" unless [KeyringOptions.Keyring] names another. Names are
// checked against the protocol's rule (1 to 64 characters from
// [A-Za-z0-9._@-]) before they reach the keyring, so no name contains "+"
// or a path separator: no item can collide with another, and none can
// escape the store. Listing reads the backend's item names and ignores any
// that do not follow the scheme. A token is stored whole, as the JSON of
// [Token.Reveal]: refresh token and provider-specific members included.
//
// With the file backend, every write goes to a new file in a staging
// directory, is synced, and then renamed over the old item: a reader sees
// the old item or the new one, never a torn one, and a writer killed at
// any moment leaves one or the other. (The keyring library itself rewrites
// item files in place.) Other backends are as atomic as the service behind
// them.
//
// A KeyringStore is safe for concurrent use, by goroutines and by
// processes sharing its directory. The keyring library cannot interrupt a
// call to a backend: reads return early with ctx.Err() when ctx ends and
// leave the call to finish in the background, and writes, once started, run
// to completion. The zero KeyringStore is not usable.
type KeyringStore struct {
	ring     keyring.Keyring
	backend  string
	service  string
	dir      string
	password Secret        // file backend only; a Secret so that %v of the store hides it
	calls    chan struct{} // serialises calls to backends that are not safe for concurrent use; nil for file
}

var (
	_ Store       = (*KeyringStore)(nil)
	_ TokenLocker = (*KeyringStore)(nil)
)

// The keyring backends OpenKeyringStore knows, and the order "auto" tries
// the desktop ones in.
var (
	knownBackends = []keyring.BackendType{
		keyring.FileBackend, keyring.KeychainBackend, keyring.WinCredBackend, keyring.SecretServiceBackend,
		keyring.KWalletBackend, keyring.PassBackend, keyring.KeyCtlBackend,
	}
	autoBackends = []keyring.BackendType{keyring.KeychainBackend, keyring.WinCredBackend, keyring.SecretServiceBackend}
)

const (
	lockDirName    = ".locks"
	stagingDirName = ".staging"
	// The check item holds a fixed text. With the file backend it is
	// encrypted with the password, so a wrong password is caught when the
	// store opens, before it could write items the right password cannot
	// read; with a service it proves that items can be stored.
	checkItemName = "check"
	checkText     = "credproxy keyring store v1"
)

// OpenKeyringStore opens the store that opts describe, creating its
// directory if needed. With the file backend it checks the password
// against the store's check item (and creates that item in a new store), so
// a wrong password fails here with an error that says so.
func OpenKeyringStore(opts KeyringOptions) (*KeyringStore, error) {
	backend := opts.Backend
	if backend == "" {
		backend = os.Getenv(KeyringBackendEnv)
	}
	if backend == "" {
		backend = string(keyring.FileBackend)
	}
	if backend != "auto" && !slices.Contains(knownBackends, keyring.BackendType(backend)) {
		return nil, errorf("unknown keyring backend %q; use one of file, auto, keychain, wincred, secret-service, kwallet, pass, keyctl", backend)
	}

	dir := opts.Dir
	if dir == "" {
		var err error
		if dir, err = DefaultKeyringDir(); err != nil {
			return nil, err
		}
	}
	// The store's directory and those above it must be trusted, as the
	// socket's are: whoever could replace it could read what is saved.
	dir, err := ensurePrivateDir(dir, "credential store directory")
	if err != nil {
		return nil, err
	}
	if _, err := ensurePrivateDir(filepath.Join(dir, lockDirName), "credential store directory"); err != nil {
		return nil, err
	}

	cfg := opts.Keyring
	if cfg.ServiceName == "" {
		cfg.ServiceName = "credproxy"
	}
	if !validName(cfg.ServiceName) {
		return nil, errorf("keyring service name must match ^[A-Za-z0-9._@-]{1,64}$")
	}
	if cfg.LibSecretCollectionName == "" {
		cfg.LibSecretCollectionName = "login"
	}
	if cfg.KeyCtlScope == "" {
		cfg.KeyCtlScope = "user"
	}
	if cfg.PassPrefix == "" {
		cfg.PassPrefix = cfg.ServiceName
	}
	if cfg.KWalletAppID == "" {
		cfg.KWalletAppID = cfg.ServiceName
	}
	if cfg.KWalletFolder == "" {
		cfg.KWalletFolder = cfg.ServiceName
	}

	s := &KeyringStore{service: cfg.ServiceName, dir: dir}
	switch backend {
	case string(keyring.FileBackend):
		return s.openFile(opts.Password)
	case "auto":
		for _, b := range autoBackends {
			if s.openService(cfg, b) == nil {
				return s, nil
			}
		}
		return s.openFile(opts.Password)
	}
	if err := s.openService(cfg, keyring.BackendType(backend)); err != nil {
		return nil, err
	}
	return s, nil
}

// openService opens backend b, a keyring service, and checks that it can
// store and read back an item: a Secret Service collection that does not
// exist, or one that stays locked, fails here and not at the first save.
func (s *KeyringStore) openService(cfg keyring.Config, b keyring.BackendType) error {
	if !slices.Contains(keyring.AvailableBackends(), b) {
		hint := ""
		if b == keyring.SecretServiceBackend {
			hint = " (it needs a D-Bus session bus, found through DBUS_SESSION_BUS_ADDRESS, when the program starts)"
		}
		return errorf("keyring backend %s is not available in this program%s; available: %v", b, hint, keyring.AvailableBackends())
	}
	cfg.AllowedBackends = []keyring.BackendType{b}
	ring, err := keyring.Open(cfg)
	if err != nil {
		return errorf("open keyring backend %s: %w", b, err)
	}
	s.ring, s.backend, s.calls = ring, string(b), make(chan struct{}, 1)
	if err := s.checkItem(); err != nil {
		hint := ""
		if b == keyring.SecretServiceBackend {
			hint = fmt.Sprintf(" (the collection %q must exist and be unlocked)", cfg.LibSecretCollectionName)
		}
		return errorf("keyring backend %s cannot store items%s: %w", b, hint, err)
	}
	return nil
}

// openFile opens the file backend: it gets the password, checks it against
// the check item and clears staging left by killed writers.
func (s *KeyringStore) openFile(password func() (string, error)) (*KeyringStore, error) {
	s.backend, s.calls = string(keyring.FileBackend), nil
	staging := filepath.Join(s.dir, stagingDirName)
	if _, err := ensurePrivateDir(staging, "credential store directory"); err != nil {
		return nil, err
	}
	removeStaleStaging(staging)

	isNew := !fileExists(filepath.Join(s.dir, s.itemName(checkItemName)))
	if password == nil {
		password = func() (string, error) { return passwordFromEnvOrTerminal(s.dir, isNew) }
	}
	pw, err := password()
	if err != nil {
		return nil, err
	}
	if pw == "" {
		return nil, errorf("the credential store password is empty; set %s or type one at the prompt", KeyringPasswordEnv)
	}
	s.password = Secret(pw)
	s.ring = s.fileRing(s.dir)
	// The check item's read also makes the backend cache the password,
	// which it does on its first successful read, before concurrent calls
	// could race on it.
	if err := s.checkItem(); err != nil {
		return nil, errorf("the password does not open the credential store in %s: it was created with another one (set %s to that password)",
			s.dir, KeyringPasswordEnv)
	}
	return s, nil
}

// checkItem reads the store's check item, creating it first if it is
// absent, and checks its text.
func (s *KeyringStore) checkItem() error {
	ctx := context.Background()
	name := s.itemName(checkItemName)
	data, err := s.get(ctx, name)
	if errors.Is(err, ErrNotFound) {
		if err := s.set(ctx, keyring.Item{Key: name, Data: []byte(checkText), Label: "credproxy store check"}); err != nil {
			return err
		}
		data, err = s.get(ctx, name)
	}
	if err == nil && string(data) != checkText {
		err = errors.New("the check item reads back wrong")
	}
	return err
}

func (s *KeyringStore) fileRing(dir string) keyring.Keyring {
	ring, _ := keyring.Open(keyring.Config{
		AllowedBackends:  []keyring.BackendType{keyring.FileBackend},
		FileDir:          dir,
		FilePasswordFunc: keyring.FixedStringPrompt(string(s.password)),
	})
	return ring // the file backend's opener cannot fail
}

func fileExists(name string) bool {
	_, err := os.Lstat(name)
	return err == nil
}

// passwordFromEnvOrTerminal returns the password from KeyringPasswordEnv, or
// asks for it on the terminal, twice for a new store. The prompt goes to
// standard error, so that standard output stays clean for data.
func passwordFromEnvOrTerminal(dir string, isNew bool) (string, error) {
	if pw := os.Getenv(KeyringPasswordEnv); pw != "" {
		return pw, nil
	}
	fd := int(os.Stdin.Fd())
	if !term.IsTerminal(fd) {
		return "", errorf("the credential store in %s is encrypted with a password: set %s, or run on a terminal to be asked for it",
			dir, KeyringPasswordEnv)
	}
	ask := func(prompt string) (string, error) {
		fmt.Fprint(os.Stderr, prompt)
		b, err := term.ReadPassword(fd)
		fmt.Fprintln(os.Stderr)
		if err != nil {
			return "", errorf("read the password: %w", err)
		}
		return string(b), nil
	}
	if !isNew {
		return ask("Password for the credential store in " + dir + ": ")
	}
	pw, err := ask("New password for the credential store in " + dir + ": ")
	if err != nil {
		return "", err
	}
	again, err := ask("Repeat the password: ")
	if err != nil {
		return "", err
	}
	if again != pw {
		return "", errorf("the two passwords differ; nothing was created")
	}
	return pw, nil
}

// removeStaleStaging deletes what writers killed mid-write left in the
// staging directory. A write takes milliseconds, so anything a minute old
// belongs to no live writer; if it does (a writer stopped for that long),
// its rename fails and its save reports an error, leaving the old item.
func removeStaleStaging(staging string) {
	entries, _ := os.ReadDir(staging)
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Minute {
			os.RemoveAll(filepath.Join(staging, e.Name()))
		}
	}
}

// Backend returns the name of the keyring backend in use, such as "file".
func (s *KeyringStore) Backend() string { return s.backend }

// Dir returns the store's directory.
func (s *KeyringStore) Dir() string { return s.dir }

// String describes the store by backend and directory. It and GoString keep
// fmt from printing the store's fields, the file backend's password among
// them.
func (s *KeyringStore) String() string {
	return fmt.Sprintf("credproxy.KeyringStore(%s in %s)", s.backend, s.dir)
}

// GoString is String, for %#v.
func (s *KeyringStore) GoString() string { return s.String() }

// Format writes String, whatever the verb.
func (s *KeyringStore) Format(f fmt.State, _ rune) { io.WriteString(f, s.String()) }

// Close releases the store. It exists so that a KeyringStore and a
// [Client] can be closed alike (see [OpenStore]); the keyring library holds
// nothing that needs releasing, so it always returns nil.
func (s *KeyringStore) Close() error { return nil }

// Item names. Each part is a valid name, so "+" separates them unambiguously.
func (s *KeyringStore) itemName(parts ...string) string {
	return s.service + "+" + strings.Join(parts, "+")
}

func (s *KeyringStore) tokenItem(provider, bucket string) string {
	return s.itemName("token", provider, bucket)
}

func (s *KeyringStore) apiKeyItem(name string) string { return s.itemName("apikey", name) }

// GetToken returns the token of provider and bucket.
func (s *KeyringStore) GetToken(ctx context.Context, provider, bucket string) (Token, error) {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return Token{}, err
	}
	data, err := s.get(ctx, s.tokenItem(provider, bucket))
	if errors.Is(err, ErrNotFound) {
		return Token{}, errorf("no token for provider %s bucket %s: %w", provider, bucket, ErrNotFound)
	}
	if err != nil {
		return Token{}, errorf("read token for provider %s bucket %s: %w", provider, bucket, err)
	}
	tok, err := parseTokenAsIs(data)
	if err != nil {
		return Token{}, errorf("stored token for provider %s bucket %s is damaged: %w", provider, bucket, err)
	}
	return tok, nil
}

// SaveToken stores token whole for provider and bucket, replacing any other.
func (s *KeyringStore) SaveToken(ctx context.Context, provider, bucket string, token Token) error {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return err
	}
	if _, ok := token.lookup(fieldAccessToken); !ok {
		return errorf("token has no access_token: %w", ErrInvalidRequest)
	}
	err := s.set(ctx, keyring.Item{
		Key:   s.tokenItem(provider, bucket),
		Data:  token.Reveal(),
		Label: fmt.Sprintf("credproxy token %s/%s", provider, bucket),
	})
	if err != nil {
		return errorf("save token for provider %s bucket %s: %w", provider, bucket, err)
	}
	return nil
}

// RemoveToken deletes the token of provider and bucket, if there is one.
func (s *KeyringStore) RemoveToken(ctx context.Context, provider, bucket string) error {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return err
	}
	if err := s.remove(ctx, s.tokenItem(provider, bucket)); err != nil {
		return errorf("remove token for provider %s bucket %s: %w", provider, bucket, err)
	}
	return nil
}

// ListProviders returns the providers that have at least one token, sorted.
func (s *KeyringStore) ListProviders(ctx context.Context) ([]string, error) {
	return s.list(ctx, func(parts []string) (string, bool) {
		if len(parts) != 3 || parts[0] != "token" {
			return "", false
		}
		return parts[1], true
	})
}

// ListBuckets returns the buckets of provider that hold a token, sorted.
func (s *KeyringStore) ListBuckets(ctx context.Context, provider string) ([]string, error) {
	if err := begin(ctx, provider); err != nil {
		return nil, err
	}
	return s.list(ctx, func(parts []string) (string, bool) {
		if len(parts) != 3 || parts[0] != "token" || parts[1] != provider {
			return "", false
		}
		return parts[2], true
	})
}

// GetAPIKey returns the API key called name.
func (s *KeyringStore) GetAPIKey(ctx context.Context, name string) (Secret, error) {
	if err := begin(ctx, name); err != nil {
		return "", err
	}
	data, err := s.get(ctx, s.apiKeyItem(name))
	if errors.Is(err, ErrNotFound) {
		return "", errorf("no API key %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return "", errorf("read API key %s: %w", name, err)
	}
	return Secret(data), nil
}

// SaveAPIKey stores key under name, replacing any other.
func (s *KeyringStore) SaveAPIKey(ctx context.Context, name string, key Secret) error {
	if err := begin(ctx, name); err != nil {
		return err
	}
	if key == "" {
		return errorf("API key %s is empty: %w", name, ErrInvalidRequest)
	}
	err := s.set(ctx, keyring.Item{Key: s.apiKeyItem(name), Data: []byte(key), Label: "credproxy API key " + name})
	if err != nil {
		return errorf("save API key %s: %w", name, err)
	}
	return nil
}

// RemoveAPIKey deletes the API key called name, if there is one.
func (s *KeyringStore) RemoveAPIKey(ctx context.Context, name string) error {
	if err := begin(ctx, name); err != nil {
		return err
	}
	if err := s.remove(ctx, s.apiKeyItem(name)); err != nil {
		return errorf("remove API key %s: %w", name, err)
	}
	return nil
}

// ListAPIKeys returns the names of the stored API keys, sorted.
func (s *KeyringStore) ListAPIKeys(ctx context.Context) ([]string, error) {
	return s.list(ctx, func(parts []string) (string, bool) {
		if len(parts) != 2 || parts[0] != "apikey" {
			return "", false
		}
		return parts[1], true
	})
}

// LockToken takes the cross-process lock of provider and bucket: an
// advisory flock(2) on a file in the store's directory, so it works with
// every backend, between processes that share the directory. The kernel
// releases it when the holder exits, however it exits. Waiting for it
// ends with ctx, with an error that wraps ctx.Err(). On systems without
// flock (Windows) it is held within the process only.
func (s *KeyringStore) LockToken(ctx context.Context, provider, bucket string) (unlock func(), err error) {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return nil, err
	}
	path := filepath.Join(s.dir, lockDirName, s.service+"+"+provider+"+"+bucket)
	unlock, err = lockFile(ctx, path)
	if err != nil {
		if ctx.Err() != nil {
			return nil, errorf("token of provider %s bucket %s is locked by another process or request; gave up waiting: %w", provider, bucket, err)
		}
		return nil, errorf("lock token of provider %s bucket %s: %w", provider, bucket, err)
	}
	return unlock, nil
}

// list returns the sorted, distinct names that keep picks from the parts
// of this store's item names.
func (s *KeyringStore) list(ctx context.Context, keep func(parts []string) (string, bool)) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	items, err := read(ctx, s, s.keys)
	if err != nil {
		return nil, errorf("list the keyring: %w", err)
	}
	var names []string
	prefix := s.service + "+"
	for _, item := range items {
		rest, ok := strings.CutPrefix(item, prefix)
		if !ok {
			continue
		}
		parts := strings.Split(rest, "+")
		if !slices.ContainsFunc(parts, func(p string) bool { return !validName(p) }) {
			if name, ok := keep(parts); ok {
				names = append(names, name)
			}
		}
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// keys lists item names. The file backend's own listing drops directory
// read errors and lists directories, so the store reads the directory
// itself.
func (s *KeyringStore) keys(ring keyring.Keyring) ([]string, error) {
	if s.backend != string(keyring.FileBackend) {
		return ring.Keys()
	}
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.Type().IsRegular() {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// get returns the data of item, or an error wrapping ErrNotFound.
func (s *KeyringStore) get(ctx context.Context, item string) ([]byte, error) {
	data, err := read(ctx, s, func(ring keyring.Keyring) ([]byte, error) {
		it, err := ring.Get(item)
		return it.Data, err
	})
	switch {
	case errors.Is(err, keyring.ErrKeyNotFound):
		return nil, ErrNotFound
	case err != nil && s.backend == string(keyring.FileBackend) && ctx.Err() == nil:
		// The file backend's decryption errors say nothing useful to a user.
		return nil, errors.New("the item cannot be decrypted: it was written with another password or is damaged")
	}
	return data, err
}

// set writes item. The file backend writes through staging (see writeFile).
func (s *KeyringStore) set(ctx context.Context, item keyring.Item) error {
	if s.backend == string(keyring.FileBackend) {
		if err := ctx.Err(); err != nil {
			return err
		}
		return s.writeFile(item)
	}
	return s.write(ctx, func(ring keyring.Keyring) error { return ring.Set(item) })
}

// remove deletes item; an absent item is not an error. Backends disagree on
// what removing an absent item returns (the file backend: the raw
// os.Remove error; pass: a failed command), so on an error the store asks
// whether the item is still there.
func (s *KeyringStore) remove(ctx context.Context, item string) error {
	err := s.write(ctx, func(ring keyring.Keyring) error { return ring.Remove(item) })
	if err == nil || errors.Is(err, keyring.ErrKeyNotFound) || errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if _, getErr := s.get(ctx, item); errors.Is(getErr, ErrNotFound) {
		return nil
	}
	return err
}

// read runs fn on the backend and returns its result, or ctx.Err() as soon
// as ctx ends, leaving fn to finish in the background: the keyring library
// cannot stop a call, and a read left running changes nothing.
func read[T any](ctx context.Context, s *KeyringStore, fn func(keyring.Keyring) (T, error)) (T, error) {
	var zero T
	if err := s.acquire(ctx); err != nil {
		return zero, err
	}
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer s.release()
		v, err := fn(s.ring)
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}

// write runs fn on the backend to completion. Returning early would let
// the caller release its lock on the item while the write still runs.
func (s *KeyringStore) write(ctx context.Context, fn func(keyring.Keyring) error) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	defer s.release()
	return fn(s.ring)
}

// acquire waits for the turn to call a backend that is not safe for
// concurrent use (all but the file backend), or for ctx to end.
func (s *KeyringStore) acquire(ctx context.Context) error {
	if s.calls == nil {
		return ctx.Err()
	}
	select {
	case s.calls <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *KeyringStore) release() {
	if s.calls != nil {
		<-s.calls
	}
}

// writeFile writes item with the file backend atomically. The backend
// writes a file in place (truncate, then write), which a killed writer or a
// concurrent reader can see half done; so the item is written by a backend
// rooted in a fresh staging directory, synced, and renamed into the store.
// The staging backend names the file exactly as the store's backend will
// look for it, so no knowledge of its naming scheme is needed.
func (s *KeyringStore) writeFile(item keyring.Item) error {
	tmp, err := os.MkdirTemp(filepath.Join(s.dir, stagingDirName), "w")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := s.fileRing(tmp).Set(item); err != nil {
		return err
	}
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return err
	}
	if len(entries) != 1 {
		return fmt.Errorf("staging directory %s holds %d files, want 1", tmp, len(entries))
	}
	name := entries[0].Name()
	if err := syncPath(filepath.Join(tmp, name)); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(tmp, name), filepath.Join(s.dir, name)); err != nil {
		return err
	}
	// The rename is durable once the directory is synced.
	if err := syncPath(s.dir); err != nil && runtime.GOOS != "windows" {
		return err
	}
	return nil
}

func syncPath(name string) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// TokenLocker is implemented by a [Store] that can serialise work on one
// token across processes. The server takes the lock, after its own
// in-process one, around the read-merge-write of save_token and around
// remove_token, so two hosts serving one store never interleave them.
// [KeyringStore] implements it.
//
// LockToken blocks until it holds the lock of provider and bucket ("" for
// [DefaultBucket]) or ctx ends; then it returns an error wrapping
// ctx.Err(). The lock must be released when its holder dies, and unlock
// must be safe to call more than once.
type TokenLocker interface {
	LockToken(ctx context.Context, provider, bucket string) (unlock func(), err error)
}
