package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// connErrWait bounds connectionError's question, which Open asks after
// its DialTimeout: long enough for an answer the connection already has,
// short enough not to stretch the timeout noticeably.
const connErrWait = 200 * time.Millisecond

// explainTimeout returns err, Open's first contact timing out, with the
// reason its connections to the cluster failed, if they have one: a
// refused connection, or a TLS failure such as a server certificate signed
// by a CA the client does not trust or a client certificate the cluster
// requires and did not get. The etcd client reports such a timeout as the
// bare context error, which reads the same as a cluster that does not
// answer; the reason is asked for with one request that fails fast instead
// of waiting for a connection. Transport errors hold no credentials.
func explainTimeout(ctx context.Context, cli *clientv3.Client, err error) error {
	if !errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
		return err
	}
	qctx, cancel := context.WithTimeout(ctx, connErrWait)
	defer cancel()
	_, qerr := pb.NewMaintenanceClient(cli.ActiveConnection()).Status(qctx, &pb.StatusRequest{}, grpc.WaitForReady(false))
	if st, ok := status.FromError(qerr); ok && st.Code() == codes.Unavailable {
		// The message, not the status: callers match the context error,
		// which stays wrapped, never a gRPC status.
		return fmt.Errorf("%w; the connections failed: %s", err, st.Message())
	}
	return err
}
