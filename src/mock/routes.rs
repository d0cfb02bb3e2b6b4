//! The mock's routes and xAI's wire bodies.

use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde_json::json;
use tower::BoxError;

use super::state::{Access, Account, Issued, State};
use super::stats::{fnv1a_64, Counters};

pub(super) const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";
pub(super) const TOKEN_PATH: &str = "/oauth2/token";
pub(super) const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// The largest inference request body read; larger ones get a 413.
const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;
/// The largest token request body read; larger ones get a 413.
const MAX_FORM_BYTES: usize = 64 * 1024;

const PERMISSION_CODE: &str =
    "The caller does not have permission to execute the specified operation";
const STALE_ERROR: &str =
    "The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]";
const ENTITLEMENT_ERROR: &str = "You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com";
const BILLING_CODE: &str = "personal-team-blocked:spending-limit";
const BILLING_ERROR: &str = "You have run out of credits or need a Grok subscription...";
const NO_CREDENTIALS_ERROR: &str =
    "No OAuth2 access token was provided. [WKE=unauthenticated:no-credentials]";

/// Everything a request handler needs: the state, the counters and the server's own URLs.
#[derive(Debug)]
pub(super) struct Shared {
    state: std::sync::Mutex<State>,
    pub(super) counters: Counters,
    pub(super) base_url: String,
}

impl Shared {
    pub(super) fn new(state: State, base_url: String) -> Self {
        Self {
            state: std::sync::Mutex::new(state),
            counters: Counters::default(),
            base_url,
        }
    }

    /// The state. Never hold the guard across an await.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Answers one request. Never panics, whatever the request.
pub(super) async fn handle<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let path = req.uri().path();
    if path.starts_with("/v1/") {
        inference(shared, req).await
    } else if path == TOKEN_PATH {
        if req.method() == Method::POST {
            token(shared, req).await
        } else {
            method_not_allowed("POST")
        }
    } else if path == DISCOVERY_PATH {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            discovery(shared)
        } else {
            method_not_allowed("GET, HEAD")
        }
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"code": "Not found", "error": "No such route on the mock xAI server."}),
        )
    }
}

async fn inference<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let counters = &shared.counters;
    counters.inference_requests.bump();
    let (parts, body) = req.into_parts();
    // Read the whole body first, as a server that parses it would: a client that streams it
    // gets to finish before any answer.
    let bytes = match read_body(&parts.headers, body, MAX_REQUEST_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let token = bearer(&parts.headers);
    let (access, latency) = {
        let state = shared.lock();
        let access = match token {
            Bearer::Token(token) => state.check_access(token),
            Bearer::Missing | Bearer::Unreadable => Access::Unknown,
        };
        (access, state.settings.inference_latency)
    };
    sleep(latency).await;

    match (token, access) {
        (Bearer::Missing, _) => {
            counters.unauthorized_401.bump();
            let mut response = json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"code": PERMISSION_CODE, "error": NO_CREDENTIALS_ERROR}),
            );
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
        (_, Access::Unknown | Access::Stale) => {
            counters.stale_403.bump();
            forbidden(PERMISSION_CODE, STALE_ERROR)
        }
        (_, Access::Valid(_, Account::NoSubscription)) => {
            counters.entitlement_403.bump();
            forbidden(PERMISSION_CODE, ENTITLEMENT_ERROR)
        }
        (_, Access::Valid(_, Account::OutOfCredits)) => {
            counters.billing_403.bump();
            forbidden(BILLING_CODE, BILLING_ERROR)
        }
        (_, Access::Valid(id, Account::Subscribed)) => {
            let n = counters.inference_ok.bump();
            chat_completion(n, &id, &bytes)
        }
    }
}

/// What the `Authorization` header holds.
#[derive(Debug, Clone, Copy)]
enum Bearer<'a> {
    /// No header, another scheme, or an empty token.
    Missing,
    /// A bearer token that is not visible ASCII: no token the mock issued.
    Unreadable,
    Token(&'a str),
}

fn bearer(headers: &HeaderMap) -> Bearer<'_> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Bearer::Missing;
    };
    let bytes = value.as_bytes();
    let is_bearer = bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ");
    if !is_bearer {
        return Bearer::Missing;
    }
    match value.to_str() {
        Ok(value) => match value.get(7..).map(str::trim) {
            Some("") | None => Bearer::Missing,
            Some(token) => Bearer::Token(token),
        },
        Err(_) => Bearer::Unreadable,
    }
}

fn chat_completion(n: u64, id: &str, body: &[u8]) -> Response<Full<Bytes>> {
    #[derive(serde::Deserialize)]
    struct ChatRequest {
        model: Option<String>,
    }
    let model = serde_json::from_slice::<ChatRequest>(body)
        .ok()
        .and_then(|request| request.model)
        .unwrap_or_else(|| "grok-mock".to_owned());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let checksum = format!("{:016x}", fnv1a_64(body));
    let content = "Hello from the mock xAI server.";
    let mut response = json_response(
        StatusCode::OK,
        &json!({
            "id": format!("chatcmpl-mock-{n}"),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": 0, "completion_tokens": 7, "total_tokens": 7},
            "mock": {
                "credential_id": id,
                "request_bytes": body.len(),
                "request_fnv1a": checksum,
            },
        }),
    );
    let headers = response.headers_mut();
    headers.insert("x-mock-request-bytes", HeaderValue::from(body.len()));
    if let Ok(value) = HeaderValue::from_str(&checksum) {
        headers.insert("x-mock-request-fnv1a", value);
    }
    if let Ok(value) = HeaderValue::from_str(id) {
        headers.insert("x-mock-credential-id", value);
    }
    response
}

async fn token<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let counters = &shared.counters;
    counters.token_requests.bump();
    let (parts, body) = req.into_parts();
    let bytes = match read_body(&parts.headers, body, MAX_FORM_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => {
            counters.refresh_failures.bump();
            return response;
        }
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&bytes).into_owned().collect();
    let (latency, injected) = {
        let mut state = shared.lock();
        state.last_token_form = Some(form.clone());
        (state.settings.token_latency, state.injected_failure())
    };
    sleep(latency).await;

    if let Some(status) = injected {
        counters.injected_failures.bump();
        return token_error(
            counters,
            status,
            injected_error(status),
            "Injected failure.",
        );
    }
    let grant = match check_form(&parts.headers, &form) {
        Ok(grant) => grant,
        Err((error, description)) => {
            return token_error(counters, StatusCode::BAD_REQUEST, error, description)
        }
    };
    let redeemed = shared.lock().redeem(grant.refresh_token);
    match redeemed {
        Ok(issued) => {
            counters.refreshes_ok.bump();
            token_response(&issued)
        }
        Err(refused) => {
            counters.invalid_grant.bump();
            token_error(
                counters,
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                refused.description(),
            )
        }
    }
}

struct RefreshGrant<'a> {
    refresh_token: &'a str,
}

/// Checks a refresh grant as RFC 6749 wants it, or says which error to answer.
fn check_form<'f>(
    headers: &HeaderMap,
    form: &'f [(String, String)],
) -> Result<RefreshGrant<'f>, (&'static str, &'static str)> {
    let is_form = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err((
            "invalid_request",
            "The request body must be application/x-www-form-urlencoded.",
        ));
    }
    let field = |name: &str| -> Result<Option<&'f str>, (&'static str, &'static str)> {
        let mut values = form.iter().filter(|(key, _)| key == name);
        let first = values.next().map(|(_, value)| value.as_str());
        if values.next().is_some() {
            return Err(("invalid_request", "A parameter was repeated."));
        }
        Ok(first.filter(|value| !value.is_empty()))
    };
    match field("grant_type")? {
        None => return Err(("invalid_request", "The grant_type parameter is missing.")),
        Some("refresh_token") => {}
        Some(_) => {
            return Err((
                "unsupported_grant_type",
                "Only the refresh_token grant is supported.",
            ))
        }
    }
    if field("client_id")?.is_none() {
        return Err(("invalid_request", "The client_id parameter is missing."));
    }
    match field("refresh_token")? {
        Some(refresh_token) => Ok(RefreshGrant { refresh_token }),
        None => Err(("invalid_request", "The refresh_token parameter is missing.")),
    }
}

/// The RFC 6749 error code that fits an injected failure's status.
fn injected_error(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::UNAUTHORIZED => "invalid_client",
        StatusCode::FORBIDDEN => "access_denied",
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            "temporarily_unavailable"
        }
        _ => "server_error",
    }
}

fn token_response(issued: &Issued) -> Response<Full<Bytes>> {
    let mut body = json!({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in.as_secs(),
    });
    if let (Some(refresh_token), Some(object)) = (&issued.refresh_token, body.as_object_mut()) {
        object.insert("refresh_token".to_owned(), json!(refresh_token));
    }
    no_store(json_response(StatusCode::OK, &body))
}

fn token_error(
    counters: &Counters,
    status: StatusCode,
    error: &str,
    description: &str,
) -> Response<Full<Bytes>> {
    counters.refresh_failures.bump();
    no_store(json_response(
        status,
        &json!({"error": error, "error_description": description}),
    ))
}

fn no_store(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn discovery(shared: &Shared) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": shared.base_url,
            "token_endpoint": format!("{}{TOKEN_PATH}", shared.base_url),
        }),
    )
}

/// Reads a whole body of at most `limit` bytes, or answers 413 (too large) or 400 (broken).
async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Bytes, Response<Full<Bytes>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let too_large = || {
        json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"code": "Payload too large", "error": format!("The request body exceeds {limit} bytes.")}),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
        Err(_) => Err(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"code": "Bad request", "error": "The request body could not be read."}),
        )),
    }
}

fn forbidden(code: &str, error: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::FORBIDDEN,
        &json!({"code": code, "error": error}),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"code": "Method not allowed", "error": format!("Use {allow}.")}),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn sleep(latency: Duration) {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::state::Settings;

    fn shared() -> Shared {
        Shared::new(State::new(Settings::default()), "http://127.0.0.1:1".into())
    }

    fn request(
        method: Method,
        path: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::copy_from_slice(body)));
        *req.method_mut() = method;
        if let Ok(uri) = path.parse() {
            *req.uri_mut() = uri;
        }
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                req.headers_mut().append(name, value);
            }
        }
        req
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn wire_bodies_are_exact() {
        let shared = shared();
        let none = shared.lock().sign_in("none", Account::NoSubscription);
        let broke = shared.lock().sign_in("broke", Account::OutOfCredits);
        let cases = [
            (
                none.access_token,
                r#"{"code":"The caller does not have permission to execute the specified operation","error":"You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com"}"#,
            ),
            (
                broke.access_token,
                r#"{"code":"personal-team-blocked:spending-limit","error":"You have run out of credits or need a Grok subscription..."}"#,
            ),
            (
                "unknown".to_owned(),
                r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#,
            ),
        ];
        for (token, expected) in cases {
            let auth = format!("Bearer {token}");
            let headers: [(&str, &[u8]); 1] = [("authorization", auth.as_bytes())];
            let req = request(Method::POST, CHAT_COMPLETIONS_PATH, &headers, b"{}");
            let response = handle(&shared, req).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(body(response).await, expected);
        }
    }

    /// Method, path, headers, body, expected status.
    type Case<'a> = (
        Method,
        &'a str,
        Vec<(&'a str, &'a [u8])>,
        &'a [u8],
        StatusCode,
    );

    #[tokio::test]
    async fn bad_input_never_panics() {
        let shared = shared();
        let huge = (MAX_FORM_BYTES + 1).to_string();
        let cases: Vec<Case<'_>> = vec![
            (
                Method::POST,
                "/v1/chat/completions",
                vec![("authorization", b"Bearer \xff\xfe")],
                b"\xff",
                StatusCode::FORBIDDEN,
            ),
            (
                Method::POST,
                "/v1/chat/completions",
                vec![("authorization", b"Basic abc")],
                b"",
                StatusCode::UNAUTHORIZED,
            ),
            (
                Method::POST,
                "/v1/chat/completions",
                vec![("authorization", b"Bearer    ")],
                b"",
                StatusCode::UNAUTHORIZED,
            ),
            (
                Method::POST,
                "/v1/chat/completions",
                vec![("authorization", b"bearer")],
                b"",
                StatusCode::UNAUTHORIZED,
            ),
            (
                Method::GET,
                "/v1/models",
                vec![],
                b"",
                StatusCode::UNAUTHORIZED,
            ),
            (
                Method::POST,
                TOKEN_PATH,
                vec![("content-type", b"application/x-www-form-urlencoded")],
                b"\xff\xfe=%ff&&&==",
                StatusCode::BAD_REQUEST,
            ),
            (
                Method::POST,
                TOKEN_PATH,
                vec![("content-type", b"application/x-www-form-urlencoded")],
                b"grant_type=refresh_token&grant_type=refresh_token&client_id=c&refresh_token=r",
                StatusCode::BAD_REQUEST,
            ),
            (
                Method::POST,
                TOKEN_PATH,
                vec![("content-type", b"text/plain")],
                b"grant_type=refresh_token&client_id=c&refresh_token=r",
                StatusCode::BAD_REQUEST,
            ),
            (
                Method::POST,
                TOKEN_PATH,
                vec![("content-type", b"\xff")],
                b"",
                StatusCode::BAD_REQUEST,
            ),
            (
                Method::POST,
                TOKEN_PATH,
                vec![("content-length", huge.as_bytes())],
                b"",
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                Method::GET,
                TOKEN_PATH,
                vec![],
                b"",
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (
                Method::POST,
                DISCOVERY_PATH,
                vec![],
                b"",
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (Method::GET, "/", vec![], b"", StatusCode::NOT_FOUND),
            (Method::GET, "/v1", vec![], b"", StatusCode::NOT_FOUND),
        ];
        for (method, path, headers, body, status) in cases {
            let response = handle(&shared, request(method.clone(), path, &headers, body)).await;
            assert_eq!(response.status(), status, "{method} {path} {headers:?}");
        }
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413() {
        let shared = shared();
        let big = vec![b'x'; MAX_FORM_BYTES + 1];
        let req = request(Method::POST, TOKEN_PATH, &[], &big);
        let response = handle(&shared, req).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(shared.counters.snapshot().refresh_failures, 1);
    }

    #[test]
    fn bearer_parsing() {
        let parse = |value: &'static [u8]| {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(http::header::AUTHORIZATION, value);
            }
            match bearer(&headers) {
                Bearer::Token(token) => Some(token.to_owned()),
                _ => None,
            }
        };
        assert_eq!(parse(b"Bearer abc").as_deref(), Some("abc"));
        assert_eq!(parse(b"BEARER  abc ").as_deref(), Some("abc"));
        assert_eq!(parse(b"Bearerabc"), None);
        assert_eq!(parse(b"Token abc"), None);
    }
}
