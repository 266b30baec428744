//! `uc exec`: the local API picks a container of the service and opens the peer API's `Exec`
//! on the machine that runs it (this one too, the same way); that machine's runtime runs the
//! command. Both ends are streams: input (start, stdin, its end, terminal sizes) one way,
//! output (stdout, stderr, the exit code) the other.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use uc_crdt::{Container, DesiredState};
use uc_proto::v1::{ExecInput, ExecOutput, ExecStart, exec_input, exec_output};
use uc_proto::{ContainerId, MachineId};
use uc_workload::exec as wx;

use crate::node::Node;

pub type OutputStream = Pin<Box<dyn Stream<Item = Result<ExecOutput, Status>> + Send>>;

/// The container `uc exec` runs in: the one whose id starts with `prefix` if given, else a
/// running one on this machine, else the first running one (oldest first).
pub fn pick_container(
    service: &str,
    mut containers: Vec<Container>,
    me: &MachineId,
    prefix: &str,
) -> Result<Container, String> {
    containers.sort_by_key(|c| (c.created_at_ms, c.id.clone()));
    if !prefix.is_empty() {
        let hits: Vec<_> = containers
            .into_iter()
            .filter(|c| c.id.as_str().starts_with(prefix))
            .collect();
        return match hits.len() {
            1 => Ok(hits.into_iter().next().expect("one")),
            0 => Err(format!("service {service:?} has no container {prefix:?}")),
            n => Err(format!(
                "{n} containers of {service:?} start with {prefix:?}: give more digits"
            )),
        };
    }
    let running: Vec<_> = containers
        .into_iter()
        .filter(|c| c.desired == DesiredState::Running)
        .collect();
    running
        .iter()
        .find(|c| &c.machine == me)
        .or(running.first())
        .cloned()
        .ok_or_else(|| format!("service {service:?} has no running container"))
}

/// The first message of an exec stream: its start.
async fn start_of(inbound: &mut Streaming<ExecInput>) -> Result<ExecStart, Status> {
    match inbound.message().await? {
        Some(ExecInput {
            msg: Some(exec_input::Msg::Start(s)),
        }) => Ok(s),
        _ => Err(Status::invalid_argument(
            "an exec stream starts with its start message",
        )),
    }
}

/// The local API's `Exec`: resolves the service to a container and relays both streams to
/// and from the peer API of its machine.
pub async fn api_exec(
    node: &Node,
    mut inbound: Streaming<ExecInput>,
) -> Result<OutputStream, Status> {
    let mut start = start_of(&mut inbound).await?;
    if start.argv.is_empty() {
        return Err(Status::invalid_argument("no command to run"));
    }
    let (_, containers) = crate::services::service_and_containers(node, &start.service)?;
    let c = pick_container(
        &start.service,
        containers,
        &node.machine_id,
        &start.container_id,
    )
    .map_err(Status::failed_precondition)?;
    start.container_id = c.id.to_string();
    let addr = crate::services::peer_addr(node, &c.machine)?;
    let mut client = crate::peer::client(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel::<ExecInput>(64);
    tx.send(ExecInput {
        msg: Some(exec_input::Msg::Start(start)),
    })
    .await
    .map_err(|_| Status::internal("exec relay closed"))?;
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let out = client.exec(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Box::pin(out))
}

/// The peer API's `Exec`: runs the command in one of this machine's containers.
pub async fn peer_exec(
    node: &Node,
    mut inbound: Streaming<ExecInput>,
) -> Result<OutputStream, Status> {
    let start = start_of(&mut inbound).await?;
    let id: ContainerId = start
        .container_id
        .parse()
        .map_err(|e: uc_proto::IdError| Status::invalid_argument(e.to_string()))?;
    let size = start.size.unwrap_or_default();
    let req = wx::ExecRequest {
        argv: start.argv,
        tty: start.tty,
        rows: size.rows.min(u16::MAX.into()) as u16,
        cols: size.cols.min(u16::MAX.into()) as u16,
        env: start.env,
    };
    let w = node.workloads()?;
    let wx::Exec {
        input, mut output, ..
    } = w.exec(&id, req).await?;
    tracing::info!(container = %id.short(), "exec started");
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            let i = match m.msg {
                Some(exec_input::Msg::Stdin(b)) => wx::ExecInput::Stdin(b),
                Some(exec_input::Msg::StdinEof(_)) => wx::ExecInput::Eof,
                Some(exec_input::Msg::Resize(t)) => wx::ExecInput::Resize {
                    rows: t.rows.min(u16::MAX.into()) as u16,
                    cols: t.cols.min(u16::MAX.into()) as u16,
                },
                Some(exec_input::Msg::Start(_)) | None => continue,
            };
            if input.send(i).await.is_err() {
                return;
            }
        }
        // The asker is gone or sent all it had: the command's stdin ends with this.
    });
    let (tx, rx) = mpsc::channel::<Result<ExecOutput, Status>>(64);
    tokio::spawn(async move {
        while let Some(o) = output.recv().await {
            let (msg, last) = match o {
                wx::ExecOutput::Stdout(b) => (exec_output::Msg::Stdout(b), false),
                wx::ExecOutput::Stderr(b) => (exec_output::Msg::Stderr(b), false),
                wx::ExecOutput::Exit(c) => (exec_output::Msg::ExitCode(c), true),
            };
            // The exit code ends the session, even if a background process still writes.
            if tx.send(Ok(ExecOutput { msg: Some(msg) })).await.is_err() || last {
                return;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uc_proto::ServiceId;

    fn c(n: u8, machine: u8, desired: DesiredState, at: u64) -> Container {
        Container {
            id: ContainerId::from_bytes([n; 16]),
            service: ServiceId::from_bytes([1; 16]),
            machine: MachineId::from_bytes([machine; 16]),
            address: None,
            desired,
            created_at_ms: at,
        }
    }

    #[test]
    fn exec_prefers_a_running_container_here_then_the_oldest_running_one() {
        let me = MachineId::from_bytes([9; 16]);
        let all = vec![
            c(1, 1, DesiredState::Running, 10),
            c(2, 9, DesiredState::Stopped, 5),
            c(3, 9, DesiredState::Running, 20),
            c(4, 2, DesiredState::Running, 1),
        ];
        assert_eq!(
            pick_container("web", all.clone(), &me, "").unwrap().id,
            all[2].id
        );
        let elsewhere = MachineId::from_bytes([7; 16]);
        assert_eq!(
            pick_container("web", all.clone(), &elsewhere, "")
                .unwrap()
                .id,
            all[3].id
        );
        // A prefix picks that one, whatever its state; an ambiguous or unknown one is an error.
        assert_eq!(
            pick_container("web", all.clone(), &me, "0202").unwrap().id,
            all[1].id
        );
        let many = pick_container("web", all.clone(), &me, "0").unwrap_err();
        assert!(many.contains("4 containers"), "{many}");
        let none = pick_container("web", all.clone(), &me, "ff").unwrap_err();
        assert!(none.contains("no container \"ff\""), "{none}");
        let stopped = vec![c(2, 9, DesiredState::Stopped, 5)];
        let e = pick_container("web", stopped, &me, "").unwrap_err();
        assert!(e.contains("no running container"), "{e}");
    }
}
