//! The HTTP side: routes, request parsing and error responses. Every
//! error is a JSON [`api::ErrorBody`]; request bodies are limited to
//! [`MAX_BODY`] bytes and must parse as their type, unknown fields
//! refused.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::{instances, Daemon};

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

/// Every route, as (method, path): the OpenAPI document must list exactly
/// these (checked in the tests against the router itself).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/1.0"),
    ("GET", "/1.0/instances"),
    ("POST", "/1.0/instances"),
    ("GET", "/1.0/instances/{name}"),
    ("DELETE", "/1.0/instances/{name}"),
    ("PUT", "/1.0/instances/{name}/state"),
    ("POST", "/1.0/instances/{name}/exec"),
    ("POST", "/1.0/instances/{name}/console"),
    ("GET", "/1.0/instances/{name}/logs"),
    ("GET", "/1.0/operations/{id}"),
    ("GET", "/1.0/operations/{id}/wait"),
    ("GET", "/1.0/events"),
    ("GET", "/1.0/images"),
    ("POST", "/1.0/images"),
    ("DELETE", "/1.0/images/{name}"),
];

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = api::ErrorBody {
            error: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

/// A JSON body whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_error(rejection)),
        }
    }
}

fn json_error(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {MAX_BODY} bytes"),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request body must be JSON (Content-Type: application/json)",
        ),
        // Not JSON, or JSON of the wrong shape: both are a bad request.
        _ => ApiError::bad_request(format!("bad request body: {}", rejection.body_text())),
    }
}

/// A query string whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(query_error(rejection)),
        }
    }
}

fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("bad query: {}", rejection.body_text()))
}

type Shared = State<Arc<Daemon>>;

/// The API's router over `daemon`.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/1.0", get(server))
        .route("/1.0/instances", get(list).post(create))
        .route("/1.0/instances/{name}", get(info).delete(delete))
        .route("/1.0/instances/{name}/state", put(change_state))
        .route("/1.0/instances/{name}/exec", post(exec))
        .route("/1.0/instances/{name}/console", post(console))
        .route("/1.0/instances/{name}/logs", get(logs))
        .route("/1.0/operations/{id}", get(operation))
        .route("/1.0/operations/{id}/wait", get(wait))
        .route("/1.0/events", get(events))
        .route("/1.0/images", get(images).post(build_image))
        .route("/1.0/images/{*name}", axum::routing::delete(remove_image))
        .fallback(no_endpoint)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(daemon)
}

async fn no_endpoint() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint does not take that method",
    )
}

async fn server() -> Json<api::ServerInfo> {
    Json(api::ServerInfo {
        server: "vessel".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api: "1.0".into(),
    })
}

fn accepted(op: api::Operation) -> Response {
    (StatusCode::ACCEPTED, Json(op)).into_response()
}

async fn list(State(d): Shared) -> Result<Json<Vec<api::Instance>>, ApiError> {
    instances::list(d).await.map(Json)
}

async fn create(
    State(d): Shared,
    ApiJson(request): ApiJson<api::CreateRequest>,
) -> Result<Response, ApiError> {
    instances::create(d, request).await.map(accepted)
}

async fn info(State(d): Shared, Path(name): Path<String>) -> Result<Json<api::Instance>, ApiError> {
    instances::get(d, name).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(d): Shared,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<Response, ApiError> {
    instances::delete(d, name, q.force).await.map(accepted)
}

async fn change_state(
    State(d): Shared,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<api::StateRequest>,
) -> Result<Response, ApiError> {
    instances::change_state(d, name, request)
        .await
        .map(accepted)
}

async fn exec(
    State(d): Shared,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    upgrade_to_supervisor(d, name, req, api::EXEC_UPGRADE, supervisor::Request::Exec).await
}

async fn console(
    State(d): Shared,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    upgrade_to_supervisor(
        d,
        name,
        req,
        api::CONSOLE_UPGRADE,
        supervisor::Request::Console,
    )
    .await
}

/// Answers an HTTP upgrade to `protocol` by handing the connection to the
/// instance's supervisor with `request` (exec, console): bytes are
/// relayed both ways until either side closes.
async fn upgrade_to_supervisor(
    d: std::sync::Arc<crate::Daemon>,
    name: String,
    req: Request,
    protocol: &'static str,
    request: supervisor::Request,
) -> Result<Response, ApiError> {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(protocol) {
        return Err(ApiError::bad_request(format!(
            "this is an HTTP upgrade: send Connection: upgrade and Upgrade: {protocol}"
        )));
    }
    let on_upgrade = hyper::upgrade::on(req);
    let conn = instances::attach(d, name, request).await?;
    conn.set_nonblocking(true).map_err(ApiError::internal)?;
    let mut conn = tokio::net::UnixStream::from_std(conn).map_err(ApiError::internal)?;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut upgraded = hyper_util::rt::TokioIo::new(upgraded);
                // Either side closing ends the session.
                let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut conn).await;
            }
            Err(e) => tracing::debug!("{protocol}: the client did not upgrade: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, protocol)
        .body(Body::empty())
        .map_err(ApiError::internal)
}

async fn logs(State(d): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let text = instances::logs(d, name).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

async fn operation(
    State(d): Shared,
    Path(id): Path<String>,
) -> Result<Json<api::Operation>, ApiError> {
    d.ops
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no operation {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Seconds; default and maximum a day.
    timeout: Option<u64>,
}

async fn wait(
    State(d): Shared,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<api::Operation>, ApiError> {
    let seconds = q.timeout.unwrap_or(86_400).min(86_400);
    d.ops
        .wait(&id, Duration::from_secs(seconds))
        .await
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no operation {id}")))
}

async fn images(State(d): Shared) -> Result<Json<Vec<api::Image>>, ApiError> {
    instances::images(d).await.map(Json)
}

async fn build_image(
    State(d): Shared,
    ApiJson(request): ApiJson<api::BuildRequest>,
) -> Result<Response, ApiError> {
    instances::build_image(d, request.name).await.map(accepted)
}

async fn remove_image(State(d): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    instances::remove_image(d, name).await.map(accepted)
}

async fn events(State(d): Shared) -> Response {
    let receiver = d.events.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => {
                    let mut line = serde_json::to_vec(&event).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok::<_, Infallible>(Bytes::from(line)), receiver));
                }
                // A slow reader misses events rather than holding the daemon.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
