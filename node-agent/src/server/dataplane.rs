//! Data-plane RPCs (exec, PTY, files): each resolves the capsule's guest
//! endpoint through the supervisor and forwards to the guest agent over
//! vsock (`crate::guest`). Until that lands they answer `UNIMPLEMENTED`.

use tonic::{Request, Response, Status, Streaming};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::guest::v1 as gpb;

use super::{AgentService, BoxStream, not_yet};

pub(super) async fn exec(
    svc: &AgentService,
    req: Request<Streaming<pb::ExecInput>>,
) -> Result<Response<BoxStream<gpb::ExecOutput>>, Status> {
    let _ = (svc, req);
    Err(not_yet("Exec"))
}

pub(super) async fn pty(
    svc: &AgentService,
    req: Request<Streaming<pb::PtyInput>>,
) -> Result<Response<BoxStream<gpb::PtyOutput>>, Status> {
    let _ = (svc, req);
    Err(not_yet("Pty"))
}

pub(super) async fn read_file(
    svc: &AgentService,
    req: Request<pb::ReadFileRequest>,
) -> Result<Response<BoxStream<gpb::FileChunk>>, Status> {
    let _ = (svc, req);
    Err(not_yet("ReadFile"))
}

pub(super) async fn write_file(
    svc: &AgentService,
    req: Request<Streaming<pb::WriteFileInput>>,
) -> Result<Response<gpb::FileInfo>, Status> {
    let _ = (svc, req);
    Err(not_yet("WriteFile"))
}

pub(super) async fn list_dir(
    svc: &AgentService,
    req: Request<pb::PathRequest>,
) -> Result<Response<gpb::ListDirResponse>, Status> {
    let _ = (svc, req);
    Err(not_yet("ListDir"))
}

pub(super) async fn stat(
    svc: &AgentService,
    req: Request<pb::PathRequest>,
) -> Result<Response<gpb::FileInfo>, Status> {
    let _ = (svc, req);
    Err(not_yet("Stat"))
}
