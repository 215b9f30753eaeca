// containerd's snapshotter conformance suite (snapshots/testsuite of containerd 1.6) run over
// gRPC through containerd's own proxy client (snapshots/proxy), against either
//
//	-backend=graphdriver  a `graphdriver snapshotter` process started per case, its store in the
//	                      case's fresh root (-command is the command line before "snapshotter")
//	-backend=overlay      containerd's overlayfs snapshotter in this process, served through
//	                      contrib/snapshotservice on a unix socket (proves the harness)
//
// Built offline in GOPATH mode from Debian's golang-github-containerd-containerd-dev
// (tests/snapshotter/test_conformance.py does it); needs root (the suite mounts).
package suite

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var (
	backend = flag.String("backend", "graphdriver", "graphdriver or overlay")
	command = flag.String("command", "graphdriver --driver overlay",
		"the graphdriver command line before 'snapshotter' (split on spaces)")
)

func TestSnapshotter(t *testing.T) {
	testsuite.SnapshotterSuite(t, *backend, newSnapshotter)
}

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "snapshotter.sock")
	var stop func() error
	switch *backend {
	case "graphdriver":
		args := append(strings.Fields(*command), "--root", filepath.Join(root, "store"),
			"--runroot", filepath.Join(root, "run"), "snapshotter", "--address", sock)
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Start(); err != nil {
			return nil, nil, err
		}
		stop = func() error {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				return err
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				<-done
				return fmt.Errorf("the snapshotter did not stop within 30s of SIGTERM")
			}
		}
	case "overlay":
		sn, err := overlay.NewSnapshotter(filepath.Join(root, "overlayfs"))
		if err != nil {
			return nil, nil, err
		}
		server := grpc.NewServer()
		snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
		l, err := net.Listen("unix", sock)
		if err != nil {
			return nil, nil, err
		}
		go func() { _ = server.Serve(l) }()
		stop = func() error {
			server.Stop()
			return sn.Close()
		}
	default:
		return nil, nil, fmt.Errorf("unknown backend %q", *backend)
	}
	if err := waitFor(sock, 60*time.Second); err != nil {
		_ = stop()
		return nil, nil, err
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), *backend)
	return sn, func() error {
		err := conn.Close()
		if serr := stop(); err == nil {
			err = serr
		}
		return err
	}, nil
}

func waitFor(sock string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("no server on %s after %s", sock, limit)
}
