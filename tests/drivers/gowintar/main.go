// gowintar writes a Windows layer tar the way go-winio's backuptar (BasicInfoHeader,
// WriteTarFileFromBackupStream) and hcsshim's ociwclayer exporter build their headers, with Go's
// archive/tar, from a JSON list of entries on stdin.  It is the reference the tests compare
// graphdriver's plain diff with; written for the tests, from reading those sources.
package main

import (
	"archive/tar"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

type entry struct {
	Name       string      `json:"name"`
	Attrs      uint32      `json:"attrs"`
	Mtime      int64       `json:"mtime"`
	Atime      int64       `json:"atime"`
	Ctime      int64       `json:"ctime"`
	Create     int64       `json:"create"`
	SD         *string     `json:"sd"`
	EAs        [][2]string `json:"eas"`
	Data       *string     `json:"data"`
	Streams    [][2]string `json:"streams"`
	Link       string      `json:"link"`
	Symlink    string      `json:"symlink"`
	Mountpoint bool        `json:"mountpoint"`
	Whiteout   bool        `json:"whiteout"`
}

// paxTime: a time as "sec[.frac]" with trailing zeros cut (go-winio's formatPAXTime).
func paxTime(ts time.Time) string {
	secs, nsecs := ts.Unix(), ts.Nanosecond()
	if nsecs == 0 {
		return strconv.FormatInt(secs, 10)
	}
	sign := ""
	if secs < 0 {
		sign = "-"
		secs = -(secs + 1)
		nsecs = -(nsecs - 1e9)
	}
	return strings.TrimRight(fmt.Sprintf("%s%d.%09d", sign, secs, nsecs), "0")
}

func basicHeader(e *entry) *tar.Header {
	hdr := &tar.Header{
		Format:     tar.FormatPAX,
		Name:       e.Name,
		Typeflag:   tar.TypeReg,
		ModTime:    time.Unix(0, e.Mtime),
		ChangeTime: time.Unix(0, e.Ctime),
		AccessTime: time.Unix(0, e.Atime),
		PAXRecords: map[string]string{},
	}
	hdr.PAXRecords["MSWINDOWS.fileattr"] = strconv.FormatUint(uint64(e.Attrs), 10)
	hdr.PAXRecords["LIBARCHIVE.creationtime"] = paxTime(time.Unix(0, e.Create))
	if e.Attrs&0x10 != 0 {
		hdr.Mode |= 0o40000
		hdr.Typeflag = tar.TypeDir
	}
	return hdr
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func decode(s string) []byte {
	b, err := base64.StdEncoding.DecodeString(s)
	must(err)
	return b
}

func main() {
	var entries []entry
	must(json.NewDecoder(os.Stdin).Decode(&entries))
	tw := tar.NewWriter(os.Stdout)
	for i := range entries {
		e := &entries[i]
		if e.Whiteout { // hcsshim: a bare header named DIR/.wh.BASE
			must(tw.WriteHeader(&tar.Header{Name: e.Name}))
			continue
		}
		hdr := basicHeader(e)
		if e.Link != "" { // hcsshim: a second name of a file
			hdr.Mode = 0o644
			hdr.Typeflag = tar.TypeLink
			hdr.Linkname = e.Link
			must(tw.WriteHeader(hdr))
			continue
		}
		var data []byte
		if e.Data != nil {
			hdr.Mode |= 0o100000 // a data stream was there
			data = decode(*e.Data)
		}
		if e.SD != nil {
			hdr.PAXRecords["MSWINDOWS.rawsd"] = *e.SD
		}
		if e.Symlink != "" {
			hdr.Mode |= 0o120000
			hdr.Typeflag = tar.TypeSymlink
			if e.Mountpoint {
				hdr.PAXRecords["MSWINDOWS.mountpoint"] = "1"
			}
			hdr.Linkname = e.Symlink
		}
		for _, ea := range e.EAs {
			hdr.PAXRecords["MSWINDOWS.xattr."+ea[0]] = ea[1]
		}
		if hdr.Typeflag == tar.TypeReg {
			hdr.Size = int64(len(data))
		}
		must(tw.WriteHeader(hdr))
		if hdr.Typeflag == tar.TypeReg {
			_, err := tw.Write(data)
			must(err)
		}
		for _, s := range e.Streams {
			body := decode(s[1])
			must(tw.WriteHeader(&tar.Header{
				Format: hdr.Format, Name: e.Name + ":" + s[0], Mode: hdr.Mode,
				Typeflag: tar.TypeReg, Size: int64(len(body)), ModTime: hdr.ModTime,
				AccessTime: hdr.AccessTime, ChangeTime: hdr.ChangeTime,
			}))
			_, err := tw.Write(body)
			must(err)
		}
	}
	must(tw.Close())
}
