//! Component tests of the agent's peer API on real loopback sockets: sync
//! sessions between two replicas, garbage handling, and join tokens.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use uc_agent::config::Args;
use uc_agent::node::Node;
use uc_agent::peer::{self, JoinService, PeerService};
use uc_agent::store::Store;
use uc_crdt::{ClusterState, NewMachine};
use uc_proto::v1::join_server::JoinServer;
use uc_proto::v1::peer_server::PeerServer;
use uc_proto::v1::{JoinRequest, SyncFrame};
use uc_proto::{MachineId, ServiceId};

struct TestNode {
    node: Arc<Node>,
    _dir: tempfile::TempDir,
}

fn node_from(doc: Option<Vec<u8>>, name: &str, id_byte: u8) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let config = Args::try_parse_from([
        "ucd",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--name",
        name,
        "--advertise-addr",
        "127.0.0.1",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let id = MachineId::from_bytes([id_byte; 16]);
    let mut doc = match doc {
        Some(bytes) => ClusterState::load(&bytes, [id_byte; 16]).unwrap(),
        None => {
            let mut d = ClusterState::new_cluster(
                "cluster-1",
                "10.210.0.0/16".parse().unwrap(),
                [id_byte; 16],
                1,
            )
            .unwrap();
            d.add_machine(
                NewMachine {
                    id: id.clone(),
                    name: name.into(),
                    public_key: String::new(),
                    endpoints: vec!["127.0.0.1".into()],
                    tags: Default::default(),
                },
                1,
            )
            .unwrap();
            d
        }
    };
    let store = Store::create(&config.state_path(), &mut doc).unwrap();
    TestNode {
        node: Arc::new(Node::new(config, id, doc, store, true)),
        _dir: dir,
    }
}

async fn serve(node: Arc<Node>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tracker = tokio_util::task::TaskTracker::new();
    let incoming = peer::screened_incoming(listener, node.clone(), &tracker, Default::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerServer::new(PeerService { node: node.clone() }))
            .add_service(JoinServer::new(JoinService { node }))
            .serve_with_incoming(incoming),
    );
    addr
}

fn frame(node: &Node, cluster: Option<&str>, message: &[u8]) -> SyncFrame {
    SyncFrame {
        cluster_id: cluster
            .map(str::to_string)
            .unwrap_or_else(|| node.cluster_id.clone()),
        from_machine: "00000000000000000000000000000000".into(),
        message: message.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_converge_over_a_real_sync_session() {
    let a = node_from(None, "a", 1);
    let b = node_from(Some(a.node.save_document()), "b", 2);
    // Concurrent writes on both sides.
    a.node
        .write(|d| {
            d.put_service(
                ServiceId::from_bytes([10; 16]),
                "web",
                serde_json::json!({"n": 1}),
                5,
            )
            .map(|_| ())
        })
        .unwrap();
    b.node
        .write(|d| {
            d.put_service(
                ServiceId::from_bytes([11; 16]),
                "db",
                serde_json::json!({"n": 2}),
                6,
            )
            .map(|_| ())
        })
        .unwrap();
    assert_ne!(a.node.heads(), b.node.heads());
    let addr = serve(a.node.clone()).await;
    let mut client = peer::client(&addr).unwrap();
    peer::sync_session(&b.node, &mut client).await.unwrap();
    assert_eq!(
        a.node.heads(),
        b.node.heads(),
        "one session must settle both sides"
    );
    let names = |n: &Node| {
        n.read(|d| {
            d.services()
                .into_iter()
                .map(|s| s.name)
                .collect::<std::collections::BTreeSet<_>>()
        })
    };
    assert_eq!(
        names(&a.node),
        ["db", "web"].into_iter().map(String::from).collect()
    );
    assert_eq!(names(&a.node), names(&b.node));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_sync_rpc_is_dropped_and_counted() {
    let a = node_from(None, "a", 1);
    let before = a.node.read(|d| d.to_json());
    let heads = a.node.heads();
    let addr = serve(a.node.clone()).await;
    let mut client = peer::client(&addr).unwrap();

    // A frame whose message is not an automerge sync message.
    let frames = tokio_stream::iter(vec![frame(
        &a.node,
        None,
        b"\x42\x00garbage that is not automerge",
    )]);
    let mut replies = client.sync(frames).await.unwrap().into_inner();
    let err = replies.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // A frame from another cluster.
    let frames = tokio_stream::iter(vec![frame(&a.node, Some("another-cluster"), b"")]);
    let mut replies = client.sync(frames).await.unwrap().into_inner();
    let err = replies.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // Raw garbage on the TCP port, not even HTTP/2: dropped at the door,
    // with no answer.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(1000))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut rest).await;
    assert!(rest.is_empty(), "garbage gets no answer");
    // HTTP/1 is garbage here too.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut rest).await;
    assert!(rest.is_empty(), "HTTP/1 gets no answer");

    assert_eq!(
        a.node.metrics.sync_garbage_dropped.load(Ordering::Relaxed),
        4
    );
    assert_eq!(
        a.node.read(|d| d.to_json()),
        before,
        "garbage must not change the state"
    );
    assert_eq!(a.node.heads(), heads);
    // Still serving: an empty session works.
    let b = node_from(Some(a.node.save_document()), "b", 2);
    peer::sync_session(&b.node, &mut client).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_needs_a_valid_unused_token() {
    let a = node_from(None, "a", 1);
    let addr = serve(a.node.clone()).await;
    let token = uc_agent::token::generate().unwrap();
    let hash = uc_agent::token::hash(&token);
    a.node
        .write(|d| d.add_join_token(&hash, u64::MAX / 2))
        .unwrap();
    let request = |token: &str, id: u8| JoinRequest {
        token: token.into(),
        machine_id: MachineId::from_bytes([id; 16]).to_string(),
        name: format!("m{id}"),
        endpoints: vec!["127.0.0.9".into()],
        public_key: uc_mesh::PrivateKey::from_bytes([id; 32])
            .public_key()
            .to_string(),
        tags: vec![],
    };
    let before = a.node.read(|d| d.to_json());
    let err = peer::join(&addr, request("ucj_wrong", 5))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("join refused"), "{err}");
    assert_eq!(a.node.read(|d| d.machines().len()), 1);
    assert_eq!(
        a.node.read(|d| d.to_json())["machines"],
        before["machines"],
        "a wrong token changes no machine"
    );

    // A join without a valid WireGuard key, or with another machine's, or
    // with an endpoint that is not an address, is refused and uses no token.
    let mut no_key = request(&token, 5);
    no_key.public_key = "not a key".into();
    let err = peer::join(&addr, no_key).await.unwrap_err().to_string();
    assert!(err.contains("invalid WireGuard key"), "{err}");
    let mut bad_ep = request(&token, 5);
    bad_ep.endpoints = vec!["pi.lan".into()];
    let err = peer::join(&addr, bad_ep).await.unwrap_err().to_string();
    assert!(err.contains("invalid endpoint"), "{err}");
    let a_key = uc_mesh::PrivateKey::from_bytes([7; 32])
        .public_key()
        .to_string();
    let a_id = a.node.machine_id.clone();
    a.node
        .write(|d| d.set_machine_public_key(&a_id, &a_key))
        .unwrap();
    let mut stolen = request(&token, 5);
    stolen.public_key = a_key;
    let err = peer::join(&addr, stolen).await.unwrap_err().to_string();
    assert!(err.contains("already used by machine a"), "{err}");
    assert_eq!(a.node.read(|d| d.machines().len()), 1);

    let ok = peer::join(&addr, request(&token, 5)).await.unwrap();
    assert_eq!(ok.subnet, "10.210.2.0/24");
    let joined = ClusterState::load(&ok.document, [5; 16]).unwrap();
    assert!(joined.machine(&MachineId::from_bytes([5; 16])).is_some());
    let err = peer::join(&addr, request(&token, 6))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("join refused"), "a token is single-use: {err}");
    assert_eq!(a.node.read(|d| d.machines().len()), 2);
}
