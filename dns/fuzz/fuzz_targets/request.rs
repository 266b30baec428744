//! The DNS request paths on arbitrary bytes, exactly as the server runs them:
//! - UDP: uc's reading of a plain query and its answer cache, else hickory's parsing and uc's
//!   handler; each datagram twice, so the second may come from the cache. What is sent must be a
//!   DNS message with the datagram's id;
//! - TCP: hickory's parsing of the request, then uc's handler (the pure answer, the response
//!   builder and its encoding).
//! Nothing may panic.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;

/// Encodes the response as the UDP path would, into nothing.
#[derive(Clone)]
struct Sink;

#[async_trait::async_trait]
impl ResponseHandler for Sink {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::new();
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_max_size(512);
        Ok(response.destructive_emit(&mut enc)?)
    }
}

fn handler() -> &'static uc_dns::Handler {
    static H: OnceLock<uc_dns::Handler> = OnceLock::new();
    H.get_or_init(|| {
        let mut v = uc_dns::DnsView {
            this_machine: "pi".into(),
            serial: 1,
            ..Default::default()
        };
        v.machines.insert(
            "pi".into(),
            uc_dns::MachineRec {
                name: "pi".into(),
                v4: Ipv4Addr::new(10, 210, 1, 1),
                v6: "fd00::1".parse().unwrap(),
            },
        );
        v.services.insert(
            "web".into(),
            uc_dns::ServiceRec {
                containers: (0..40)
                    .map(|i| uc_dns::ContainerRec {
                        name: format!("c{i:015}"),
                        machine: "pi".into(),
                        v4: Ipv4Addr::new(10, 210, 1, 2 + i),
                        v6: None,
                        healthy: i % 3 != 0,
                    })
                    .collect(),
                ports: vec![uc_dns::PortRec {
                    name: "http".into(),
                    tcp: true,
                    port: 80,
                }],
            },
        );
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(v));
        std::mem::forget(tx);
        // No upstreams: a forwarded name fails at once instead of leaving the process.
        uc_dns::Handler::new(rx, uc_dns::ForwardConfig::default(), &[])
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    udp(data);
    let src = SocketAddr::from(([127, 0, 0, 1], 5353));
    let Ok(request) = Request::from_bytes(data.to_vec(), src, Protocol::Udp) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(handler().handle_request::<_, TokioTime>(&request, Sink));
});

fn udp(data: &[u8]) {
    let src = SocketAddr::from(([127, 0, 0, 1], 5353));
    let mut out = Vec::new();
    for _ in 0..2 {
        let sent = match handler().udp_step(data, src, std::time::Instant::now(), &mut out) {
            uc_dns::UdpStep::Send => out.clone(),
            uc_dns::UdpStep::Forward(p) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(handler().forward_udp(*p))
            }
            uc_dns::UdpStep::Drop => continue,
        };
        let m = hickory_proto::op::Message::from_vec(&sent).expect("a DNS message is sent");
        assert_eq!(m.metadata.id.to_be_bytes(), [data[0], data[1]]);
    }
}
