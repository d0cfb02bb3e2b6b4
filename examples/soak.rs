//! A soak test: randomized load through `XaiOAuthRecoveryLayer` over real HTTP, against the
//! mock of xAI on 127.0.0.1, with `OAuth2Refresher` refreshing at the mock's token endpoint,
//! while faults are injected all the time.
//!
//! ```text
//! cargo run --release --example soak -- --seconds 60 --concurrency 64 --seed 7
//! ```
//!
//! `--concurrency` workers send requests one after the other (random credential, random body
//! of up to 32 KiB in random frames, a few cancelled on purpose) for `--seconds`, while a
//! chaos task makes access tokens stale, revokes refresh tokens and signs the accounts in
//! again, makes the token endpoint fail at random or on purpose, slows it down, makes
//! refreshes hand out tokens that keep failing, and lapses subscriptions and credits.
//!
//! It checks, and counts:
//! - every request ends exactly once, within a generous deadline (else it is a hang);
//! - every 200 echoes the checksum of the body that was sent, from the credential it was sent
//!   with; every 403 is one of xAI's three wire bodies, whole, and its `RecoveryReport` agrees;
//! - no request reaches the API more than twice, and exactly twice when it was retried;
//! - refresher calls never overlap on a credential, never replace a token twice, and stay
//!   within the refresh budget in every window;
//! - nothing panics, on any thread;
//! - no token shows in the tracing output, captured at TRACE level and scanned as it is
//!   written for every token the mock issues.
//!
//! It prints the counts and exits 0 when every check holds, 1 otherwise, 2 on bad arguments.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Layer, Service, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::mock::{fnv1a_64, Account, MockXai};
use xai_oauth_recovery::{
    Credential, CredentialId, Credentials, OAuth2Refresher, RecoveryReport, RefreshBudget,
    RefreshError, RefreshRequest, Verdict, XaiOAuthRecovery, XaiOAuthRecoveryLayer,
};

const USAGE: &str =
    "usage: cargo run --release --example soak -- [--seconds N] [--concurrency N] [--seed N]";

/// The accounts, by credential id.
const IDS: [&str; 4] = ["default", "alice", "bob", "carol"];
/// The refresh budget per credential.
const BUDGET: RefreshBudget = RefreshBudget::new(60, Duration::from_secs(60));
/// How long the layer waits for a refresh.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// A request not finished by then is a hang.
const DEADLINE: Duration = Duration::from_secs(60);
/// Request bodies up to this size are replayable; bodies go up to twice that.
const MAX_REPLAY: usize = 16 * 1024;

const STALE: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
const ENTITLEMENT: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com"}"#;
const BILLING: &str = r#"{"code":"personal-team-blocked:spending-limit","error":"You have run out of credits or need a Grok subscription..."}"#;

/// Every token the mock issues starts with one of these.
const TOKEN_PREFIXES: [&str; 2] = ["mock-at-", "mock-rt-"];

struct Args {
    seconds: f64,
    concurrency: usize,
    seed: u64,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        seconds: 10.0,
        concurrency: 64,
        seed: 1,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                parsed.seconds = value("--seconds")?
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or("--seconds wants a positive number")?
            }
            "--concurrency" => {
                parsed.concurrency = value("--concurrency")?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--concurrency wants a positive integer")?
            }
            "--seed" => {
                parsed.seed = value("--seed")?
                    .parse()
                    .map_err(|_| "--seed wants an integer")?
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    Ok(Some(parsed))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("soak: {problem}; {USAGE}");
            return ExitCode::from(2);
        }
    };
    count_panics();
    let leaks = Leaks::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(leaks.clone())
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("soak: cannot install the tracing subscriber");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("soak: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(soak(&args, &leaks)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak: {error}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Panics and leaks

static PANICS: AtomicU64 = AtomicU64::new(0);

fn count_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
}

/// The tracing writer: scans every event for tokens as it is written, keeps nothing else.
#[derive(Clone, Default)]
struct Leaks(Arc<LeakBook>);

#[derive(Default)]
struct LeakBook {
    lines: AtomicU64,
    bytes: AtomicU64,
    leaked: AtomicU64,
    first: Mutex<Option<String>>,
}

/// One event's output, scanned when the event is written out.
struct LeakWriter {
    book: Arc<LeakBook>,
    buffer: Vec<u8>,
}

impl io::Write for LeakWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LeakWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buffer);
        let book = &self.book;
        book.lines
            .fetch_add(text.lines().count() as u64, Ordering::Relaxed);
        book.bytes
            .fetch_add(self.buffer.len() as u64, Ordering::Relaxed);
        let leaks = TOKEN_PREFIXES
            .iter()
            .map(|prefix| text.matches(prefix).count() as u64)
            .sum::<u64>();
        if leaks > 0 {
            book.leaked.fetch_add(leaks, Ordering::SeqCst);
            let mut first = book.first.lock().unwrap_or_else(PoisonError::into_inner);
            first.get_or_insert_with(|| text.trim_end().to_owned());
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Leaks {
    type Writer = LeakWriter;

    fn make_writer(&'a self) -> LeakWriter {
        LeakWriter {
            book: self.0.clone(),
            buffer: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness

/// xorshift64*: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

// ---------------------------------------------------------------------------------------------
// The request body: random bytes in random frames

#[derive(Default)]
struct Chunks(VecDeque<Bytes>);

impl Chunks {
    fn new(data: &Bytes, rng: &mut Rng) -> Self {
        let mut chunks = VecDeque::new();
        let mut at = 0;
        while at < data.len() {
            let n = (1 + rng.below(4096) as usize).min(data.len() - at);
            chunks.push_back(data.slice(at..at + n));
            at += n;
        }
        Self(chunks)
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Watching the inner service and the refresher

type Http = Client<HttpConnector, RequestBody<Chunks>>;
type TokenHttp = Client<HttpConnector, Full<Bytes>>;
type OAuth2 = OAuth2Refresher<TokenHttp, Full<Bytes>>;
type Soaked = XaiOAuthRecovery<Counted, Watched>;

/// The HTTP client, counting the calls each request makes (by its `x-soak-request` header).
#[derive(Clone)]
struct Counted {
    http: Http,
    calls: Arc<Mutex<HashMap<u64, u8>>>,
}

impl Service<Request<RequestBody<Chunks>>> for Counted {
    type Response = <Http as Service<Request<RequestBody<Chunks>>>>::Response;
    type Error = <Http as Service<Request<RequestBody<Chunks>>>>::Error;
    type Future = <Http as Service<Request<RequestBody<Chunks>>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody<Chunks>>) -> Self::Future {
        let id = request
            .headers()
            .get("x-soak-request")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        *lock(&self.calls).entry(id).or_default() += 1;
        self.http.call(request)
    }
}

/// The refresher, watched: calls per credential and when, calls running, tokens replaced.
#[derive(Clone)]
struct Watched {
    inner: OAuth2,
    book: Arc<Mutex<RefreshBook>>,
}

#[derive(Default)]
struct RefreshBook {
    calls: HashMap<String, Vec<Instant>>,
    running: HashMap<String, u32>,
    replaced: HashSet<String>,
    ok: u64,
    failed: u64,
    violations: Vec<String>,
}

/// Counts a refresher call as running until dropped.
struct Running {
    book: Arc<Mutex<RefreshBook>>,
    id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.book).running.get_mut(&self.id) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Service<RefreshRequest> for Watched {
    type Response = Credential;
    type Error = RefreshError;
    type Future = Pin<Box<dyn Future<Output = Result<Credential, RefreshError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RefreshError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: RefreshRequest) -> Self::Future {
        let id = request.stale().id().to_owned();
        let stale = request.stale().access_token().secret().to_owned();
        {
            let mut book = lock(&self.book);
            book.calls
                .entry(id.clone())
                .or_default()
                .push(Instant::now());
            let running = book.running.entry(id.clone()).or_default();
            *running += 1;
            if *running > 1 {
                let running = *running;
                book.violations
                    .push(format!("{running} refresher calls at once for `{id}`"));
            }
            if book.replaced.contains(&stale) {
                book.violations.push(format!(
                    "`{id}`: a token already replaced was refreshed again"
                ));
            }
        }
        let running = Running {
            book: self.book.clone(),
            id,
        };
        let book = self.book.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let mut book = lock(&book);
            match &result {
                Ok(_) => {
                    book.ok += 1;
                    book.replaced.insert(stale);
                }
                Err(_) => book.failed += 1,
            }
            drop(book);
            drop(running);
            result
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    ended: AtomicU64,
    ok: AtomicU64,
    forbidden: AtomicU64,
    retried: AtomicU64,
    cancelled: AtomicU64,
    errors: AtomicU64,
    hangs: AtomicU64,
    bodies_verified: AtomicU64,
    chaos: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

struct Soak {
    xai: MockXai,
    svc: Soaked,
    credentials: Credentials,
    counts: Counts,
    /// Inner calls per request in flight, from `Counted`.
    calls: Arc<Mutex<HashMap<u64, u8>>>,
    refreshes: Arc<Mutex<RefreshBook>>,
    violations: Mutex<Vec<String>>,
    stop: AtomicBool,
    next_id: AtomicU64,
}

impl Soak {
    fn violation(&self, what: String) {
        lock(&self.violations).push(what);
    }

    /// Ends request `id`: it made at most two inner calls, and exactly as many as its outcome
    /// says when it has one (`None`: cancelled, failed or hung).
    fn finish(&self, id: u64, implied: Option<u8>) {
        let calls = lock(&self.calls).remove(&id).unwrap_or(0);
        if calls > 2 {
            self.violation(format!("request {id}: {calls} inner calls"));
        }
        if let Some(implied) = implied.filter(|&n| n != calls) {
            self.violation(format!(
                "request {id}: {calls} inner calls, its outcome says {implied}"
            ));
        }
    }
}

async fn soak(args: &Args, leaks: &Leaks) -> Result<bool, BoxError> {
    let started = Instant::now();
    let xai = MockXai::builder()
        .seed(args.seed)
        .access_token_ttl(Duration::from_secs(20 * 60))
        .start()
        .await?;
    let credentials = Credentials::new(xai.sign_in(IDS[0], Account::Subscribed));
    for id in &IDS[1..] {
        credentials.insert(xai.sign_in(id, Account::Subscribed));
    }
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let refreshes = Arc::new(Mutex::new(RefreshBook::default()));
    let token_http: TokenHttp = Client::builder(TokioExecutor::new()).build_http();
    let refresher = Watched {
        inner: OAuth2Refresher::new(token_http, xai.token_endpoint(), "soak")
            .allow_insecure_loopback()
            .timeout(Duration::from_secs(2)),
        book: refreshes.clone(),
    };
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher)
        .refresh_budget(BUDGET)
        .refresh_timeout(REFRESH_TIMEOUT)
        .max_replay_body_bytes(MAX_REPLAY)
        .layer(Counted {
            http,
            calls: calls.clone(),
        });
    let soak = Arc::new(Soak {
        xai,
        svc,
        credentials,
        counts: Counts::default(),
        calls,
        refreshes,
        violations: Mutex::default(),
        stop: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
    });

    let duration = Duration::from_secs_f64(args.seconds);
    let chaos = tokio::spawn(chaos(soak.clone(), args.seed));
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let seed = args.seed ^ (worker as u64 + 1).wrapping_mul(0x5851_f42d_4c95_7f2d);
        workers.push(tokio::spawn(work(soak.clone(), seed)));
    }
    tokio::time::sleep(duration).await;
    soak.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        if let Err(error) = worker.await {
            soak.violation(format!("a worker ended badly: {error}"));
        }
    }
    if let Err(error) = chaos.await {
        soak.violation(format!("the chaos task ended badly: {error}"));
    }
    let elapsed = started.elapsed();
    check_refreshes(&soak);

    let stats = soak.xai.stats();
    let book = lock(&soak.refreshes);
    let counts = &soak.counts;
    let refresher_calls: usize = book.calls.values().map(Vec::len).sum();
    let faults = get(&counts.chaos) + stats.injected_failures + get(&counts.cancelled);
    let panics = PANICS.load(Ordering::SeqCst);
    let hangs = get(&counts.hangs);
    let leaked = leaks.0.leaked.load(Ordering::SeqCst);
    let mut violations = lock(&soak.violations).clone();
    violations.extend(book.violations.iter().cloned());
    if get(&counts.requests) != get(&counts.ended) {
        violations.push(format!(
            "{} requests started, {} ended",
            get(&counts.requests),
            get(&counts.ended)
        ));
    }

    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        out,
        "soak: {:.1} s, seed {}, concurrency {}, machine: {cores} cores",
        elapsed.as_secs_f64(),
        args.seed,
        args.concurrency
    )?;
    writeln!(
        out,
        "requests         {:>9}  ({} 200, {} 403, {} retried, {} cancelled on purpose, {} errors)",
        get(&counts.requests),
        get(&counts.ok),
        get(&counts.forbidden),
        get(&counts.retried),
        get(&counts.cancelled),
        get(&counts.errors),
    )?;
    writeln!(
        out,
        "faults injected  {faults:>9}  ({} chaos acts, {} token endpoint failures, {} cancellations)",
        get(&counts.chaos),
        stats.injected_failures,
        get(&counts.cancelled),
    )?;
    writeln!(
        out,
        "refresher calls  {refresher_calls:>9}  ({} ok, {} failed; the token endpoint saw {})",
        book.ok, book.failed, stats.token_requests
    )?;
    writeln!(out, "bodies verified  {:>9}", get(&counts.bodies_verified))?;
    writeln!(out, "panics           {panics:>9}")?;
    writeln!(out, "hangs            {hangs:>9}")?;
    writeln!(
        out,
        "tokens leaked    {leaked:>9}  ({} log lines, {} bytes scanned at TRACE level)",
        leaks.0.lines.load(Ordering::Relaxed),
        leaks.0.bytes.load(Ordering::Relaxed)
    )?;
    let ok = violations.is_empty() && panics == 0 && hangs == 0 && leaked == 0;
    writeln!(
        out,
        "invariants       {:>9}",
        if ok { "hold" } else { "BROKEN" }
    )?;
    io::stdout().lock().write_all(out.as_bytes())?;
    if !ok {
        let mut stderr = io::stderr().lock();
        for violation in violations.iter().take(20) {
            writeln!(stderr, "soak: {violation}")?;
        }
        if violations.len() > 20 {
            writeln!(stderr, "soak: ... and {} more", violations.len() - 20)?;
        }
        if let Some(line) = lock(&leaks.0.first).as_ref() {
            writeln!(stderr, "soak: a token leaked in: {line}")?;
        }
    }
    Ok(ok)
}

/// One worker: sends requests one after the other until told to stop.
async fn work(soak: Arc<Soak>, seed: u64) {
    let mut rng = Rng::new(seed);
    while !soak.stop.load(Ordering::SeqCst) {
        let id = soak.next_id.fetch_add(1, Ordering::SeqCst);
        let credential = IDS[rng.below(IDS.len() as u64) as usize];
        let len = match rng.below(10) {
            0 => 0,
            1 => MAX_REPLAY + rng.below(MAX_REPLAY as u64) as usize,
            _ => rng.below(4096) as usize,
        };
        let mut body = Vec::with_capacity(len);
        while body.len() < len {
            body.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        body.truncate(len);
        let body = Bytes::from(body);
        let mut request = Request::post(soak.xai.chat_completions_uri())
            .header("content-type", "application/json")
            .header("x-soak-request", id)
            .body(Chunks::new(&body, &mut rng))
            .unwrap_or_default();
        request
            .extensions_mut()
            .insert(CredentialId::new(credential));
        let cancel = rng
            .chance(30)
            .then(|| Duration::from_micros(rng.below(20_000)));

        bump(&soak.counts.requests);
        let svc = soak.svc.clone();
        let send = async move {
            let response = svc.oneshot(request).await?;
            let (parts, body) = response.into_parts();
            let data = body.collect().await?.to_bytes();
            Ok::<_, BoxError>((parts, data))
        };
        let deadline = cancel.unwrap_or(DEADLINE);
        match tokio::time::timeout(deadline, send).await {
            Ok(Ok((parts, data))) => check(&soak, id, credential, &body, parts, &data),
            Ok(Err(error)) => {
                bump(&soak.counts.errors);
                soak.violation(format!("request {id} failed: {error}"));
                soak.finish(id, None);
            }
            Err(_) if cancel.is_some() => {
                bump(&soak.counts.cancelled);
                soak.finish(id, None);
            }
            Err(_) => {
                bump(&soak.counts.hangs);
                soak.violation(format!("request {id} did not end within {DEADLINE:?}"));
                soak.finish(id, None);
            }
        }
        bump(&soak.counts.ended);
    }
}

/// Checks one response against what was sent.
fn check(
    soak: &Soak,
    id: u64,
    credential: &str,
    sent: &[u8],
    parts: http::response::Parts,
    data: &[u8],
) {
    let report = parts.extensions.get::<RecoveryReport>();
    let retried = report.is_some_and(RecoveryReport::retried);
    soak.finish(id, Some(1 + u8::from(retried)));
    if retried {
        bump(&soak.counts.retried);
    }
    let mut problems = Vec::new();
    match parts.status {
        StatusCode::OK => {
            bump(&soak.counts.ok);
            let json: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
            let mock = &json["mock"];
            let checksum = format!("{:016x}", fnv1a_64(sent));
            if mock["request_fnv1a"] != checksum.as_str()
                || mock["request_bytes"] != sent.len()
                || parts.headers.get("x-mock-request-fnv1a")
                    != HeaderValue::from_str(&checksum).ok().as_ref()
            {
                problems.push(format!("200 for another body: {mock}"));
            }
            if mock["credential_id"] != credential {
                problems.push(format!(
                    "200 for credential {}, sent with `{credential}`",
                    mock["credential_id"]
                ));
            }
        }
        StatusCode::FORBIDDEN => {
            bump(&soak.counts.forbidden);
            let kind = match data {
                d if d == STALE.as_bytes() => Some("stale"),
                d if d == ENTITLEMENT.as_bytes() => Some("entitlement"),
                d if d == BILLING.as_bytes() => Some("billing"),
                _ => None,
            };
            let verdict = report.map(RecoveryReport::verdict);
            let agrees = match (kind, verdict) {
                (Some(_), Some(Verdict::StaleToken(_))) if retried => true,
                (Some("stale"), Some(Verdict::StaleToken(_))) => true,
                (Some("entitlement"), Some(Verdict::Entitlement)) => true,
                (Some("billing"), Some(Verdict::Billing)) => true,
                _ => false,
            };
            if !agrees {
                problems.push(format!(
                    "403 of {} bytes ({kind:?}) with report {report:?}",
                    data.len()
                ));
            }
        }
        other => problems.push(format!("unexpected status {other}")),
    }
    if problems.is_empty() {
        bump(&soak.counts.bodies_verified);
    }
    for problem in problems {
        soak.violation(format!("request {id}: {problem}"));
    }
}

/// The chaos: a random act every few milliseconds until told to stop.
async fn chaos(soak: Arc<Soak>, seed: u64) {
    let mut rng = Rng::new(seed.rotate_left(17) ^ 0xc4a0_5c4a_05c4_a05c);
    let xai = &soak.xai;
    let mut stale_refreshes_until = None;
    while !soak.stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50 + rng.below(200))).await;
        if let Some(until) = stale_refreshes_until {
            if Instant::now() >= until {
                xai.set_refresh_issues_stale_tokens(false);
                stale_refreshes_until = None;
            }
        }
        bump(&soak.counts.chaos);
        match rng.below(100) {
            // Access tokens go stale: the 403 a refresh fixes, for every credential at once.
            0..=19 => xai.expire_access_tokens(),
            // The token endpoint fails at random for a while, or not.
            20..=34 => xai.set_token_failure_rate([0.0, 0.0, 0.2, 0.5, 0.9][rng.below(5) as usize]),
            // The next token requests fail on purpose, some for good (400: sign in again).
            35..=42 => {
                let status = [500, 502, 503, 429, 400][rng.below(5) as usize];
                xai.fail_next_token_requests(
                    1 + rng.below(3) as u32,
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                );
            }
            // Latency.
            43..=54 => {
                // Now and then slower than the refresher's timeout.
                let slowest = if rng.chance(100) { 3_000_000 } else { 50_000 };
                xai.set_latency(
                    Duration::from_micros(rng.below(3_000)),
                    Duration::from_micros(rng.below(slowest)),
                );
            }
            // Refreshes hand out tokens the API keeps rejecting, for a moment.
            55..=59 => {
                xai.set_refresh_issues_stale_tokens(true);
                stale_refreshes_until =
                    Some(Instant::now() + Duration::from_millis(50 + rng.below(500)));
            }
            // Refresh tokens revoked: credentials die until signed in again.
            60..=63 => xai.revoke_refresh_tokens(),
            // Subscriptions lapse and credits run out, and come back.
            64..=79 => {
                let id = IDS[2 + rng.below(2) as usize];
                let account = match rng.below(3) {
                    0 => Account::NoSubscription,
                    1 => Account::OutOfCredits,
                    _ => Account::Subscribed,
                };
                xai.set_account(id, account);
            }
            // Someone signs in again (which also revives a dead credential).
            _ => {
                let id = IDS[rng.below(IDS.len() as u64) as usize];
                let account = if id == "default" || id == "alice" {
                    Account::Subscribed
                } else {
                    match rng.below(3) {
                        0 => Account::NoSubscription,
                        1 => Account::OutOfCredits,
                        _ => Account::Subscribed,
                    }
                };
                soak.credentials.insert(xai.sign_in(id, account));
            }
        }
    }
    xai.set_refresh_issues_stale_tokens(false);
}

/// Refresher calls stay within the budget in every window (measured when the call started,
/// a little after the budget was spent: a second of slack).
fn check_refreshes(soak: &Soak) {
    let book = lock(&soak.refreshes);
    let window = BUDGET.window().saturating_sub(Duration::from_secs(1));
    let max = BUDGET.max_refreshes() as usize;
    let mut problems = Vec::new();
    for (id, calls) in &book.calls {
        for (i, start) in calls.iter().enumerate() {
            let within = calls[i..]
                .iter()
                .take_while(|t| t.duration_since(*start) < window)
                .count();
            if within > max {
                problems.push(format!(
                    "`{id}`: {within} refresher calls within {window:?}, budget {max}"
                ));
                break;
            }
        }
    }
    drop(book);
    for problem in problems {
        soak.violation(problem);
    }
}
