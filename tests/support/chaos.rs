//! A randomized world for the load and secret tests: an API that answers every request as the
//! request asks (unless its token is stale), a refresher whose every call draws its fate, and
//! the bookkeeping that checks the layer's invariants as requests end.
//!
//! Everything random comes from one seeded [`Rng`]; the interleavings still depend on the
//! runtime, so a failure prints the seed and the violations, not a replay.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{BoxError, Service, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::{
    Credential, CredentialId, Credentials, RecoveryReport, RefreshError, RefreshRequest, Skip,
};

use super::{fnv1a, read_all, yield_once, Rng, TestBody, BILLING_403, ENTITLEMENT_403, STALE_403};

/// What a request asks the API for (when its token is valid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Ok,
    /// A 200 whose body comes slowly, in small random frames.
    Slow,
    Entitlement,
    Billing,
    /// A 503 with a body of its own.
    ServerError,
    /// The inner service fails: no response at all.
    Fail,
}

impl Want {
    fn header(self) -> &'static str {
        match self {
            Want::Ok => "ok",
            Want::Slow => "slow",
            Want::Entitlement => "entitlement",
            Want::Billing => "billing",
            Want::ServerError => "server-error",
            Want::Fail => "fail",
        }
    }

    fn parse(value: &str) -> Self {
        match value {
            "slow" => Want::Slow,
            "entitlement" => Want::Entitlement,
            "billing" => Want::Billing,
            "server-error" => Want::ServerError,
            "fail" => Want::Fail,
            _ => Want::Ok,
        }
    }

    /// The `x-kind` the API answers a valid token with.
    fn kind(self) -> &'static str {
        match self {
            Want::Ok | Want::Slow => "ok",
            Want::Entitlement => "entitlement",
            Want::Billing => "billing",
            Want::ServerError => "server-error",
            Want::Fail => "fail",
        }
    }
}

/// How much goes wrong.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    /// The credential ids requests use; the first is the default one.
    pub credentials: Vec<&'static str>,
    /// Whether refresher calls may fail, hang, panic, return the stale token or a bad one.
    pub refresher_faults: bool,
    /// The longest a successful refresh takes (real time).
    pub max_refresh_delay: Duration,
    /// Per mille of successful refreshes whose access token the API rejects at once.
    pub born_stale_per_mille: u64,
    /// Largest request body; the layer keeps at most `max_replay` of it for a retry.
    pub max_request_body: usize,
    /// Largest response body.
    pub max_response_body: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            seed: 1,
            credentials: vec!["default", "alice", "bob", "carol"],
            refresher_faults: true,
            max_refresh_delay: Duration::from_millis(3),
            born_stale_per_mille: 50,
            max_request_body: 1536,
            max_response_body: 2048,
        }
    }
}

/// The state the API, the refresher and the checks share.
pub struct World {
    pub settings: Settings,
    rng: Mutex<Rng>,
    /// Every access token the world knows, and whether the API accepts it.
    tokens: Mutex<HashMap<String, bool>>,
    /// Every token issued (access and refresh), for secret scans.
    issued: Mutex<Vec<String>>,
    /// Inner calls per request id in the current round.
    attempts: Mutex<HashMap<u64, u8>>,
    book: Mutex<RefreshBook>,
    counts: Mutex<Counts>,
    violations: Mutex<Vec<String>>,
    /// Cloned into every body the world makes: the bodies alive are `strong_count - 1`.
    pub bodies: Arc<()>,
}

#[derive(Default)]
struct RefreshBook {
    /// Refresher calls per credential id.
    calls: HashMap<String, u64>,
    /// Refresher calls running per credential id.
    active: HashMap<String, u64>,
    /// Stale access tokens a refresh replaced: they must never be refreshed again.
    replaced: HashSet<String>,
    /// Access tokens the API rejected: the only ones a refresh may replace.
    rejected: HashSet<String>,
    generation: u64,
}

/// What happened so far.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub requests: u64,
    pub ended: u64,
    pub errors: u64,
    pub retried: u64,
    pub bodies_verified: u64,
    pub refresher_calls: u64,
    pub faults: u64,
    pub expired: u64,
    pub inserted: u64,
    pub statuses: HashMap<u16, u64>,
}

impl World {
    pub fn new(settings: Settings) -> Arc<Self> {
        let rng = Rng::new(settings.seed);
        Arc::new(Self {
            settings,
            rng: Mutex::new(rng),
            tokens: Mutex::default(),
            issued: Mutex::default(),
            attempts: Mutex::default(),
            book: Mutex::default(),
            counts: Mutex::default(),
            violations: Mutex::default(),
            bodies: Arc::new(()),
        })
    }

    /// Signs every credential in with a valid token: the layer's credentials.
    pub fn credentials(self: &Arc<Self>) -> Credentials {
        let ids = self.settings.credentials.clone();
        let credentials = Credentials::new(self.sign_in(ids[0]));
        for id in &ids[1..] {
            credentials.insert(self.sign_in(id));
        }
        credentials
    }

    /// A new valid credential for `id`, as a new sign-in hands out.
    pub fn sign_in(&self, id: &str) -> Credential {
        let n = self.draw(|rng| rng.next_u64());
        let access = format!("at-{id}-signin-{n:016x}");
        let refresh = format!("rt-{id}-signin-{n:016x}");
        self.register(&access, true);
        self.issued.lock().unwrap().push(refresh.clone());
        Credential::new(id, access).with_refresh_token(refresh)
    }

    fn register(&self, access: &str, valid: bool) {
        self.tokens.lock().unwrap().insert(access.to_owned(), valid);
        self.issued.lock().unwrap().push(access.to_owned());
    }

    pub fn draw<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.rng.lock().unwrap())
    }

    /// Makes the current access token of `id` stale, as the provider revoking it does.
    pub fn expire(&self, credentials: &Credentials, id: &str) {
        if let Some(credential) = credentials.get(id) {
            let token = credential.access_token().secret().to_owned();
            self.tokens.lock().unwrap().insert(token, false);
            let mut counts = self.counts.lock().unwrap();
            counts.expired += 1;
            counts.faults += 1;
        }
    }

    /// Replaces `id` with a new sign-in while requests run.
    pub fn insert(&self, credentials: &Credentials, id: &str) {
        credentials.insert(self.sign_in(id));
        self.counts.lock().unwrap().inserted += 1;
    }

    /// One random act of chaos: expire a token (mostly) or sign a credential in again.
    pub fn chaos(&self, credentials: &Credentials) {
        let (id, expire) =
            self.draw(|rng| (*rng.pick(&self.settings.credentials), rng.chance(800)));
        if expire {
            self.expire(credentials, id);
        } else {
            self.insert(credentials, id);
        }
    }

    pub fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    pub fn counts(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }

    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }

    /// Refresher calls per credential id.
    pub fn refresher_calls(&self) -> HashMap<String, u64> {
        self.book.lock().unwrap().calls.clone()
    }

    /// Bodies made by the world and not yet dropped.
    pub fn bodies_alive(&self) -> usize {
        Arc::strong_count(&self.bodies) - 1
    }

    /// Ends a round: every request of `ids` made as many inner calls as its outcome says, and
    /// at most two. Clears the round's table.
    pub fn end_round(&self, expected_calls: &HashMap<u64, u8>) {
        let attempts = std::mem::take(&mut *self.attempts.lock().unwrap());
        for (id, calls) in &attempts {
            if *calls > 2 {
                self.violation(format!("request {id}: {calls} inner calls"));
            }
            match expected_calls.get(id) {
                Some(expected) if expected != calls => self.violation(format!(
                    "request {id}: {calls} inner calls, its outcome says {expected}"
                )),
                None => self.violation(format!("request {id}: inner calls but no outcome")),
                _ => {}
            }
        }
    }

    /// A random request: its id, what it wants, its credential, its body and its chunking.
    pub fn request(&self, id: u64) -> (Request<TestBody>, Want) {
        let settings = &self.settings;
        let (want, credential, body, chunk) = self.draw(|rng| {
            let want = match rng.below(100) {
                0..=39 => Want::Ok,
                40..=59 => Want::Slow,
                60..=71 => Want::Entitlement,
                72..=83 => Want::Billing,
                84..=95 => Want::ServerError,
                _ => Want::Fail,
            };
            let credential = *rng.pick(&settings.credentials);
            let len = rng.below(settings.max_request_body as u64 + 1) as usize;
            let body = rng.bytes(len);
            let chunk = 1 + rng.below(512) as usize;
            (want, credential, body, chunk)
        });
        let mut request = Request::post("https://api.x.ai/v1/chat/completions")
            .header("x-request-id", id)
            .header("x-want", want.header())
            .header("x-body-fnv", fnv1a(&body))
            .body(TestBody::chunked(&body, chunk).tracked(&self.bodies))
            .unwrap();
        if credential != settings.credentials[0] || id % 2 == 0 {
            request
                .extensions_mut()
                .insert(CredentialId::new(credential));
        }
        (request, want)
    }

    /// Sends request `id` through `svc` and checks how it ended; returns the number of inner
    /// calls its outcome implies.
    pub async fn run_one<S>(&self, mut svc: S, id: u64) -> u8
    where
        S: Service<
            Request<TestBody>,
            Response = Response<xai_oauth_recovery::body::ResponseBody<TestBody>>,
            Error = BoxError,
        >,
    {
        let (request, want) = self.request(id);
        self.counts.lock().unwrap().requests += 1;
        let result = match svc.ready().await {
            Ok(svc) => svc.call(request).await,
            Err(error) => Err(error),
        };
        let calls = self.check(id, want, result).await;
        self.counts.lock().unwrap().ended += 1;
        calls
    }

    async fn check(
        &self,
        id: u64,
        want: Want,
        result: Result<Response<xai_oauth_recovery::body::ResponseBody<TestBody>>, BoxError>,
    ) -> u8 {
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                self.counts.lock().unwrap().errors += 1;
                let message = error.to_string();
                return match message.strip_prefix("inner failure on attempt ") {
                    Some("1") if want == Want::Fail => 1,
                    Some("2") if want == Want::Fail => 2,
                    _ => {
                        self.violation(format!("request {id} ({want:?}) failed: {message}"));
                        0
                    }
                };
            }
        };
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let status = response.status();
        let kind = header("x-kind");
        let answered = header("x-request-id");
        let attempt: u8 = header("x-attempt").parse().unwrap_or(0);
        let report = response.extensions().get::<RecoveryReport>().cloned();
        if answered != id.to_string() {
            self.violation(format!(
                "request {id} got the response of request {answered:?}"
            ));
        }
        let retried = report.as_ref().is_some_and(RecoveryReport::retried);
        match (retried, attempt) {
            (true, 2) | (false, 1) => {}
            _ => self.violation(format!(
                "request {id}: response of attempt {attempt}, report {report:?}"
            )),
        }
        if kind == "stale" {
            // A stale token handed back must say why it was not retried, or be the retry's.
            let explained = report.as_ref().is_some_and(|r| {
                r.retried()
                    || matches!(
                        r.skipped(),
                        Some(
                            Skip::RefreshFailed
                                | Skip::BudgetExhausted
                                | Skip::CredentialDead
                                | Skip::BodyNotReplayable
                        )
                    )
            });
            if !explained {
                self.violation(format!(
                    "request {id}: stale 403 handed back with {report:?}"
                ));
            }
        } else if kind != want.kind() {
            self.violation(format!("request {id} wanted {want:?}, got {kind:?}"));
        }
        let expected = expected_body(&kind, id);
        let (data, _, error) = read_all(response.into_body()).await;
        if error.is_some() || data != expected {
            self.violation(format!(
                "request {id}: {kind} body of {} bytes (error {error:?}), expected {} bytes",
                data.len(),
                expected.len()
            ));
        }
        let mut counts = self.counts.lock().unwrap();
        counts.bodies_verified += 1;
        counts.retried += u64::from(retried);
        *counts.statuses.entry(status.as_u16()).or_default() += 1;
        attempt
    }

    fn response(&self, id: u64, attempt: u8, kind: &'static str, slow: bool) -> Response<TestBody> {
        let status = match kind {
            "ok" => StatusCode::OK,
            "server-error" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        };
        let data = expected_body(kind, id);
        // Even the 403s come in random pieces, so that the layer buffers several frames.
        let mut rng = Rng::new(self.draw(|rng| rng.next_u64()));
        let max = if slow { 64 } else { 1024 };
        let mut body = TestBody::split(&data, || 1 + rng.below(max) as usize).tracked(&self.bodies);
        if slow {
            body = body.slow();
        }
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert("x-kind", HeaderValue::from_static(kind));
        headers.insert("x-request-id", HeaderValue::from(id));
        headers.insert("x-attempt", HeaderValue::from(u16::from(attempt)));
        response
    }
}

/// The body the API sends for `kind` to request `id`: the xAI wire bodies for the 403s, bytes
/// derived from the id for the others.
pub fn expected_body(kind: &str, id: u64) -> Vec<u8> {
    let max = 2048;
    match kind {
        "stale" => STALE_403.as_bytes().to_vec(),
        "entitlement" => ENTITLEMENT_403.as_bytes().to_vec(),
        "billing" => BILLING_403.as_bytes().to_vec(),
        "ok" | "server-error" => {
            let mut rng = Rng::new(id ^ u64::from(kind == "ok") << 63);
            let len = rng.below(max + 1) as usize;
            let mut body = format!("{kind}:{id}:").into_bytes();
            body.extend(rng.bytes(len));
            body
        }
        _ => b"unknown".to_vec(),
    }
}

/// The inference API of the world.
#[derive(Clone)]
pub struct ChaosApi {
    pub world: Arc<World>,
}

impl Service<Request<RequestBody<TestBody>>> for ChaosApi {
    type Response = Response<TestBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TestBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<TestBody>>) -> Self::Future {
        let world = self.world.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let id: u64 = header("x-request-id").parse().unwrap_or(u64::MAX);
            let want = Want::parse(&header("x-want"));
            let attempt = {
                let mut attempts = world.attempts.lock().unwrap();
                let n = attempts.entry(id).or_default();
                *n += 1;
                *n
            };
            for _ in 0..world.draw(|rng| rng.below(3)) {
                yield_once().await;
            }
            // Read the body as a server does, and check it arrived byte for byte.
            let bytes = body.collect().await?.to_bytes();
            if header("x-body-fnv") != fnv1a(&bytes).to_string() {
                world.violation(format!(
                    "request {id}: attempt {attempt} got a body of {} bytes that is not the one sent",
                    bytes.len()
                ));
            }
            let token = header("authorization")
                .strip_prefix("Bearer ")
                .unwrap_or("")
                .to_owned();
            let valid = world.tokens.lock().unwrap().get(&token).copied() == Some(true);
            if !valid {
                world.book.lock().unwrap().rejected.insert(token);
                return Ok(world.response(id, attempt, "stale", false));
            }
            if want == Want::Fail {
                return Err(format!("inner failure on attempt {attempt}").into());
            }
            Ok(world.response(id, attempt, want.kind(), want == Want::Slow))
        })
    }
}

/// The refresher of the world: most calls hand out a new valid token after a short random
/// delay; with faults on, some fail, hang, panic, or return the stale token or a bad one.
#[derive(Clone)]
pub struct ChaosRefresher {
    pub world: Arc<World>,
}

/// Counts a refresher call as running until dropped.
struct Running {
    world: Arc<World>,
    id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(n) = self.world.book.lock().unwrap().active.get_mut(&self.id) {
            *n -= 1;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Fate {
    Fresh,
    BornStale,
    Transient,
    Terminal,
    Hang,
    Panic,
    Same,
    Invalid,
}

impl Service<RefreshRequest> for ChaosRefresher {
    type Response = Credential;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Credential, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: RefreshRequest) -> Self::Future {
        let world = self.world.clone();
        let id = req.stale().id().to_owned();
        let stale = req.stale().access_token().secret().to_owned();
        {
            let mut book = world.book.lock().unwrap();
            *book.calls.entry(id.clone()).or_default() += 1;
            let active = book.active.entry(id.clone()).or_default();
            *active += 1;
            let active = *active;
            book.generation += 1;
            if active > 1 {
                drop(book);
                world.violation(format!("{active} refresher calls at once for `{id}`"));
            } else if book.replaced.contains(&stale) {
                drop(book);
                world.violation(format!(
                    "`{id}`: a token already refreshed was refreshed again"
                ));
            } else if !book.rejected.contains(&stale) {
                drop(book);
                world.violation(format!(
                    "`{id}`: asked to replace a token no request failed with"
                ));
            }
        }
        world.counts.lock().unwrap().refresher_calls += 1;
        let running = Running {
            world: world.clone(),
            id: id.clone(),
        };
        let faults = world.settings.refresher_faults;
        let (fate, delay, n) = world.draw(|rng| {
            let fate = match (faults, rng.below(1000)) {
                (true, 0..=59) => Fate::Transient,
                (true, 60..=79) => Fate::Hang,
                (true, 80..=89) => Fate::Panic,
                (true, 90..=119) => Fate::Same,
                (true, 120..=149) => Fate::Invalid,
                (true, 150..=159) => Fate::Terminal,
                (_, x) if x < 1000 - world.settings.born_stale_per_mille => Fate::Fresh,
                _ => Fate::BornStale,
            };
            let max = world.settings.max_refresh_delay.as_micros() as u64;
            (
                fate,
                Duration::from_micros(rng.below(max + 1)),
                rng.next_u64(),
            )
        });
        if !matches!(fate, Fate::Fresh | Fate::BornStale) {
            world.counts.lock().unwrap().faults += 1;
        }
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let result = match fate {
                Fate::Fresh | Fate::BornStale => {
                    let access = format!("at-{id}-fresh-{n:016x}");
                    let refresh = format!("rt-{id}-fresh-{n:016x}");
                    world.register(&access, matches!(fate, Fate::Fresh));
                    world.issued.lock().unwrap().push(refresh.clone());
                    world.book.lock().unwrap().replaced.insert(stale);
                    Ok(Credential::new(id, access).with_refresh_token(refresh))
                }
                Fate::Transient => {
                    Err(RefreshError::transient("token endpoint answered 503").into())
                }
                Fate::Terminal => Err(RefreshError::terminal("invalid_grant").into()),
                Fate::Hang => std::future::pending().await,
                Fate::Panic => {
                    drop(running);
                    panic!("refresher panicked (on purpose)")
                }
                Fate::Same => Ok(req.stale().clone()),
                Fate::Invalid => Ok(Credential::new(id, "not\na header value")),
            };
            drop(running);
            result
        })
    }
}
