//! Scan links: a durable `scan` event, the `fh_uid` cookie, the redirect to the
//! campaign's landing page, and a readable page for an unknown campaign.

use std::collections::HashMap;

use funnelhouse_schemas::AuthConfig;

use crate::support::{TestServer, config};

async fn server_with_campaigns() -> TestServer {
    let pages = HashMap::from([
        (
            "parcel-lottery".to_string(),
            Some("https://shop.example/lottery?lang=zh#draw".to_string()),
        ),
        ("no-page".to_string(), None),
    ]);
    // Scan links work without a write key: a QR code cannot carry one.
    let auth = AuthConfig {
        write_keys: vec!["wk".into()],
        ..Default::default()
    };
    TestServer::start_state(config(), auth, None, |s| s.with_landing_pages(pages)).await
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_scan_is_stored_then_redirected_with_the_user_and_channel() {
    let server = server_with_campaigns().await;
    let http = no_redirects();
    let resp = http
        .get(format!("{}/s/parcel-lottery/jd", server.url))
        .header("user-agent", "QR-test/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["cache-control"], "no-store");

    // The scan was durable before the redirect was answered.
    let rows = server.rows();
    assert_eq!(rows.len(), 1);
    let scan = &rows[0];
    assert_eq!(
        (
            scan.event.as_str(),
            scan.campaign.as_str(),
            scan.channel.as_str()
        ),
        ("scan", "parcel-lottery", "jd")
    );
    assert_eq!(
        scan.properties.as_deref(),
        Some(r#"{"user_agent":"QR-test/1.0"}"#)
    );
    let uid = &scan.user_id;
    assert_eq!(
        location,
        format!(
            "https://shop.example/lottery?lang=zh&fh_uid={uid}&fh_campaign=parcel-lottery&fh_channel=jd#draw"
        )
    );
    assert!(cookie.starts_with(&format!("fh_uid={uid};")), "{cookie}");

    // A second scan by the same phone (the cookie comes back) is the same user.
    let again = http
        .get(format!("{}/s/parcel-lottery/tmall", server.url))
        .header("cookie", format!("other=1; fh_uid={uid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 302);
    // ?uid= names the user outright.
    let named = http
        .get(format!("{}/s/parcel-lottery/douyin?uid=u%2042", server.url))
        .send()
        .await
        .unwrap();
    assert!(
        named.headers()["location"]
            .to_str()
            .unwrap()
            .contains("fh_uid=u%2042&")
    );
    let mut users: Vec<(String, String)> = server
        .rows()
        .into_iter()
        .map(|r| (r.channel, r.user_id))
        .collect();
    users.sort();
    assert_eq!(
        users,
        [
            ("douyin".to_string(), "u 42".to_string()),
            ("jd".to_string(), uid.clone()),
            ("tmall".to_string(), uid.clone())
        ]
    );
}

#[tokio::test]
async fn an_unknown_campaign_is_a_readable_404_and_stores_nothing() {
    let server = server_with_campaigns().await;
    let resp = no_redirects()
        .get(format!("{}/s/<nope>/jd", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("Unknown campaign") && page.contains("&lt;nope&gt;"),
        "{page}"
    );
    assert!(server.rows().is_empty());
}

#[tokio::test]
async fn a_campaign_without_landing_page_records_the_scan_and_says_so() {
    let server = server_with_campaigns().await;
    let resp = no_redirects()
        .get(format!("{}/s/no-page/offline", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("landing_url"));
    assert_eq!(server.rows().len(), 1);
}

#[tokio::test]
async fn an_empty_or_bad_uid_gets_a_new_id_and_the_scan_is_kept() {
    let server = server_with_campaigns().await;
    let long = "x".repeat(200);
    for (query, cookie) in [
        ("?uid=", ""),
        ("", "fh_uid="),
        ("", &*format!("fh_uid={long}")),
    ] {
        let resp = no_redirects()
            .get(format!("{}/s/parcel-lottery/jd{query}", server.url))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 302, "{query} {cookie}");
    }
    let rows = server.rows();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.user_id.len() == 36), "{rows:?}");
}
