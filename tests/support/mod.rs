//! A mock xAI tower service, a counting refresher, test bodies, and the randomized world of the
//! fault and load tests.
#![allow(dead_code, unreachable_pub)]

pub mod chaos;

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
///
/// It also records what it saw and did: the stale access tokens it was asked to replace, every
/// token it issued, and the most calls it ever had running at once.
#[derive(Clone)]
pub struct Refresher {
    pub calls: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
    book: Arc<Mutex<Book>>,
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Book {
    stale: Vec<String>,
    issued: Vec<String>,
}

#[derive(Clone)]
pub enum Behaviour {
    Fresh {
        delay: Duration,
    },
    /// Fresh, after answering `Pending` (waking itself) `polls` times: a refresh that takes a
    /// few polls without any timer.
    Yield {
        polls: usize,
    },
    Transient,
    Terminal,
    Hang,
    Panic,
    Same,
    Invalid,
}

/// Counts one running refresher call until it is dropped.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
            book: Arc::default(),
            active: Arc::default(),
            max_active: Arc::default(),
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The access tokens it was asked to replace, in order.
    pub fn stale_seen(&self) -> Vec<String> {
        self.book.lock().unwrap().stale.clone()
    }

    /// Every access and refresh token it handed out.
    pub fn issued(&self) -> Vec<String> {
        self.book.lock().unwrap().issued.clone()
    }

    /// The most calls that ever ran at once.
    pub fn max_active(&self) -> usize {
        self.max_active.load(Ordering::SeqCst)
    }

    /// Calls running now (created and not yet dropped).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// How many handles on its shared state exist (itself included): back to the baseline once
    /// every refresh task has ended.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.book)
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
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        let active = Active(self.active.clone());
        self.book
            .lock()
            .unwrap()
            .stale
            .push(req.stale().access_token().secret().to_owned());
        let book = self.book.clone();
        Box::pin(async move {
            let id = req.stale().id().to_owned();
            let fresh = |book: &Mutex<Book>| {
                let access = format!("{id}-fresh-{n}");
                let refresh = format!("{id}-refresh-{n}");
                let mut book = book.lock().unwrap();
                book.issued.push(access.clone());
                book.issued.push(refresh.clone());
                Credential::new(id.clone(), access).with_refresh_token(refresh)
            };
            let result = match behaviour {
                Behaviour::Fresh { delay } => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok(fresh(&book))
                }
                Behaviour::Yield { polls } => {
                    for _ in 0..polls {
                        yield_once().await;
                    }
                    Ok(fresh(&book))
                }
                Behaviour::Transient => {
                    Err(RefreshError::transient("token endpoint answered 503").into())
                }
                Behaviour::Terminal => Err(RefreshError::terminal("invalid_grant").into()),
                Behaviour::Hang => std::future::pending().await,
                Behaviour::Panic => {
                    drop(active);
                    panic!("refresher panicked")
                }
                Behaviour::Same => Ok(req.stale().clone()),
                Behaviour::Invalid => Ok(Credential::new(id.clone(), "bad\ntoken")),
            };
            drop(active);
            result
        })
    }
}

/// Answers `Pending` once, waking itself: one trip through the executor, no timer.
pub async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// A service in front of another that makes it take its time: `poll_ready` answers `Pending`
/// (waking) every other time, each call answers `Pending` `polls` times before the inner
/// future runs, and response bodies come in `chunk`-byte frames with a `Pending` before each.
/// It puts an await point at every step of a request's path, without a timer.
#[derive(Clone)]
pub struct Stutter<S> {
    inner: S,
    polls: usize,
    chunk: usize,
    owe_pending: bool,
}

impl<S> Stutter<S> {
    pub fn new(inner: S, polls: usize, chunk: usize) -> Self {
        Self {
            inner,
            polls,
            chunk,
            owe_pending: true,
        }
    }
}

impl<S, Req> Service<Req> for Stutter<S>
where
    S: Service<Req, Response = Response<TestBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<TestBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TestBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.owe_pending {
            self.owe_pending = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let ready = self.inner.poll_ready(cx);
        if ready.is_ready() {
            self.owe_pending = true;
        }
        ready
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let polls = self.polls;
        let chunk = self.chunk;
        let future = self.inner.call(req);
        Box::pin(async move {
            for _ in 0..polls {
                yield_once().await;
            }
            let response = future.await?;
            Ok(response.map(|body| body.stutter(chunk)))
        })
    }
}

/// A small seeded generator (xorshift64*): the same seed, the same draws.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Any seed, zero included: mix it so that it never is zero.
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`0` when `n` is `0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// `true` with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The 64-bit FNV-1a hash, to check bodies byte for byte.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A body made of scripted frames, possibly with an error, delivered one per poll.
///
/// A `slow` body answers `Pending` (waking itself) before every frame, as a body streaming from
/// a network does. A `tracked` body holds a clone of a shared `Arc<()>` until it is dropped, so
/// that a test can count the bodies still alive.
pub struct TestBody {
    frames: VecDeque<Result<Frame<Bytes>, std::io::Error>>,
    hint: Option<http_body::SizeHint>,
    slow: bool,
    owe_pending: bool,
    tracker: Option<Arc<()>>,
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
        Self::from_frames(frames, Some(http_body::SizeHint::with_exact(len)))
    }

    /// `data` cut into `chunk`-sized frames, with no size hint.
    pub fn chunked(data: &[u8], chunk: usize) -> Self {
        let frames = data
            .chunks(chunk.max(1))
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Self::from_frames(frames, None)
    }

    /// `data` cut at the sizes `sizes` gives (each at least 1), with no size hint.
    pub fn split(data: &[u8], mut sizes: impl FnMut() -> usize) -> Self {
        let mut frames = VecDeque::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = sizes().clamp(1, rest.len());
            frames.push_back(Ok(Frame::data(Bytes::copy_from_slice(&rest[..n]))));
            rest = &rest[n..];
        }
        Self::from_frames(frames, None)
    }

    /// Exactly these frames, with this size hint (`None`: the default hint).
    pub fn from_frames(
        frames: VecDeque<Result<Frame<Bytes>, std::io::Error>>,
        hint: Option<http_body::SizeHint>,
    ) -> Self {
        Self {
            frames,
            hint,
            slow: false,
            owe_pending: false,
            tracker: None,
        }
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

    /// Answers `Pending` once before every frame.
    pub fn slow(mut self) -> Self {
        self.slow = true;
        self.owe_pending = true;
        self
    }

    /// Holds a clone of `tracker` while the body lives.
    pub fn tracked(mut self, tracker: &Arc<()>) -> Self {
        self.tracker = Some(tracker.clone());
        self
    }

    /// Cuts the data frames into `chunk`-sized ones and makes the body slow.
    pub fn stutter(mut self, chunk: usize) -> Self {
        let mut frames = VecDeque::new();
        for frame in self.frames.drain(..) {
            match frame {
                Ok(frame) if frame.is_data() => {
                    let data = frame.into_data().unwrap_or_default();
                    for c in data.chunks(chunk.max(1)) {
                        frames.push_back(Ok(Frame::data(Bytes::copy_from_slice(c))));
                    }
                }
                other => frames.push_back(other),
            }
        }
        self.frames = frames;
        self.slow()
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.slow && !self.frames.is_empty() {
            if self.owe_pending {
                self.owe_pending = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.owe_pending = true;
        }
        Poll::Ready(self.frames.pop_front())
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.hint.unwrap_or_default()
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
