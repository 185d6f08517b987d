package credproxy

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/99designs/keyring"
	jose "github.com/dvsekhvalnov/jose2go"
	"golang.org/x/term"
)

// openFile opens the file backend: it gets the password, checks it against
// the check item and clears staging left by killed writers.
func (s *KeyringStore) openFile(password func() (string, error)) (*KeyringStore, error) {
	s.backend, s.calls, s.cache = string(keyring.FileBackend), nil, new(itemCache)
	staging := filepath.Join(s.dir, stagingDirName)
	if _, err := ensurePrivateDir(staging, "credential store directory"); err != nil {
		return nil, err
	}
	removeStaleStaging(staging)

	// A store is new when it holds no item at all; one that lost its check
	// item is not, and its password must open the items it holds.
	isNew := !fileStoreExists(s.dir, s.service)
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
	if !isNew && !fileExists(s.itemPath(s.itemName(checkItemName))) && !s.opensAnItem() {
		return nil, errorf("the password does not open the credential store in %s: it was created with another one (set %s to that password)",
			s.dir, KeyringPasswordEnv)
	}
	// The check item's read also makes the backend cache the password,
	// which it does on its first successful read, before concurrent calls
	// could race on it.
	if err := s.checkItem(); err != nil {
		return nil, errorf("the password does not open the credential store in %s: it was created with another one (set %s to that password)",
			s.dir, KeyringPasswordEnv)
	}
	return s, nil
}

// opensAnItem reports whether the password opens an item of the store,
// before checkItem writes a missing check item with it: a store that lost
// its check item must not adopt a mistyped password, which would then be
// the one it asks for. A store with no readable item to try has nothing to
// protect.
func (s *KeyringStore) opensAnItem() bool {
	entries, _ := os.ReadDir(s.dir)
	for _, e := range entries {
		name := e.Name()
		if !e.Type().IsRegular() || !strings.HasPrefix(name, s.service+"+") {
			continue
		}
		data, err := os.ReadFile(s.itemPath(name))
		if err != nil || len(data) > maxItemFile {
			continue
		}
		_, err = s.unseal(name, data)
		return err == nil
	}
	return true
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
	// The terminal, not stdin: stdin may carry the secret being stored.
	fd, out := -1, io.Writer(os.Stderr)
	if tty, err := openTerminal(); err == nil {
		defer tty.Close()
		if term.IsTerminal(int(tty.Fd())) {
			fd, out = int(tty.Fd()), tty
		}
	}
	if fd < 0 && term.IsTerminal(int(os.Stdin.Fd())) {
		fd = int(os.Stdin.Fd())
	}
	if fd < 0 {
		return "", errorf("the credential store in %s is encrypted with a password: set %s, or run on a terminal to be asked for it",
			dir, KeyringPasswordEnv)
	}
	ask := func(prompt string) (string, error) {
		fmt.Fprint(out, prompt)
		b, err := term.ReadPassword(fd)
		fmt.Fprintln(out)
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

// writeFile writes item with the file backend atomically. The backend
// writes a file in place (truncate, then write), which a killed writer or a
// concurrent reader can see half done; so the item is written by a backend
// rooted in a fresh staging directory, synced, and renamed into the store.
// The staging backend names the file exactly as the store's backend will
// look for it, so no knowledge of its naming scheme is needed.
func (s *KeyringStore) writeFile(item keyring.Item) error { return s.placeFile(item, os.Rename) }

// createFile is writeFile for an item that must not exist yet, the check
// item of a new store: it links the staged file into place, which fails
// if another opener got there first, and then leaves that one's item in
// place, for the caller to read back with its own password. So two
// processes that create a store at the same moment with different
// passwords cannot both succeed.
func (s *KeyringStore) createFile(item keyring.Item) error {
	return s.placeFile(item, func(staged, dst string) error {
		if err := os.Link(staged, dst); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		return nil
	})
}

// placeFile writes item to a staging directory and puts it in place with
// place (rename or link).
func (s *KeyringStore) placeFile(item keyring.Item, place func(staged, dst string) error) error {
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
	if err := place(filepath.Join(tmp, name), filepath.Join(s.dir, name)); err != nil {
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

// itemPath returns the file of item. The keyring library names it by
// percent-encoding "%" and "/" in the item's name, which no item name of
// the store holds.
func (s *KeyringStore) itemPath(item string) string { return filepath.Join(s.dir, item) }

// unseal decrypts the content of an item file and returns the item's data,
// as the keyring library's file backend does in Get: a JWE whose payload is
// the JSON of a keyring.Item. It costs milliseconds of CPU, nearly all of
// it the key derivation (PBES2, 8192 rounds of HMAC-SHA256).
func (s *KeyringStore) unseal(name string, sealed []byte) ([]byte, error) {
	s.unseals.Add(1)
	payload, _, err := jose.DecodeBytes(string(sealed), string(s.password))
	if err != nil {
		return nil, err
	}
	var item keyring.Item
	if err := json.Unmarshal(payload, &item); err != nil {
		return nil, err
	}
	if item.Key != name {
		// Another item's file copied or linked into this one's place.
		return nil, errors.New("the item file holds another item")
	}
	return item.Data, nil
}
