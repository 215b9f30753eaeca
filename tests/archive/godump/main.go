// godump reads each tar archive named on the command line with Go's archive/tar and prints, as
// one JSON document, what Go's reader sees: every header (byte strings in hex, times in
// nanoseconds, null for a zero time), each entry's content, and the error that ended the
// archive, if any.  The content is given as Go's reader writes it to a seekable file (its
// unexported writeTo, which seeks over the holes of a sparse file rather than reading gigabytes
// of zeros): the extents written, merged where they touch, and a SHA-256 of the bytes written.
// A name ending in ".bz2" is decompressed first, as reader_test.go does.  "-" reads stdin.
//
// It is a test oracle for graphdriver's tar reader (tests/archive/test_go_testdata.py).
package main

import (
	"archive/tar"
	"compress/bzip2"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"hash"
	"io"
	"os"
	"sort"
	"strings"
	"time"
	_ "unsafe" // go:linkname
)

// readerWriteTo is (*tar.Reader).writeTo: the content to an io.WriteSeeker, holes seeked over.
//
//go:linkname readerWriteTo archive/tar.(*Reader).writeTo
func readerWriteTo(tr *tar.Reader, w io.Writer) (int64, error)

// extents records where the bytes written land and hashes them; Seek only moves.
type extents struct {
	pos  int64
	runs [][2]int64
	sum  hash.Hash
}

func (x *extents) Write(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	n := len(x.runs)
	if n > 0 && x.runs[n-1][0]+x.runs[n-1][1] == x.pos {
		x.runs[n-1][1] += int64(len(b))
	} else {
		x.runs = append(x.runs, [2]int64{x.pos, int64(len(b))})
	}
	x.pos += int64(len(b))
	return x.sum.Write(b)
}

func (x *extents) Seek(off int64, whence int) (int64, error) {
	if whence != io.SeekCurrent {
		return 0, errors.New("extents: only relative seeks")
	}
	x.pos += off
	return x.pos, nil
}

type entry struct {
	Name     string      `json:"name"`
	Linkname string      `json:"linkname"`
	Typeflag int         `json:"typeflag"`
	Mode     int64       `json:"mode"`
	UID      int         `json:"uid"`
	GID      int         `json:"gid"`
	Uname    string      `json:"uname"`
	Gname    string      `json:"gname"`
	Size     int64       `json:"size"`
	Mtime    *int64      `json:"mtime"`
	Atime    *int64      `json:"atime"`
	Ctime    *int64      `json:"ctime"`
	Devmajor int64       `json:"devmajor"`
	Devminor int64       `json:"devminor"`
	PAX      [][2]string `json:"pax"`
	Extents  [][2]int64  `json:"extents"`
	Content  string      `json:"sha256"`
}

type result struct {
	File    string  `json:"file"`
	Entries []entry `json:"entries"`
	Error   *string `json:"error"`
}

func ns(t time.Time) *int64 {
	if t.IsZero() {
		return nil
	}
	v := t.UnixNano()
	return &v
}

func h(s string) string { return hex.EncodeToString([]byte(s)) }

func dump(name string) result {
	res := result{File: name, Entries: []entry{}}
	fail := func(err error) result {
		msg := err.Error()
		res.Error = &msg
		return res
	}
	var r io.Reader
	if name == "-" {
		r = os.Stdin
	} else {
		f, err := os.Open(name)
		if err != nil {
			return fail(err)
		}
		defer f.Close()
		r = f
	}
	if strings.HasSuffix(name, ".bz2") {
		r = bzip2.NewReader(r)
	}
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return res
		}
		if err != nil {
			return fail(err)
		}
		e := entry{
			Name: h(hdr.Name), Linkname: h(hdr.Linkname), Typeflag: int(hdr.Typeflag),
			Mode: hdr.Mode, UID: hdr.Uid, GID: hdr.Gid, Uname: h(hdr.Uname), Gname: h(hdr.Gname),
			Size: hdr.Size, Mtime: ns(hdr.ModTime), Atime: ns(hdr.AccessTime),
			Ctime: ns(hdr.ChangeTime), Devmajor: hdr.Devmajor, Devminor: hdr.Devminor,
			PAX: [][2]string{},
		}
		keys := make([]string, 0, len(hdr.PAXRecords))
		for k := range hdr.PAXRecords {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			e.PAX = append(e.PAX, [2]string{h(k), h(hdr.PAXRecords[k])})
		}
		x := &extents{sum: sha256.New(), runs: [][2]int64{}}
		if _, err := readerWriteTo(tr, x); err != nil {
			res.Entries = append(res.Entries, e)
			return fail(err)
		}
		e.Extents = x.runs
		e.Content = hex.EncodeToString(x.sum.Sum(nil))
		res.Entries = append(res.Entries, e)
	}
}

func main() {
	out := []result{}
	for _, name := range os.Args[1:] {
		out = append(out, dump(name))
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		os.Exit(1)
	}
}
