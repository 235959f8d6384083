//! The OpenAPI document (`crates/api/openapi.json`) against what the
//! daemon's router actually routes: every documented method and path
//! reaches a handler, every other method on those paths is refused with
//! 405, and the document and [`daemon::ROUTES`] list the same routes.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(api::OPENAPI).unwrap();
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (key, _) in item.as_object().unwrap() {
            let method = key.to_uppercase();
            if METHODS.contains(&method.as_str()) {
                routes.insert((method, path.clone()));
            }
        }
    }
    routes
}

fn daemon() -> (tempfile::TempDir, std::sync::Arc<daemon::Daemon>) {
    let dir = tempfile::tempdir().unwrap();
    let config = daemon::Config {
        socket: dir.path().join("sock"),
        state_dir: dir.path().join("state"),
        supervisor_program: "/nonexistent".into(),
        data_dir: dir.path().join("data"),
        overcommit: 1.0,
        boot_id_file: dir.path().join("boot_id"),
    };
    let d = daemon::Daemon::open(config).unwrap();
    (dir, d)
}

/// The status and body of `method path` sent to the router.
async fn probe(
    d: &std::sync::Arc<daemon::Daemon>,
    method: &str,
    path: &str,
) -> (StatusCode, String) {
    let uri = path.replace("{name}", "probe").replace("{id}", "probe");
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let response = daemon::router(d.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    // The event stream never ends: only its head is looked at.
    if path == "/1.0/events" {
        return (status, String::new());
    }
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_openapi_document_matches_the_router() {
    let documented = documented();
    let listed: BTreeSet<(String, String)> = daemon::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, listed, "openapi.json and daemon::ROUTES differ");
    let (_dir, d) = daemon();
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        for method in METHODS {
            let (status, body) = probe(&d, method, path).await;
            if documented.contains(&((*method).to_owned(), path.clone())) {
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}: {body}"
                );
                assert!(
                    !body.contains("no such endpoint"),
                    "{method} {path} is not routed"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is routed but undocumented: {body}"
                );
            }
        }
    }
    let (status, body) = probe(&d, "GET", "/1.0/undocumented").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no such endpoint"), "{body}");
}
