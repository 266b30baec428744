//! A full ACME flow against Debian's `pebble`, with real HTTP-01 validation: pebble resolves the
//! hostname through a DNS server the test runs (`pebble-challtestsrv`, every name → 127.0.0.1)
//! and fetches the challenge from the ingress's HTTP listener; the certificate is issued, served
//! over HTTPS, and renewed. Everything on loopback.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use uc_ingress::acme::{self, AcmeConfig, Challenges};
use uc_ingress::{Cert, Ingress, Limits, RouteTable};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never listened");
}

/// Challenges go straight into the ingress (the agent puts them in the replicated state).
struct Direct(Arc<Ingress>, Mutex<HashMap<String, String>>);

impl Challenges for Direct {
    fn publish(&self, token: &str, key_auth: &str) -> Result<(), uc_ingress::Error> {
        let mut m = self.1.lock().unwrap();
        m.insert(token.into(), key_auth.into());
        self.0.set_challenges(m.clone());
        Ok(())
    }
    fn withdraw(&self, token: &str) {
        let mut m = self.1.lock().unwrap();
        m.remove(token);
        self.0.set_challenges(m.clone());
    }
}

fn serial(cert: &Cert) -> Vec<u8> {
    use x509_parser::prelude::*;
    let der = &cert.key.cert[0];
    X509Certificate::from_der(der)
        .unwrap()
        .1
        .raw_serial()
        .to_vec()
}

#[tokio::test]
async fn pebble_issues_a_certificate_that_is_served_and_renewed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (pebble_cert, pebble_key) = ca.leaf(&["127.0.0.1", "localhost"]);
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    std::fs::write(dir.path().join("cert.pem"), pebble_cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), pebble_key).unwrap();

    // The ingress, whose HTTP listener is where pebble's validation connects.
    let r = ingress(Limits::default(), RouteTable::default()).await;
    let (backend_addr, _b) = backend("app").await;
    r.ingress.set_routes(RouteTable::build(&[service(
        "app",
        &[format!("app.example.test:{}/https", backend_addr.port())],
        true,
    )]));

    let dns = free_port();
    let (acme_port, mgmt) = (free_port(), free_port());
    let _dns = Killed(
        Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian package pebble)"),
    );
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{acme_port}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt}"),
        "certificate": dir.path().join("cert.pem"),
        "privateKey": dir.path().join("key.pem"),
        "httpPort": r.http.port(),
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
        "certificateValidityPeriod": 60,
    }});
    std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
    let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
    let _pebble = Killed(
        Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env_remove("PEBBLE_VA_ALWAYS_VALID")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble (Debian package pebble)"),
    );
    wait_listening(format!("127.0.0.1:{acme_port}").parse().unwrap()).await;

    let cfg = AcmeConfig {
        directory: format!("https://127.0.0.1:{acme_port}/dir"),
        root_ca: Some(dir.path().join("ca.pem")),
        timeout: Duration::from_secs(60),
    };
    let (account, creds) = acme::account(&cfg, None).await.unwrap();
    let creds = creds.expect("a new account's credentials, to be stored");
    // Stored credentials give the same account back, without a new one.
    let (_, again) = acme::account(&cfg, Some(&creds)).await.unwrap();
    assert!(again.is_none());

    let sink = Direct(r.ingress.clone(), Mutex::default());
    let hosts = vec!["app.example.test".to_owned()];
    let issued = acme::issue(&cfg, &account, &hosts, &sink)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\npebble log:\n{}",
                std::fs::read_to_string(dir.path().join("pebble.log")).unwrap()
            )
        });
    assert!(
        sink.1.lock().unwrap().is_empty(),
        "challenges are withdrawn"
    );
    let first = Cert::from_pem(&issued.chain_pem, &issued.key_pem).unwrap();
    assert_eq!(first.names, hosts);
    assert!(
        first.not_after - first.not_before <= 61,
        "pebble's 60 s validity"
    );
    r.ingress
        .certs()
        .replace(HashMap::from([(hosts[0].clone(), first.clone())]));

    // Served: a client that trusts pebble's root (from its management API) gets the backend.
    let mgmt_tls = ca.client_config(&[b"http/1.1"]);
    let root = get1(
        format!("127.0.0.1:{mgmt}").parse().unwrap(),
        "127.0.0.1",
        "/roots/0",
        Some(mgmt_tls),
    )
    .await;
    assert_eq!(root.status, 200, "{}", root.body);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root.body.as_bytes()).unwrap())
        .unwrap();
    // A new client each time: a resumed TLS session would show the old certificate.
    let client = || {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        )
    };
    let x = get1(r.https, "app.example.test", "/", Some(client())).await;
    assert_eq!(x.status, 200);
    assert!(x.body.starts_with("app\n"), "{}", x.body);

    // Renewed: the same account orders again; the new certificate replaces the old one.
    let renewed = acme::issue(&cfg, &account, &hosts, &sink).await.unwrap();
    let second = Cert::from_pem(&renewed.chain_pem, &renewed.key_pem).unwrap();
    assert_ne!(serial(&first), serial(&second));
    assert!(second.not_after >= first.not_after);
    r.ingress
        .certs()
        .replace(HashMap::from([(hosts[0].clone(), second.clone())]));
    let tcp = tokio::net::TcpStream::connect(r.https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("app.example.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client())
        .connect(name, tcp)
        .await
        .unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(
        served, second.key.cert[0],
        "the renewed certificate is served"
    );

    // A name that does not resolve to this ingress (no route, no challenge answered) fails,
    // with the CA's reason.
    r.ingress.set_challenges(HashMap::new());
    struct Nowhere;
    impl Challenges for Nowhere {
        fn publish(&self, _: &str, _: &str) -> Result<(), uc_ingress::Error> {
            Ok(())
        }
        fn withdraw(&self, _: &str) {}
    }
    let e = acme::issue(&cfg, &account, &["other.example.test".to_owned()], &Nowhere)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("unauthorized") && e.contains("404"), "{e}");
}
