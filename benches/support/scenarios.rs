//! What the layer benchmarks share: the services, the requests, and the measurements of the
//! layer beside its baselines.
//!
//! Every binary that includes this module counts allocations: [`Alloc`] is its global
//! allocator, so that the layer and its baselines pay the same for each allocation.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{
    Extensions, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait};
use stats_alloc::{Region, StatsAlloc};
use tokio::runtime::Runtime;
use tower::retry::{Policy, Retry};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_http::auth::AddAuthorization;
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::mock::{Account, MockXai};
use xai_oauth_recovery::{
    Credential, Credentials, RefreshBudget, RefreshReason, RefreshRequest, XaiOAuthRecovery,
    XaiOAuthRecoveryLayer,
};

static STATS: StatsAlloc<std::alloc::System> = StatsAlloc::system();

/// Counts allocations (through [`STATS`]) and peak live bytes.
#[global_allocator]
pub(crate) static ALLOC: PeakMemAlloc<&StatsAlloc<std::alloc::System>> = PeakMemAlloc::new(&STATS);

/// xAI's 403 for a stale access token, as it comes on the wire.
const STALE_BODY: &[u8] = include_bytes!("../../examples/bodies/stale.json");
/// A small chat completion request.
const CHAT: &[u8] = br#"{"model":"grok-4","messages":[{"role":"user","content":"Say hi."}]}"#;
const TOKEN: &str = "fresh-0";
const STALE: &str = "stale";

/// A runtime on the current thread: the measurements see one core, without stealing.
pub(crate) fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|error| panic!("tokio runtime: {error}"))
}

/// The inner service of the in-process scenarios: reads the request body (it is in memory),
/// then answers a ready 200, or xAI's stale-token 403 when the request carries the stale token.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Inner;

impl<B: Body + Unpin> Service<Request<B>> for Inner {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let stale = request.headers().get(AUTHORIZATION).is_some_and(|value| {
            value.as_bytes().strip_prefix(b"Bearer ") == Some(STALE.as_bytes())
        });
        let mut body = request.into_body();
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => drop(black_box(frame)),
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(_))) | Poll::Pending => panic!("the body is in memory"),
            }
        }
        let response = if stale {
            let mut response = Response::new(Full::new(Bytes::from_static(STALE_BODY)));
            *response.status_mut() = StatusCode::FORBIDDEN;
            response
        } else {
            Response::new(Full::default())
        };
        ready(Ok(response))
    }
}

/// A refresher that answers at once with a new token, and counts its calls.
#[derive(Clone, Debug, Default)]
pub(crate) struct Refresher {
    calls: Arc<AtomicU64>,
}

impl Refresher {
    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Service<RefreshRequest> for Refresher {
    type Response = Credential;
    type Error = BoxError;
    type Future = Ready<Result<Credential, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RefreshRequest) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let id = request.stale().id();
        ready(Ok(Credential::new(id, format!("fresh-{n}"))))
    }
}

/// The layer over `inner`, with a budget that never runs out: the benchmarks refresh often.
pub(crate) fn layered<S>(
    inner: S,
    credentials: &Credentials,
    refresher: &Refresher,
) -> XaiOAuthRecovery<S, Refresher> {
    XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .refresh_budget(RefreshBudget::new(u32::MAX, Duration::ZERO))
        .layer(inner)
}

/// The request every scenario sends: a small JSON POST, built the same way for every service.
pub(crate) fn request(uri: &Uri) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(Bytes::from_static(CHAT)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri.clone();
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    request
}

fn uri() -> Uri {
    Uri::from_static("https://api.x.ai/v1/chat/completions")
}

/// Readies `service`, calls it and polls the response future once: every service of the
/// happy path answers at once. The response is dropped, as the caller would drop it.
fn call_now<S, B, RB>(service: &mut S, request: Request<B>) -> StatusCode
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        other => panic!("service not ready: {other:?}"),
    }
    let future = pin!(service.call(request));
    match future.poll(&mut cx) {
        Poll::Ready(Ok(response)) => response.status(),
        Poll::Ready(Err(error)) => panic!("service failed: {error:?}"),
        Poll::Pending => panic!("service did not answer at once"),
    }
}

/// tower's retry policy at its cheapest: it keeps a clone of every request (`clone_request`)
/// and never retries. What an eager retry pays on the 2xx path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CloneEveryRequest;

impl<B: Clone, Res, E> Policy<Request<B>, Res, E> for CloneEveryRequest {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Request<B>, _: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        Some(request.clone())
    }
}

/// `Authorization: Bearer <token>`, sensitive, as `AddAuthorization::bearer` builds it.
fn sensitive_bearer(token: &str) -> HeaderValue {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|error| panic!("header: {error}"));
    value.set_sensitive(true);
    value
}

/// The least that a layer able to replay a streaming request does on the 2xx path, written
/// plainly: `AddAuthorization`'s header, one clock read against the credential's expiry, the
/// request's head kept (method, URI, version, extensions and up to four headers, inline), and
/// the body's chunks recorded as they stream, into a cell that the response future shares. It
/// never retries: it is a baseline, what any such design pays before its own costs.
pub(crate) struct ReplayFloor<S> {
    inner: S,
    header: HeaderValue,
    expires: tokio::time::Instant,
}

type FloorHeaders = [Option<(HeaderName, HeaderValue)>; 4];

/// What [`ReplayFloor`] keeps of a request.
struct FloorKept {
    /// Kept for a retry that this baseline never makes.
    _head: (Method, Uri, Version, FloorHeaders, Extensions),
    first: Option<Bytes>,
    rest: Vec<Bytes>,
}

/// A body recorded into a cell shared with the response future.
pub(crate) struct FloorBody<B> {
    body: B,
    kept: Arc<Mutex<FloorKept>>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for FloorBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            let mut kept = this.kept.lock().unwrap_or_else(PoisonError::into_inner);
            match kept.first {
                None => kept.first = Some(data.clone()),
                Some(_) => kept.rest.push(data.clone()),
            }
        }
        Poll::Ready(frame)
    }
}

/// The response future of [`ReplayFloor`]: it holds the recording until the response is in.
pub(crate) struct FloorFuture<F> {
    future: F,
    kept: Arc<Mutex<FloorKept>>,
}

impl<F: Future + Unpin> Future for FloorFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let output = std::task::ready!(Pin::new(&mut self.future).poll(cx));
        // `cargo test --benches` checks that the baseline does the work it stands for.
        debug_assert!(self
            .kept
            .lock()
            .is_ok_and(|kept| kept.first.as_deref() == Some(CHAT)));
        Poll::Ready(output)
    }
}

impl<S, B> Service<Request<B>> for ReplayFloor<S>
where
    S: Service<Request<FloorBody<B>>>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = FloorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let ahead = Duration::from_secs(300);
        black_box(tokio::time::Instant::now() + ahead >= self.expires);
        request
            .headers_mut()
            .insert(AUTHORIZATION, self.header.clone());
        let mut headers = FloorHeaders::default();
        let others = request
            .headers()
            .iter()
            .filter(|(n, _)| *n != AUTHORIZATION);
        for (slot, (name, value)) in headers.iter_mut().zip(others) {
            *slot = Some((name.clone(), value.clone()));
        }
        let head = (
            request.method().clone(),
            request.uri().clone(),
            request.version(),
            headers,
            request.extensions().clone(),
        );
        let kept = Arc::new(Mutex::new(FloorKept {
            _head: head,
            first: None,
            rest: Vec::new(),
        }));
        let body_kept = Arc::clone(&kept);
        let request = request.map(|body| FloorBody {
            body,
            kept: body_kept,
        });
        FloorFuture {
            future: self.inner.call(request),
            kept,
        }
    }
}

/// The happy path: one 2xx request with a small body, through the layer and its baselines.
pub(crate) struct Happy {
    uri: Uri,
    bare: Inner,
    add_authorization: AddAuthorization<Inner>,
    layer: XaiOAuthRecovery<Inner, Refresher>,
    eager_retry: Retry<CloneEveryRequest, AddAuthorization<Inner>>,
    replay_floor: ReplayFloor<Inner>,
}

impl Happy {
    /// The services, in the order [`Happy::run`] numbers them.
    pub(crate) const NAMES: [&'static str; 5] = [
        "bare",
        "add_authorization",
        "layer",
        "add_authorization_eager_retry",
        "replay_floor",
    ];
}

impl Happy {
    pub(crate) fn new() -> Self {
        // An OAuth access token has an expiry: the layer checks it on every request.
        let expires = std::time::SystemTime::now() + Duration::from_secs(3600);
        let credential = Credential::new("default", TOKEN).with_expires_at(expires);
        let credentials = Credentials::new(credential);
        let happy = Self {
            uri: uri(),
            bare: Inner,
            add_authorization: AddAuthorization::bearer(Inner, TOKEN),
            layer: layered(Inner, &credentials, &Refresher::default()),
            eager_retry: Retry::new(CloneEveryRequest, AddAuthorization::bearer(Inner, TOKEN)),
            replay_floor: ReplayFloor {
                inner: Inner,
                header: sensitive_bearer(TOKEN),
                expires: tokio::time::Instant::now() + Duration::from_secs(3600),
            },
        };
        // Promote the shared header values once, as a running client has.
        let mut happy = happy;
        (0..Self::NAMES.len()).for_each(|i| {
            happy.run(i);
        });
        happy
    }

    /// One request through the service numbered 0 (bare), 1 (`AddAuthorization`), 2 (the
    /// layer), 3 (`AddAuthorization` under tower's retry, cloning every request) or 4 (the
    /// replay floor).
    pub(crate) fn run(&mut self, which: usize) -> StatusCode {
        let request = request(&self.uri);
        let status = match which {
            0 => call_now(&mut self.bare, black_box(request)),
            1 => call_now(&mut self.add_authorization, black_box(request)),
            2 => call_now(&mut self.layer, black_box(request)),
            3 => call_now(&mut self.eager_retry, black_box(request)),
            _ => call_now(&mut self.replay_floor, black_box(request)),
        };
        debug_assert_eq!(status, StatusCode::OK);
        status
    }

    /// Heap allocations per request of each service, in the order of [`Happy::NAMES`].
    pub(crate) fn allocations(&mut self) -> [f64; 5] {
        const N: usize = 10_000;
        [0, 1, 2, 3, 4].map(|which| {
            let region = Region::new(&STATS);
            for _ in 0..N {
                black_box(self.run(which));
            }
            region.change().allocations as f64 / N as f64
        })
    }
}

/// The recovery path: a stale 403, a refresh by an instant refresher, the retry.
pub(crate) struct Recovery {
    uri: Uri,
    credentials: Credentials,
    refresher: Refresher,
    layer: XaiOAuthRecovery<Inner, Refresher>,
    stale_header: HeaderValue,
    fresh_header: HeaderValue,
}

impl Recovery {
    pub(crate) fn new() -> Self {
        let credentials = Credentials::new(Credential::new("default", STALE));
        let refresher = Refresher::default();
        let layer = layered(Inner, &credentials, &refresher);
        Self {
            uri: uri(),
            credentials,
            refresher,
            layer,
            stale_header: sensitive_bearer(STALE),
            fresh_header: sensitive_bearer(TOKEN),
        }
    }

    /// One recovered request through the layer.
    pub(crate) async fn layer(&mut self) -> StatusCode {
        self.credentials.insert(Credential::new("default", STALE));
        let service = ServiceExt::<Request<Full<Bytes>>>::ready(&mut self.layer)
            .await
            .unwrap_or_else(|e| panic!("ready: {e}"));
        let response = service
            .call(request(&self.uri))
            .await
            .unwrap_or_else(|e| panic!("call: {e}"));
        debug_assert!(response
            .extensions()
            .get::<xai_oauth_recovery::RecoveryReport>()
            .is_some());
        response.status()
    }

    /// What the recovery costs without the layer: two calls of the inner service (the first
    /// one's 403 body read) and one refresher call.
    pub(crate) async fn baseline(&mut self) -> StatusCode {
        self.credentials.insert(Credential::new("default", STALE));
        let mut inner = Inner;
        let mut first = request(&self.uri);
        first
            .headers_mut()
            .insert(AUTHORIZATION, self.stale_header.clone());
        let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut inner)
            .await
            .unwrap_or_else(|e| match e {})
            .call(first)
            .await;
        let body = response
            .unwrap_or_else(|e| match e {})
            .into_body()
            .collect()
            .await;
        black_box(body.map(|b| b.to_bytes()).unwrap_or_else(|e| match e {}));
        let stale = self.credentials.default_credential();
        let request_refresh = RefreshRequest::new(stale, RefreshReason::ExpiresSoon);
        let mut refresher = self.refresher.clone();
        let fresh = refresher
            .ready()
            .await
            .unwrap_or_else(|e| panic!("ready: {e}"));
        black_box(
            fresh
                .call(request_refresh)
                .await
                .unwrap_or_else(|e| panic!("refresh: {e}")),
        );
        let mut second = request(&self.uri);
        second
            .headers_mut()
            .insert(AUTHORIZATION, self.fresh_header.clone());
        let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut inner)
            .await
            .unwrap_or_else(|e| match e {})
            .call(second)
            .await;
        response.unwrap_or_else(|e| match e {}).status()
    }
}

/// The storm: many concurrent requests on one stale credential, beside as many plain ones.
pub(crate) struct Storm {
    uri: Uri,
    credentials: Credentials,
    refresher: Refresher,
    layer: XaiOAuthRecovery<Inner, Refresher>,
}

impl Storm {
    pub(crate) const REQUESTS: usize = 10_000;

    pub(crate) fn new() -> Self {
        let credentials = Credentials::new(Credential::new("default", TOKEN));
        let refresher = Refresher::default();
        let layer = layered(Inner, &credentials, &refresher);
        Self {
            uri: uri(),
            credentials,
            refresher,
            layer,
        }
    }

    /// Sends [`Storm::REQUESTS`] requests at once through the layer, on a stale credential
    /// when `stale`, and returns how many times the refresher was called. The requests run in
    /// one task (`join_all`), or in a task each when `tasks`.
    pub(crate) async fn run(&mut self, stale: bool, tasks: bool) -> u64 {
        let token = if stale { STALE } else { TOKEN };
        self.credentials.insert(Credential::new("default", token));
        let before = self.refresher.calls();
        let requests = (0..Self::REQUESTS).map(|_| self.layer.clone().oneshot(request(&self.uri)));
        let responses = if tasks {
            let tasks: Vec<_> = requests.map(tokio::spawn).collect();
            let mut responses = Vec::with_capacity(tasks.len());
            for task in tasks {
                responses.push(task.await.unwrap_or_else(|e| panic!("task: {e}")));
            }
            responses
        } else {
            join_all(requests).await
        };
        for response in responses {
            let response = response.unwrap_or_else(|e| panic!("call: {e}"));
            assert_eq!(response.status(), StatusCode::OK);
        }
        self.refresher.calls() - before
    }
}

/// The client side of the loopback scenario: hyper-util's client, with and without the layer,
/// against the mock of xAI on 127.0.0.1.
pub(crate) struct Loopback {
    /// Keeps the server up.
    _xai: MockXai,
    uri: Uri,
    header: HeaderValue,
    plain: Client<HttpConnector, Full<Bytes>>,
    layer: XaiOAuthRecovery<Client<HttpConnector, RequestBody<Full<Bytes>>>, Refresher>,
}

impl Loopback {
    pub(crate) async fn start() -> Self {
        let xai = MockXai::start()
            .await
            .unwrap_or_else(|error| panic!("mock: {error}"));
        let credential = xai.sign_in("alice", Account::Subscribed);
        let header = sensitive_bearer(credential.access_token().secret());
        let plain = Client::builder(TokioExecutor::new()).build_http();
        let api = Client::builder(TokioExecutor::new()).build_http();
        let layer = layered(api, &Credentials::new(credential), &Refresher::default());
        let mut loopback = Self {
            uri: xai.chat_completions_uri(),
            _xai: xai,
            header,
            plain,
            layer,
        };
        // Open the connections (one each, kept alive).
        for _ in 0..3 {
            loopback.run(false).await;
            loopback.run(true).await;
        }
        loopback
    }

    /// One request and its whole response body, through the layer when `layer`.
    pub(crate) async fn run(&mut self, layer: bool) -> usize {
        let request = request(&self.uri);
        let response = if layer {
            let service = self
                .layer
                .ready()
                .await
                .unwrap_or_else(|e| panic!("ready: {e}"));
            let response = service
                .call(request)
                .await
                .unwrap_or_else(|e| panic!("call: {e}"));
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await;
            body.unwrap_or_else(|e| panic!("body: {e}")).to_bytes()
        } else {
            let mut request = request;
            request
                .headers_mut()
                .insert(AUTHORIZATION, self.header.clone());
            let response = self
                .plain
                .request(request)
                .await
                .unwrap_or_else(|e| panic!("call: {e}"));
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await;
            body.unwrap_or_else(|e| panic!("body: {e}")).to_bytes()
        };
        response.len()
    }
}

/// A body of `len` bytes that streams in freshly allocated 64 KiB chunks, with no size hint.
pub(crate) struct Stream {
    left: u64,
}

impl Stream {
    const CHUNK: usize = 64 * 1024;

    pub(crate) fn new(len: u64) -> Self {
        Self { left: len }
    }
}

impl Body for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(Self::CHUNK as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n as usize])))))
    }
}

/// An inner service that answers 403 with a streaming body of `len` bytes, without a
/// `Content-Length`, or reads the whole request body and answers 200 when `len` is zero.
#[derive(Clone, Copy, Debug)]
struct Big {
    len: u64,
}

impl<B> Service<Request<B>> for Big
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    type Response = Response<http_body_util::Either<Stream, Empty<Bytes>>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let len = self.len;
        Box::pin(async move {
            if len > 0 {
                let mut response = Response::new(http_body_util::Either::Left(Stream::new(len)));
                *response.status_mut() = StatusCode::FORBIDDEN;
                return Ok(response);
            }
            let mut body = pin!(request.into_body());
            while let Some(frame) = body.frame().await {
                black_box(frame.map_err(|_| "request body failed")?);
            }
            Ok(Response::new(http_body_util::Either::Right(Empty::new())))
        })
    }
}

/// Peak growth of live heap bytes while a 1 GiB streaming 403 body, then a 1 GiB streaming
/// request body, go through the layer (default limits: 64 KiB of error body, 1 MiB of replay).
pub(crate) fn memory(rt: &Runtime) -> [(&'static str, usize); 2] {
    const GIB: u64 = 1 << 30;
    let credentials = Credentials::new(Credential::new("default", TOKEN));
    let refresher = Refresher::default();
    let response = rt.block_on(async {
        let mut layer = layered(Big { len: GIB }, &credentials, &refresher);
        ALLOC.reset_peak_memory();
        let service = ServiceExt::<Request<Full<Bytes>>>::ready(&mut layer)
            .await
            .unwrap_or_else(|e| panic!("ready: {e}"));
        let response = service
            .call(request(&uri()))
            .await
            .unwrap_or_else(|e| panic!("call: {e}"));
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let mut body = pin!(response.into_body());
        let mut read = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap_or_else(|e| panic!("body: {e}"));
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        assert_eq!(read, GIB);
        ALLOC.get_peak_memory()
    });
    let request = rt.block_on(async {
        let mut layer = layered(Big { len: 0 }, &credentials, &refresher);
        ALLOC.reset_peak_memory();
        let service = ServiceExt::<Request<Stream>>::ready(&mut layer)
            .await
            .unwrap_or_else(|e| panic!("ready: {e}"));
        let mut request = request(&uri()).map(|_| Stream::new(GIB));
        request.headers_mut().remove(CONTENT_TYPE);
        let response = service
            .call(request)
            .await
            .unwrap_or_else(|e| panic!("call: {e}"));
        assert_eq!(response.status(), StatusCode::OK);
        ALLOC.get_peak_memory()
    });
    [
        ("1 GiB 403 body", response),
        ("1 GiB request body", request),
    ]
}
