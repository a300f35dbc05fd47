//! The `[http]` limits of the real server: a client that stalls in its headers or its
//! body is closed (the body one with a 408 naming the limit) and slows nobody else;
//! past `max_connections` a new client waits for a free slot instead of being served.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Server, write_file};

async fn start(limits: &str) -> (Server, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(dir.path(), "funnelhouse.toml", &format!("[http]\n{limits}"));
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]).await;
    let addr = server.url.trim_start_matches("http://").to_string();
    (server, dir, addr)
}

/// Everything the server sends until it closes the connection (bounded in time).
async fn until_closed(mut s: TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out))
        .await
        .expect("the server closes a stalled connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn stalled_headers_and_bodies_are_closed_and_slow_nobody() {
    let (server, _dir, addr) =
        start("header_timeout = \"1s\"\nrequest_timeout = \"1s\"\nmax_connections = 100\n").await;
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    // Meanwhile another client is served as usual.
    let http = reqwest::Client::new();
    let answer = http
        .post(format!("{}/v1/events", server.url))
        .json(&serde_json::json!([{"event_id": "ok-1", "event": "scan", "user_id": "u", "campaign": "c"}]))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    for s in stalled {
        until_closed(s).await;
    }

    let mut body_cut = TcpStream::connect(&addr).await.unwrap();
    body_cut
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"event_id\"",
        )
        .await
        .unwrap();
    let reply = until_closed(body_cut).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    assert_eq!(server.terminate().code(), Some(0));
}

#[tokio::test]
async fn past_max_connections_a_new_client_waits_for_a_free_slot() {
    let (server, _dir, addr) = start("header_timeout = \"30s\"\nmax_connections = 2\n").await;
    // The readiness probe's connection may still be open: wait until it is closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = TcpStream::connect(&addr).await.unwrap();
    let _second = TcpStream::connect(&addr).await.unwrap();
    let http = reqwest::Client::new();
    let health = || {
        http.get(format!("{}/healthz", server.url))
            .timeout(Duration::from_millis(800))
            .send()
    };
    assert!(health().await.is_err(), "a third connection is not served");
    drop(first);
    let mut served = false;
    for _ in 0..50 {
        if let Ok(r) = health().await {
            served = r.status() == 200;
            break;
        }
    }
    assert!(served, "served once a slot is free");
    assert_eq!(server.terminate().code(), Some(0));
}
