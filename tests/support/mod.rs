//! A mock xAI tower service, a counting refresher and test bodies.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{BoxError, Service};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::{Credential, RefreshError, RefreshRequest};

pub const STALE_403: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
pub const ENTITLEMENT_403: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com"}"#;
pub const BILLING_403: &str = r#"{"code":"personal-team-blocked:spending-limit","error":"You have run out of credits or need a Grok subscription..."}"#;
pub const GENERIC_403: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"Forbidden"}"#;

/// What a token gets from the mock API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Stale,
    Entitlement,
    Billing,
    Generic403,
    Empty401,
}

/// One request the mock API received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub authorization: Option<String>,
    pub body: Bytes,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct ApiState {
    answers: HashMap<String, Answer>,
    seen: Vec<Seen>,
}

/// A tower service standing in for xAI's API: answers by the bearer token it gets. Tokens it
/// does not know are stale. It reads the whole request body, echoes it in 200 responses and
/// records every request.
#[derive(Clone, Default)]
pub struct MockApi {
    state: Arc<Mutex<ApiState>>,
    calls: Arc<AtomicUsize>,
    /// Latency of each call: `jitter(call index)`.
    latency: Option<Arc<dyn Fn(usize) -> Duration + Send + Sync>>,
}

impl MockApi {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_latency(mut self, f: impl Fn(usize) -> Duration + Send + Sync + 'static) -> Self {
        self.latency = Some(Arc::new(f));
        self
    }

    pub fn answer(&self, token: &str, answer: Answer) {
        self.state
            .lock()
            .unwrap()
            .answers
            .insert(token.to_owned(), answer);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

impl std::fmt::Debug for MockApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockApi")
            .field("calls", &self.calls())
            .finish()
    }
}

impl Service<Request<RequestBody<TestBody>>> for MockApi {
    type Response = Response<TestBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TestBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<TestBody>>) -> Self::Future {
        let index = self.calls.fetch_add(1, Ordering::SeqCst);
        let state = self.state.clone();
        let delay = self.latency.as_ref().map(|f| f(index));
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let authorization = parts
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_owned());
            let token = authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or("")
                .to_owned();
            let answer = {
                let mut state = state.lock().unwrap();
                state.seen.push(Seen {
                    authorization,
                    body: body.clone(),
                    headers: parts.headers.clone(),
                });
                state.answers.get(&token).copied().unwrap_or(Answer::Stale)
            };
            Ok(respond(answer, body))
        })
    }
}

pub fn respond(answer: Answer, echo: Bytes) -> Response<TestBody> {
    let (status, body) = match answer {
        Answer::Ok => {
            let mut out = b"ok:".to_vec();
            out.extend_from_slice(&echo);
            return Response::new(TestBody::full(out));
        }
        Answer::Stale => (StatusCode::FORBIDDEN, STALE_403),
        Answer::Entitlement => (StatusCode::FORBIDDEN, ENTITLEMENT_403),
        Answer::Billing => (StatusCode::FORBIDDEN, BILLING_403),
        Answer::Generic403 => (StatusCode::FORBIDDEN, GENERIC_403),
        Answer::Empty401 => (StatusCode::UNAUTHORIZED, ""),
    };
    let mut response = Response::new(TestBody::full(body));
    *response.status_mut() = status;
    response
}

/// A refresher that hands out `fresh-1`, `fresh-2`, ... and counts its calls.
#[derive(Clone)]
pub struct Refresher {
    pub calls: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
}

#[derive(Clone)]
pub enum Behaviour {
    Fresh { delay: Duration },
    Transient,
    Terminal,
    Hang,
    Panic,
    Same,
    Invalid,
}

impl Refresher {
    pub fn new() -> Self {
        Self::with(Behaviour::Fresh {
            delay: Duration::ZERO,
        })
    }

    pub fn with(behaviour: Behaviour) -> Self {
        Self {
            calls: Arc::new(AtomicUsize::new(0)),
            behaviour: Arc::new(Mutex::new(behaviour)),
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<RefreshRequest> for Refresher {
    type Response = Credential;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Credential, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: RefreshRequest) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let behaviour = self.behaviour.lock().unwrap().clone();
        Box::pin(async move {
            let id = req.stale().id().to_owned();
            match behaviour {
                Behaviour::Fresh { delay } => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok(Credential::new(id.clone(), format!("{id}-fresh-{n}"))
                        .with_refresh_token(format!("{id}-refresh-{n}")))
                }
                Behaviour::Transient => {
                    Err(RefreshError::transient("token endpoint answered 503").into())
                }
                Behaviour::Terminal => Err(RefreshError::terminal("invalid_grant").into()),
                Behaviour::Hang => std::future::pending().await,
                Behaviour::Panic => panic!("refresher panicked"),
                Behaviour::Same => Ok(req.stale().clone()),
                Behaviour::Invalid => Ok(Credential::new(id, "bad\ntoken")),
            }
        })
    }
}

/// A body made of scripted frames, possibly with an error, delivered one per poll.
pub struct TestBody {
    frames: VecDeque<Result<Frame<Bytes>, std::io::Error>>,
    hint: Option<u64>,
}

impl TestBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        let len = data.len() as u64;
        let frames = if data.is_empty() {
            VecDeque::new()
        } else {
            VecDeque::from([Ok(Frame::data(data))])
        };
        Self {
            frames,
            hint: Some(len),
        }
    }

    /// `data` cut into `chunk`-sized frames, with no size hint.
    pub fn chunked(data: &[u8], chunk: usize) -> Self {
        let frames = data
            .chunks(chunk.max(1))
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Self { frames, hint: None }
    }

    pub fn with_trailers(mut self, trailers: HeaderMap) -> Self {
        self.frames.push_back(Ok(Frame::trailers(trailers)));
        self.hint = None;
        self
    }

    pub fn with_error(mut self) -> Self {
        self.frames
            .push_back(Err(std::io::Error::other("connection reset")));
        self.hint = None;
        self
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.frames.pop_front())
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.hint {
            Some(len) => http_body::SizeHint::with_exact(len),
            None => http_body::SizeHint::default(),
        }
    }
}

/// Reads a whole body: its data, its trailers, and the error it ended with, if any.
pub async fn read_all<B>(body: B) -> (Vec<u8>, Option<HeaderMap>, Option<String>)
where
    B: Body,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(chunk) => {
                    use bytes::Buf;
                    let mut chunk = chunk;
                    while chunk.has_remaining() {
                        let c = chunk.chunk();
                        data.extend_from_slice(c);
                        let n = c.len();
                        chunk.advance(n);
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Err(e) => return (data, trailers, Some(e.to_string())),
        }
    }
    (data, trailers, None)
}

pub fn request(body: impl Into<Bytes>) -> Request<TestBody> {
    Request::post("https://api.x.ai/v1/chat/completions")
        .header("content-type", "application/json")
        .body(TestBody::full(body))
        .unwrap()
}

pub fn infallible<T>(t: T) -> Result<T, Infallible> {
    Ok(t)
}

/// A tracing writer that keeps everything written, for secret-leak checks.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

pub fn tokens_seen(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| s.authorization.clone().unwrap_or_default())
        .collect()
}

pub fn set<T: std::hash::Hash + Eq>(v: impl IntoIterator<Item = T>) -> HashSet<T> {
    v.into_iter().collect()
}
