//! File RPCs beyond read, write, list and stat (those are in `dataplane`):
//! mkdir, remove, rename, chmod/chown, SHA-256 and directories as tar,
//! each forwarded to the capsule's guest agent, whose own status (ENOENT,
//! EACCES, a refused tar entry) passes through with the capsule named.

use tonic::{Request, Response, Status, Streaming};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::guest::v1 as gpb;

use super::activity::keep_open;
use super::dataplane::{chunk_ok, client, first, forward, need_uid, stream_uid, to_status};
use super::{AgentService, BoxStream};

fn required<T>(field: Option<T>, rpc: &str) -> Result<T, Status> {
    field.ok_or_else(|| Status::invalid_argument(format!("{rpc}: request is required")))
}

pub(super) async fn make_dir(
    svc: &AgentService,
    req: Request<pb::MakeDirRequest>,
) -> Result<Response<gpb::FileInfo>, Status> {
    let req = req.into_inner();
    let inner = required(req.request, "MakeDir")?;
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .make_dir(inner)
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn remove(
    svc: &AgentService,
    req: Request<pb::RemoveRequest>,
) -> Result<Response<gpb::RemoveResponse>, Status> {
    let req = req.into_inner();
    let inner = required(req.request, "Remove")?;
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .remove(inner)
        .await
        .map(|()| Response::new(gpb::RemoveResponse {}))
        .map_err(to_status)
}

pub(super) async fn rename(
    svc: &AgentService,
    req: Request<pb::RenameRequest>,
) -> Result<Response<gpb::FileInfo>, Status> {
    let req = req.into_inner();
    let inner = required(req.request, "Rename")?;
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .rename(inner)
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn set_attr(
    svc: &AgentService,
    req: Request<pb::SetAttrRequest>,
) -> Result<Response<gpb::FileInfo>, Status> {
    let req = req.into_inner();
    let inner = required(req.request, "SetAttr")?;
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .set_attr(inner)
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn checksum(
    svc: &AgentService,
    req: Request<pb::PathRequest>,
) -> Result<Response<gpb::ChecksumResponse>, Status> {
    let req = req.into_inner();
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .checksum(&req.path)
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn read_tar(
    svc: &AgentService,
    req: Request<pb::PathRequest>,
) -> Result<Response<BoxStream<gpb::FileChunk>>, Status> {
    let req = req.into_inner();
    let ep = svc.guest_endpoint(need_uid(&req.uid)?).await?;
    let guest = client(&ep).await?;
    let out = guest.read_tar(&req.path).await.map_err(to_status)?;
    Ok(Response::new(keep_open(Box::pin(out), ep.open.clone())))
}

pub(super) async fn write_tar(
    svc: &AgentService,
    req: Request<Streaming<pb::WriteTarInput>>,
) -> Result<Response<gpb::WriteTarResponse>, Status> {
    let mut stream = req.into_inner();
    let head = first(&mut stream, "WriteTar").await?;
    let uid = stream_uid(&head.uid)?.to_string();
    let start = match head.input {
        Some(
            i @ gpb::WriteTarInput {
                input: Some(gpb::write_tar_input::Input::Start(_)),
            },
        ) => i,
        _ => {
            return Err(Status::invalid_argument(
                "WriteTar: the first message must carry WriteTarStart",
            ));
        }
    };
    // Held until the upload ended: it counts as activity all along.
    let ep = svc.guest_endpoint(&uid).await?;
    let guest = client(&ep).await?;
    let (err_tx, mut err_rx) = tokio::sync::oneshot::channel();
    let input = forward(
        stream,
        start,
        |m: &pb::WriteTarInput| match &m.input {
            Some(gpb::WriteTarInput {
                input: Some(gpb::write_tar_input::Input::Data(b)),
            }) => {
                chunk_ok(b.len(), "tar")?;
                Ok(m.input.clone())
            }
            Some(_) => Err(Status::invalid_argument(
                "WriteTar: WriteTarStart is only allowed in the first message",
            )),
            None => Ok(None),
        },
        err_tx,
    );
    let result = guest.write_tar(input).await;
    // A refused input ended the guest's stream early; the refusal is the
    // error the client needs.
    if let Ok(status) = err_rx.try_recv() {
        return Err(status);
    }
    result.map(Response::new).map_err(to_status)
}
