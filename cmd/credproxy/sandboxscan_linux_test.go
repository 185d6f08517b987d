package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// descendants returns the pids of pid's descendants, from /proc: for run,
// the sandbox launcher and everything in the sandbox.
func descendants(pid int) []int {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		_, rest, _ := strings.Cut(string(stat), ") ")
		if f := strings.Fields(rest); len(f) > 1 {
			ppid, _ := strconv.Atoi(f[1])
			children[ppid] = append(children[ppid], p)
		}
	}
	var out []int
	for queue := children[pid]; len(queue) > 0; queue = queue[1:] {
		out = append(out, queue[0])
		queue = append(queue, children[queue[0]]...)
	}
	return out
}

// scanProcess looks for each needle in pid's environment, command line
// and readable memory, and returns where it found them, by needle, and
// how many bytes of memory it read.
func scanProcess(pid int, needles []string) (map[string][]string, int64, error) {
	found := map[string][]string{}
	dir := "/proc/" + strconv.Itoa(pid)
	for _, name := range []string{"environ", "cmdline"} {
		data, err := os.ReadFile(dir + "/" + name)
		if err != nil {
			return nil, 0, err
		}
		for _, n := range needles {
			if bytes.Contains(data, []byte(n)) {
				found[n] = append(found[n], fmt.Sprintf("pid %d %s", pid, name))
			}
		}
	}
	maps, err := os.Open(dir + "/maps")
	if err != nil {
		return nil, 0, err
	}
	defer maps.Close()
	mem, err := os.Open(dir + "/mem")
	if err != nil {
		return nil, 0, err
	}
	defer mem.Close()
	var read int64
	lines := bufio.NewScanner(maps)
	for lines.Scan() {
		f := strings.Fields(lines.Text())
		if len(f) < 2 || f[1][0] != 'r' || strings.HasSuffix(lines.Text(), "[vvar]") {
			continue
		}
		lo, hi, _ := strings.Cut(f[0], "-")
		start, _ := strconv.ParseUint(lo, 16, 64)
		end, _ := strconv.ParseUint(hi, 16, 64)
		n, where := scanRegion(mem, int64(start), int64(end), needles)
		read += n
		for _, needle := range where {
			found[needle] = append(found[needle], fmt.Sprintf("pid %d memory %s %s", pid, f[0], strings.Join(f[5:], " ")))
		}
	}
	return found, read, lines.Err()
}

// scanRegion reads [start, end) of mem in chunks that overlap by the
// longest needle, and returns the bytes read and the needles found.
func scanRegion(mem *os.File, start, end int64, needles []string) (int64, []string) {
	overlap := 0
	for _, n := range needles {
		overlap = max(overlap, len(n))
	}
	buf := make([]byte, 1<<20)
	seen := map[string]bool{}
	var read int64
	for off := start; off < end; {
		size := min(int64(len(buf)), end-off)
		n, _ := mem.ReadAt(buf[:size], off)
		if n <= 0 {
			break // an unreadable page: the rest of the region is skipped
		}
		read += int64(n)
		for _, needle := range needles {
			if bytes.Contains(buf[:n], []byte(needle)) {
				seen[needle] = true
			}
		}
		if int64(n) < size || off+int64(n) >= end {
			break
		}
		off += int64(n - overlap)
	}
	var out []string
	for n := range seen {
		out = append(out, n)
	}
	return read, out
}

// scanFiles looks for each needle in every regular file under root (a
// sandbox's /proc/PID/root: its view of the file system), but in proc,
// sys, dev and usr (the host's own /usr, mounted read-only), and returns
// where it found them, by needle, and how many files it read.
func scanFiles(root string, needles []string) (map[string][]string, int, error) {
	found := map[string][]string{}
	files := 0
	// root is a symbolic link: the trailing slash has WalkDir follow it.
	err := filepath.WalkDir(root+"/", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if d.IsDir() && (rel == "proc" || rel == "sys" || rel == "dev" || rel == "usr") {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		for _, n := range needles {
			if bytes.Contains(data, []byte(n)) {
				found[n] = append(found[n], "/"+rel)
			}
		}
		return nil
	})
	return found, files, err
}
