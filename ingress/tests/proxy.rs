//! Component tests of the ingress's listeners, on loopback: routing by host over HTTP and HTTPS
//! (HTTP/1.1 and HTTP/2, a test CA), redirects, forwarded headers, websockets, failover, TCP
//! routes, ACME challenges, limits, and route changes under open connections.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uc_ingress::{Limits, Listener, RouteTable};

fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[tokio::test]
async fn hosts_route_to_their_service_over_http1_http2_and_tls() {
    install_ring();
    let ca = TestCa::new();
    let (a, _sa) = backend("service-a").await;
    let (b, _sb) = backend("service-b").await;
    let table = RouteTable::build(&[
        service("a", &[format!("a.example.test:{}/https", a.port())], true),
        service("b", &[format!("b.example.test:{}/http", b.port())], true),
    ]);
    let r = ingress(Limits::default(), table).await;
    r.ingress.certs().replace(HashMap::from([(
        "a.example.test".to_owned(),
        ca.cert(&["a.example.test"]),
    )]));
    let h1 = ca.client_config(&[b"http/1.1"]);
    let h2 = ca.client_config(&[b"h2"]);

    let x = get1(r.https, "a.example.test", "/x?y=1", Some(h1.clone())).await;
    assert_eq!(x.status, 200);
    assert!(x.body.starts_with("service-a\nGET /x?y=1\n"), "{}", x.body);
    let x = get2(r.https, "a.example.test", "/over-h2", h2).await;
    assert_eq!(x.status, 200);
    assert!(
        x.body.starts_with("service-a\nGET /over-h2\n"),
        "{}",
        x.body
    );
    assert!(x.body.contains("host: a.example.test\n"), "{}", x.body);

    let x = get1(r.http, "b.example.test", "/", None).await;
    assert_eq!(x.status, 200);
    assert!(x.body.starts_with("service-b\n"), "{}", x.body);

    // The https route's host over plain HTTP is redirected, path and query kept.
    let x = get1(r.http, "A.example.test", "/p?q=2", None).await;
    assert_eq!(x.status, 308);
    assert_eq!(x.headers["location"], "https://a.example.test/p?q=2");

    // An unknown host: a plain 404 over HTTP, and no certificate at all over HTTPS.
    let x = get1(r.http, "nobody.example.test", "/", None).await;
    assert_eq!(x.status, 404);
    assert_eq!(x.body, "no such site here\n");
    let e = connect(r.https, "nobody.example.test", Some(h1.clone()))
        .await
        .err()
        .expect("no certificate for an unknown name");
    assert!(e.to_string().contains("AccessDenied"), "{e}");
    // The b route is plain HTTP: it has no certificate either.
    assert!(connect(r.https, "b.example.test", Some(h1)).await.is_err());
}

#[tokio::test]
async fn forwarded_headers_name_the_client_and_hop_by_hop_headers_stay_behind() {
    install_ring();
    let (a, _sa) = backend("a").await;
    let table = RouteTable::build(&[service(
        "a",
        &[format!("a.example.test:{}/http", a.port())],
        true,
    )]);
    let r = ingress(Limits::default(), table).await;
    let io = connect(r.http, "a.example.test", None).await.unwrap();
    let mut s = open1(io).await;
    let req = hyper::Request::builder()
        .uri("/h")
        .header("host", "a.example.test")
        .header("x-forwarded-for", "192.0.2.7")
        .header("x-secret-hop", "1")
        .header("connection", "x-secret-hop")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    use http_body_util::BodyExt;
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        body.contains("x-forwarded-for: 192.0.2.7, 127.0.0.1\n"),
        "{body}"
    );
    assert!(body.contains("x-real-ip: 127.0.0.1\n"), "{body}");
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(
        body.contains("x-forwarded-host: a.example.test\n"),
        "{body}"
    );
    assert!(!body.contains("x-secret-hop"), "{body}");

    // A POST body gets through.
    let x = send1(&mut s, "a.example.test", "/post", "hello body").await;
    assert!(x.body.contains("body: hello body\n"), "{}", x.body);
}

#[tokio::test]
async fn a_dead_backend_is_skipped_and_marked_down() {
    install_ring();
    let (live, _s) = backend("live").await;
    // The same port on 127.0.0.2 refuses connections: nothing listens there.
    let dead: std::net::SocketAddr = format!("127.0.0.2:{}", live.port()).parse().unwrap();
    let mut svc = service(
        "a",
        &[format!("a.example.test:{}/http", live.port())],
        false,
    );
    svc.containers.push(uc_ingress::ContainerInput {
        ip: dead.ip(),
        local: true,
    });
    let table = RouteTable::build(&[svc]);
    let r = ingress(Limits::default(), table).await;
    for i in 0..6 {
        let x = get1(r.http, "a.example.test", &format!("/{i}"), None).await;
        assert_eq!(x.status, 200, "request {i}: {}", x.body);
        assert!(x.body.starts_with("live\n"));
    }
    assert_eq!(
        r.ingress.balancer().down(std::time::Instant::now()),
        vec![dead]
    );

    // With no backend answering at all: 502, and the service is named.
    let mut svc = service(
        "gone",
        &[format!("g.example.test:{}/http", dead.port())],
        true,
    );
    svc.containers[0].ip = dead.ip();
    r.ingress.set_routes(RouteTable::build(&[svc]));
    let x = get1(r.http, "g.example.test", "/", None).await;
    assert_eq!(x.status, 502);
    assert!(x.body.contains("gone"), "{}", x.body);
}

#[tokio::test]
async fn websockets_are_tunnelled_both_ways() {
    install_ring();
    let ca = TestCa::new();
    let (a, _sa) = backend("a").await;
    let table = RouteTable::build(&[service(
        "a",
        &[format!("ws.example.test:{}/https", a.port())],
        true,
    )]);
    let r = ingress(Limits::default(), table).await;
    r.ingress.certs().replace(HashMap::from([(
        "ws.example.test".to_owned(),
        ca.cert(&["ws.example.test"]),
    )]));
    let mut io = connect(
        r.https,
        "ws.example.test",
        Some(ca.client_config(&[b"http/1.1"])),
    )
    .await
    .unwrap();
    io.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        io.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping one"[..], b"and two"] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test]
async fn tcp_routes_forward_bytes() {
    install_ring();
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let ingress = uc_ingress::Ingress::new(Limits::default());
    ingress.set_routes(RouteTable::build(&[service(
        "db",
        &[format!("5432:{echo_port}/tcp")],
        true,
    )]));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    tokio::spawn(uc_ingress::serve(
        ingress,
        l,
        Listener::Tcp,
        5432,
        None,
        stop,
    ));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"select 1").await.unwrap();
    let mut back = [0u8; 8];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"select 1");
}

#[tokio::test]
async fn acme_challenges_are_answered_on_http_for_any_host() {
    install_ring();
    let r = ingress(Limits::default(), RouteTable::default()).await;
    r.ingress.set_challenges(HashMap::from([(
        "tok123".to_owned(),
        "tok123.thumb".to_owned(),
    )]));
    let x = get1(
        r.http,
        "new.example.test",
        "/.well-known/acme-challenge/tok123",
        None,
    )
    .await;
    assert_eq!(x.status, 200);
    assert_eq!(x.body, "tok123.thumb");
    let x = get1(
        r.http,
        "new.example.test",
        "/.well-known/acme-challenge/other",
        None,
    )
    .await;
    assert_eq!(x.status, 404);
}

#[tokio::test]
async fn limits_hold_headers_slow_clients_and_connections() {
    install_ring();
    let (a, _sa) = backend("a").await;
    let limits = Limits {
        max_connections_per_ip: 3,
        max_header_bytes: 8192,
        header_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let table = || {
        RouteTable::build(&[service(
            "a",
            &[format!("a.example.test:{}/http", a.port())],
            true,
        )])
    };
    let r = ingress(limits.clone(), table()).await;

    // Headers larger than the limit: 431, nothing forwarded.
    let mut c = TcpStream::connect(r.http).await.unwrap();
    let big = "x".repeat(20_000);
    c.write_all(
        format!("GET / HTTP/1.1\r\nHost: a.example.test\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut resp)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.80}");

    // A client that never finishes its headers is cut off after the timeout.
    let mut slow = TcpStream::connect(r.http).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a.exam")
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow client is still connected after 5 s");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // At most 3 connections from one address: the 4th is closed at once, the others work.
    // On an ingress whose header timeout is long: the timeout also closes a kept-alive
    // connection idle that long, and on a slow machine opening the 3 took longer than 500 ms,
    // so the 4th found a free place.
    let r = ingress(
        Limits {
            header_timeout: Duration::from_secs(10),
            ..limits
        },
        table(),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open1(connect(r.http, "a.example.test", None).await.unwrap()).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = TcpStream::connect(r.http).await.unwrap();
    let _ = fourth
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "the 4th got {buf:?}");
    for s in &mut held {
        assert_eq!(send1(s, "a.example.test", "/", "").await.status, 200);
    }
    assert!(
        r.ingress
            .counters
            .refused_connections
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get1(r.http, "a.example.test", "/", None).await.status, 200);
}

#[tokio::test]
async fn changing_routes_keeps_open_connections() {
    install_ring();
    let (a, _sa) = backend("a").await;
    let (b, _sb) = backend("b").await;
    let ra = service("a", &[format!("a.example.test:{}/http", a.port())], true);
    let r = ingress(
        Limits::default(),
        RouteTable::build(std::slice::from_ref(&ra)),
    )
    .await;
    let mut s = open1(connect(r.http, "a.example.test", None).await.unwrap()).await;
    assert!(
        send1(&mut s, "a.example.test", "/", "")
            .await
            .body
            .starts_with("a\n")
    );
    assert_eq!(send1(&mut s, "b.example.test", "/", "").await.status, 404);
    r.ingress.set_routes(RouteTable::build(&[
        ra,
        service("b", &[format!("b.example.test:{}/http", b.port())], true),
    ]));
    // The same connection now reaches the new route, and the old one still works.
    assert!(
        send1(&mut s, "b.example.test", "/", "")
            .await
            .body
            .starts_with("b\n")
    );
    assert!(
        send1(&mut s, "a.example.test", "/", "")
            .await
            .body
            .starts_with("a\n")
    );
}

#[tokio::test]
async fn workers_share_a_listener_and_close_it_on_shutdown() {
    install_ring();
    let (a, _sa) = backend("a").await;
    let ingress = uc_ingress::Ingress::new(Limits::default());
    ingress.set_routes(RouteTable::build(&[service(
        "a",
        &[format!("a.example.test:{}/http", a.port())],
        true,
    )]));
    let workers = std::sync::Arc::new(uc_ingress::Workers::start(3).unwrap());
    assert_eq!(workers.len(), 3);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = {
        let (w, s) = (workers.clone(), stop.clone());
        tokio::spawn(async move { w.serve(ingress, l, Listener::Http, 80, None, s).await })
    };
    // Many connections at once, each answered by whichever worker accepted it.
    let answers = futures::future::join_all(
        (0..40).map(|_| async move { get1(addr, "a.example.test", "/", None).await.status }),
    )
    .await;
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("every worker stops serving")
        .unwrap()
        .unwrap();
    // No worker holds the socket any more.
    assert!(TcpStream::connect(addr).await.is_err());
    // Dropping the workers stops and joins their threads.
    drop(std::sync::Arc::into_inner(workers).expect("nothing else holds the workers"));
}

#[tokio::test]
async fn backend_connections_are_kept_alive_and_a_closed_one_is_not_reused() {
    install_ring();
    // A backend that counts its connections and can close them all at once.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (close, _) = tokio::sync::broadcast::channel::<()>(1);
    {
        let (accepted, close) = (accepted.clone(), close.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut closed = close.subscribe();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        tokio::select! {
                            _ = closed.recv() => return,
                            n = s.read(&mut chunk) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            },
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    }
    let table = RouteTable::build(&[service("a", &[format!("a.example.test:{port}/http")], true)]);
    let r = ingress(Limits::default(), table).await;
    let count = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    // Sequential requests share one backend connection (one client connection, so that one
    // worker, with its own pool, serves them all).
    let mut c = open1(connect(r.http, "a.example.test", None).await.unwrap()).await;
    for _ in 0..5 {
        let x = send1(&mut c, "a.example.test", "/", "").await;
        assert_eq!((x.status.as_u16(), x.body.as_str()), (200, "ok\n"));
    }
    assert_eq!(count(), 1, "the backend connection is kept alive");
    // The backend closes it: the next request goes over a new one, and succeeds.
    close.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let x = send1(&mut c, "a.example.test", "/", "").await;
        assert_eq!((x.status.as_u16(), x.body.as_str()), (200, "ok\n"));
    }
    assert_eq!(count(), 2);
}
