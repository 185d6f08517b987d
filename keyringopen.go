package credproxy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/99designs/keyring"
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

	// MustExist makes OpenKeyringStore open only a file backend store that
	// exists (its directory holds the store's items), and otherwise fail
	// with an error matching [ErrNoStore], having created nothing and
	// asked for no password: so that a tool that only looks does not
	// create a store. Other backends ignore it.
	MustExist bool

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

// ErrNoStore means that [KeyringOptions.MustExist] was set and there is no
// store to open.
var ErrNoStore = errors.New("credproxy: no credential store")

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
	if opts.MustExist && backend == string(keyring.FileBackend) && !fileStoreExists(dir, opts.Keyring.ServiceName) {
		return nil, errorf("no credential store in %s yet: %w", dir, ErrNoStore)
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

// checkItem reads the store's check item, creating it first if it is
// absent, and checks its text.
func (s *KeyringStore) checkItem() error {
	ctx := context.Background()
	name := s.itemName(checkItemName)
	text, err := get(ctx, s, name, asSecret)
	if errors.Is(err, ErrNotFound) {
		item := keyring.Item{Key: name, Data: []byte(checkText), Label: "credproxy store check"}
		create := s.set
		if s.backend == string(keyring.FileBackend) {
			// Only if absent: another opener may be creating the store.
			create = func(_ context.Context, item keyring.Item) error { return s.createFile(item) }
		}
		if err := create(ctx, item); err != nil {
			return err
		}
		text, err = get(ctx, s, name, asSecret)
	}
	if err == nil && text != checkText {
		err = errors.New("the check item reads back wrong")
	}
	return err
}

// fileStoreExists reports whether dir holds any item of the file backend
// store of service ("" means "credproxy"): its check item, which a new
// store writes first, or any other.
func fileStoreExists(dir, service string) bool {
	if service == "" {
		service = "credproxy"
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return !errors.Is(err, fs.ErrNotExist) // unreadable: let the open say why
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), service+"+") {
			return true
		}
	}
	return false
}
