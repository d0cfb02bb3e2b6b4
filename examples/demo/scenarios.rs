//! The demo's five scenarios.
//!
//! Each one signs an account of its own in to a [`MockXai`] on 127.0.0.1, sends real HTTP
//! requests through [`XaiOAuthRecoveryLayer`] over hyper-util's pooled client, with an
//! [`OAuth2Refresher`] pointed at the mock's token endpoint, and checks what happened against
//! what should have: the mock's counters, the responses and their [`RecoveryReport`]s.
//!
//! Scenarios share a mock but not credentials. The mock's counters are global, so scenarios on
//! one mock run one after the other; the refresher calls of a scenario are the token requests
//! the mock counted while it ran.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;
use tower::limit::ConcurrencyLimit;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::mock::{Account, MockStats, MockXai};
use xai_oauth_recovery::{
    Credential, Credentials, OAuth2Refresher, RecoveryReport, RefreshBudget, Skip, StaleReason,
    Verdict, XaiOAuthRecovery, XaiOAuthRecoveryLayer,
};

/// The HTTP client under the layer: hyper-util's pooled HTTP/1.1 client.
type Http = Client<HttpConnector, RequestBody<Full<Bytes>>>;
/// The refresher's own HTTP client.
type TokenHttp = Client<HttpConnector, Full<Bytes>>;
type Refresher = OAuth2Refresher<TokenHttp, Full<Bytes>>;
/// The layered client the scenarios send through.
type XaiClient = XaiOAuthRecovery<ConcurrencyLimit<Http>, Refresher>;

/// The OAuth client id the refresher sends.
const CLIENT_ID: &str = "xai-oauth-recovery-demo";
/// At most this many requests on the wire at once. HTTP/1.1 needs a connection per request in
/// flight and the mock runs in this process, so without a cap 1,000 concurrent requests would
/// need some 2,000 file descriptors: more than many systems allow a process by default.
const MAX_IN_FLIGHT: usize = 64;
/// The request body: a chat completion, as a client would send it.
const CHAT: &str = r#"{"model":"grok-4","messages":[{"role":"user","content":"Hello"}]}"#;

/// Concurrent requests on one stale credential in [`Scenario::Burst`].
pub(crate) const BURST_REQUESTS: usize = 1_000;
/// How long the token endpoint takes to answer during the burst, as a remote one would: the
/// time in which the burst's stale 403s arrive and join the refresh in flight.
const BURST_TOKEN_LATENCY: Duration = Duration::from_millis(200);
/// Concurrent requests on a credential whose refresh token was revoked.
pub(crate) const REVOKED_REQUESTS: usize = 100;
/// Requests sent to an entitlement 403.
pub(crate) const NO_SUBSCRIPTION_REQUESTS: usize = 3;
/// Requests sent, one after the other, while every refresh hands out a stale token.
pub(crate) const LOOP_REQUESTS: usize = 20;
/// The refresh budget of [`Scenario::RefreshLoop`].
pub(crate) const LOOP_BUDGET: RefreshBudget = RefreshBudget::new(3, Duration::from_secs(300));

/// One of the demo's scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// A stale access token: 403, refresh, retry, 200.
    StaleToken,
    /// An account without a Grok subscription: 403, no refresh, a clear message.
    NoSubscription,
    /// Many concurrent requests on one stale access token: one refresh.
    Burst,
    /// A revoked refresh token: one token request, then "sign in again".
    Revoked,
    /// Refreshed tokens that keep failing: the budget ends the loop.
    RefreshLoop,
}

impl Scenario {
    /// Every scenario, in the demo's order.
    pub(crate) const ALL: [Scenario; 5] = [
        Scenario::StaleToken,
        Scenario::NoSubscription,
        Scenario::Burst,
        Scenario::Revoked,
        Scenario::RefreshLoop,
    ];

    /// The scenario's number in the demo, from 1.
    pub(crate) fn number(self) -> usize {
        match self {
            Scenario::StaleToken => 1,
            Scenario::NoSubscription => 2,
            Scenario::Burst => 3,
            Scenario::Revoked => 4,
            Scenario::RefreshLoop => 5,
        }
    }

    /// A short name, for the table.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Scenario::StaleToken => "stale access token",
            Scenario::NoSubscription => "no Grok subscription",
            Scenario::Burst => "1,000 concurrent, stale token",
            Scenario::Revoked => "revoked refresh token",
            Scenario::RefreshLoop => "refreshed tokens keep failing",
        }
    }

    /// What should happen.
    pub(crate) fn expectation(self) -> &'static str {
        match self {
            Scenario::StaleToken => {
                "1 refresh, 200 after one retry, the rotated credential published to subscribers"
            }
            Scenario::NoSubscription => {
                "every 403 handed back untouched, no refresh, the user told there is no subscription"
            }
            Scenario::Burst => "exactly 1 refresh, every response 200",
            Scenario::Revoked => {
                "1 token request however many requests, every 403 handed back with \"sign in again\""
            }
            Scenario::RefreshLoop => {
                "refreshes stop at the budget (3 per 5 minutes), every later 403 says the budget is spent"
            }
        }
    }

    /// The id of the account the scenario signs in.
    fn account_id(self) -> &'static str {
        match self {
            Scenario::StaleToken => "alice",
            Scenario::NoSubscription => "bob",
            Scenario::Burst => "carol",
            Scenario::Revoked => "dave",
            Scenario::RefreshLoop => "erin",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.number(), self.title())
    }
}

/// How a scenario went.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Outcome {
    /// The scenario's number, from 1.
    pub(crate) number: usize,
    pub(crate) scenario: &'static str,
    /// What should happen.
    pub(crate) expectation: &'static str,
    /// Requests sent through the layer.
    pub(crate) requests: usize,
    /// Requests the mock's token endpoint received while the scenario ran.
    pub(crate) refresher_calls: u64,
    /// How many responses came back with each status.
    pub(crate) statuses: BTreeMap<u16, usize>,
    /// What happened, in a few words.
    pub(crate) outcome: String,
    /// Whether everything happened as it should.
    pub(crate) expected: bool,
    /// What did not, if anything.
    pub(crate) problems: Vec<String>,
    /// What the layer's report tells the user, where that is the point of the scenario.
    pub(crate) message: Option<String>,
    pub(crate) elapsed_ms: u128,
}

/// A mock xAI and the HTTP clients the scenarios share.
#[derive(Debug)]
pub(crate) struct Demo {
    xai: MockXai,
    http: Http,
    token_http: TokenHttp,
}

impl Demo {
    /// Starts the mock on an ephemeral port of 127.0.0.1.
    pub(crate) async fn start() -> Result<Self, BoxError> {
        let xai = MockXai::start().await?;
        Ok(Self {
            xai,
            http: Client::builder(TokioExecutor::new()).build_http(),
            token_http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The mock's address, `http://127.0.0.1:<port>`.
    pub(crate) fn base_url(&self) -> String {
        self.xai.base_url()
    }

    /// A client that authorizes its requests with `credential` alone and refreshes it at the
    /// mock's token endpoint within `budget`.
    fn client(&self, credential: Credential, budget: RefreshBudget) -> (XaiClient, Credentials) {
        let credentials = Credentials::new(credential);
        let refresher = OAuth2Refresher::new(
            self.token_http.clone(),
            self.xai.token_endpoint(),
            CLIENT_ID,
        )
        .allow_insecure_loopback();
        let client = ServiceBuilder::new()
            .layer(
                XaiOAuthRecoveryLayer::new(credentials.clone(), refresher).refresh_budget(budget),
            )
            .concurrency_limit(MAX_IN_FLIGHT)
            .service(self.http.clone());
        (client, credentials)
    }

    /// Sends `n` requests at once and waits for all of them, ticking `progress` as they end.
    async fn send_concurrently(
        &self,
        client: &XaiClient,
        n: usize,
        progress: &ProgressBar,
    ) -> Result<Vec<Answer>, BoxError> {
        let mut tasks = JoinSet::new();
        for _ in 0..n {
            tasks.spawn(send(client.clone(), self.xai.chat_completions_uri()));
        }
        let mut answers = Vec::with_capacity(n);
        while let Some(joined) = tasks.join_next().await {
            answers.push(joined??);
            progress.inc(1);
        }
        Ok(answers)
    }

    /// Sends `n` requests one after the other.
    async fn send_sequentially(
        &self,
        client: &XaiClient,
        n: usize,
    ) -> Result<Vec<Answer>, BoxError> {
        let mut answers = Vec::with_capacity(n);
        for _ in 0..n {
            answers.push(send(client.clone(), self.xai.chat_completions_uri()).await?);
        }
        Ok(answers)
    }
}

/// Runs `scenario` on `demo`'s mock; `progress` ticks once per response of the burst.
///
/// An error (the mock unreachable, a request that fails) makes the outcome unexpected, with the
/// error as the problem.
pub(crate) async fn run(demo: &Demo, scenario: Scenario, progress: &ProgressBar) -> Outcome {
    let started = Instant::now();
    let before = demo.xai.stats();
    let result = match scenario {
        Scenario::StaleToken => stale_token(demo).await,
        Scenario::NoSubscription => no_subscription(demo).await,
        Scenario::Burst => burst(demo, progress).await,
        Scenario::Revoked => revoked(demo).await,
        Scenario::RefreshLoop => refresh_loop(demo).await,
    };
    let token_requests = Seen::between(&before, &demo.xai.stats()).token_requests;
    let run = result.unwrap_or_else(|error| Run {
        requests: 0,
        refresher_calls: token_requests,
        statuses: BTreeMap::new(),
        outcome: "error".to_owned(),
        problems: vec![format!("the scenario failed: {error}")],
        message: None,
    });
    Outcome {
        number: scenario.number(),
        scenario: scenario.title(),
        expectation: scenario.expectation(),
        requests: run.requests,
        refresher_calls: run.refresher_calls,
        statuses: run.statuses,
        outcome: run.outcome,
        expected: run.problems.is_empty(),
        problems: run.problems,
        message: run.message,
        elapsed_ms: started.elapsed().as_millis(),
    }
}

/// What a scenario found out.
struct Run {
    requests: usize,
    refresher_calls: u64,
    statuses: BTreeMap<u16, usize>,
    outcome: String,
    problems: Vec<String>,
    message: Option<String>,
}

impl Run {
    fn new(answers: &[Answer], seen: &Seen, outcome: String, checks: Checks) -> Self {
        let mut statuses = BTreeMap::new();
        for answer in answers {
            *statuses.entry(answer.status.as_u16()).or_default() += 1;
        }
        Self {
            requests: answers.len(),
            refresher_calls: seen.token_requests,
            statuses,
            outcome,
            problems: checks.problems,
            message: None,
        }
    }

    fn with_message(mut self, message: Option<String>) -> Self {
        self.message = message;
        self
    }
}

/// 1. A stale access token: the mock answers the stale-token 403, the layer refreshes once at
///    the token endpoint and retries; the retry gets a 200, and the rotated credential reaches
///    the application through `Credentials::subscribe`.
async fn stale_token(demo: &Demo) -> Result<Run, BoxError> {
    let id = Scenario::StaleToken.account_id();
    let signed_in = demo.xai.sign_in(id, Account::Subscribed);
    let (client, credentials) = demo.client(signed_in.clone(), RefreshBudget::default());
    let mut updates = credentials.subscribe();
    demo.xai.expire_access_tokens();

    let before = demo.xai.stats();
    let answers = demo.send_sequentially(&client, 1).await?;
    let seen = Seen::between(&before, &demo.xai.stats());

    let mut checks = Checks::default();
    checks.equal("refresher calls", seen.token_requests, 1);
    checks.equal("successful refreshes", seen.refreshes_ok, 1);
    checks.equal("stale-token 403s from the mock", seen.stale_403, 1);
    checks.equal("200s from the mock", seen.inference_ok, 1);
    let answer = answers.first().ok_or("no response")?;
    checks.equal("status", answer.status, StatusCode::OK);
    checks.check(
        String::from_utf8_lossy(&answer.body).contains("\"chat.completion\""),
        || "the 200 is not the mock's chat completion".to_owned(),
    );
    match &answer.report {
        Some(report) => {
            checks.check(is_bad_credentials(report.verdict()), || {
                format!("verdict {:?}, expected a stale token", report.verdict())
            });
            checks.check(
                report.retried() && report.refreshed() && report.skipped().is_none(),
                || format!("the report says: {report}"),
            );
        }
        None => checks.fail("the response carries no RecoveryReport"),
    }
    // A refreshed credential is published before the retry goes out.
    match updates.try_recv() {
        Some(published) => {
            checks.equal("published credential id", published.id(), id);
            checks.check(published.access_token() != signed_in.access_token(), || {
                "the published access token is the stale one".to_owned()
            });
            let rotated = match (published.refresh_token(), signed_in.refresh_token()) {
                (Some(new), Some(old)) => new != old,
                _ => false,
            };
            checks.check(rotated, || {
                "the published refresh token did not rotate".to_owned()
            });
            checks.check(credentials.get(id).as_ref() == Some(&published), || {
                "the credentials do not hold the published credential".to_owned()
            });
        }
        None => checks.fail("no refreshed credential was published to subscribers"),
    }

    let outcome = format!(
        "{} after {} refresh + 1 retry, rotation published",
        answer.status.as_u16(),
        seen.refreshes_ok
    );
    Ok(Run::new(&answers, &seen, outcome, checks))
}

/// 2. An account without a Grok subscription: the same 403 `code` as a stale token, but the
///    body says there is no subscription. No refresh can help: the 403 comes back whole with a
///    report that explains it to the user.
async fn no_subscription(demo: &Demo) -> Result<Run, BoxError> {
    let signed_in = demo.xai.sign_in(
        Scenario::NoSubscription.account_id(),
        Account::NoSubscription,
    );
    let (client, _credentials) = demo.client(signed_in, RefreshBudget::default());

    let before = demo.xai.stats();
    let answers = demo
        .send_sequentially(&client, NO_SUBSCRIPTION_REQUESTS)
        .await?;
    let seen = Seen::between(&before, &demo.xai.stats());

    let mut checks = Checks::default();
    checks.equal("refresher calls", seen.token_requests, 0);
    checks.equal(
        "entitlement 403s from the mock",
        seen.entitlement_403,
        NO_SUBSCRIPTION_REQUESTS as u64,
    );
    let mut message = None;
    for answer in &answers {
        checks.equal("status", answer.status, StatusCode::FORBIDDEN);
        checks.check(
            String::from_utf8_lossy(&answer.body)
                .contains("do not have an active Grok subscription"),
            || "the 403 body did not come back whole".to_owned(),
        );
        match &answer.report {
            Some(report) => {
                checks.equal("verdict", report.verdict(), &Verdict::Entitlement);
                checks.equal("skipped", report.skipped(), Some(&Skip::Entitlement));
                checks.check(!report.retried() && !report.refreshed(), || {
                    format!("the report says: {report}")
                });
                message = Some(report.to_string());
            }
            None => checks.fail("a 403 carries no RecoveryReport"),
        }
    }
    checks.check(
        message
            .as_deref()
            .is_some_and(|m| m.starts_with("this xAI account has no active Grok subscription")),
        || format!("the user is told {message:?}"),
    );

    let outcome = format!(
        "{} x 403 handed back, no refresh",
        count(&answers, |a| a.status == StatusCode::FORBIDDEN)
    );
    Ok(Run::new(&answers, &seen, outcome, checks).with_message(message))
}

/// 3. 1,000 concurrent requests on one stale access token, while the token endpoint takes a
///    while to answer: every request that gets a stale 403 joins the one refresh in flight (or
///    finds the credential already refreshed) and retries: one token request, 1,000 200s.
async fn burst(demo: &Demo, progress: &ProgressBar) -> Result<Run, BoxError> {
    let signed_in = demo
        .xai
        .sign_in(Scenario::Burst.account_id(), Account::Subscribed);
    let (client, _credentials) = demo.client(signed_in, RefreshBudget::default());
    demo.xai.expire_access_tokens();
    demo.xai.set_latency(Duration::ZERO, BURST_TOKEN_LATENCY);
    let _restore = Restore {
        xai: &demo.xai,
        undo: |xai| xai.set_latency(Duration::ZERO, Duration::ZERO),
    };

    let before = demo.xai.stats();
    progress.set_length(BURST_REQUESTS as u64);
    let answers = demo
        .send_concurrently(&client, BURST_REQUESTS, progress)
        .await?;
    let seen = Seen::between(&before, &demo.xai.stats());

    let mut checks = Checks::default();
    checks.equal("refresher calls", seen.token_requests, 1);
    checks.equal("successful refreshes", seen.refreshes_ok, 1);
    let ok = count(&answers, |a| a.status == StatusCode::OK);
    checks.equal("200 responses", ok, BURST_REQUESTS);
    checks.equal(
        "200s from the mock",
        seen.inference_ok,
        BURST_REQUESTS as u64,
    );
    let retried = count(&answers, |a| {
        a.report
            .as_ref()
            .is_some_and(|r| r.retried() && r.skipped().is_none())
    });
    let reported = count(&answers, |a| a.report.is_some());
    checks.equal("reports that are not a retry", reported - retried, 0);
    // Every stale 403 the mock sent was recovered by exactly one retry.
    checks.equal(
        "stale-token 403s from the mock",
        seen.stale_403,
        retried as u64,
    );
    // Requests that waited on the refresh in flight: the single flight at work. The token
    // endpoint's latency leaves time for many; one alone would prove nothing.
    let joined = count(&answers, |a| {
        a.report.as_ref().is_some_and(|r| r.refreshed())
    });
    checks.check(joined > 1, || {
        format!("{joined} request(s) waited on the refresh, expected many")
    });

    let outcome = format!(
        "{} x 200; {} stale 403s shared {} refresh",
        thousands(ok),
        thousands(retried),
        seen.refreshes_ok
    );
    Ok(Run::new(&answers, &seen, outcome, checks))
}

/// 4. A revoked refresh token: the token endpoint answers `invalid_grant` once, the credential is
///    dead, and every request gets its 403 back with "sign in again", without another token
///    request however many requests fail.
async fn revoked(demo: &Demo) -> Result<Run, BoxError> {
    let id = Scenario::Revoked.account_id();
    let signed_in = demo.xai.sign_in(id, Account::Subscribed);
    let (client, _credentials) = demo.client(signed_in, RefreshBudget::default());
    demo.xai.expire_access_tokens();
    demo.xai.revoke_refresh_tokens();

    let before = demo.xai.stats();
    let answers = demo
        .send_concurrently(&client, REVOKED_REQUESTS, &ProgressBar::hidden())
        .await?;
    let seen = Seen::between(&before, &demo.xai.stats());

    let mut checks = Checks::default();
    checks.equal("refresher calls", seen.token_requests, 1);
    checks.equal("invalid_grant answers", seen.invalid_grant, 1);
    let dead = count(&answers, |a| {
        a.status == StatusCode::FORBIDDEN
            && a.report
                .as_ref()
                .is_some_and(|r| r.skipped() == Some(&Skip::CredentialDead) && !r.retried())
    });
    checks.equal("403s reported as a dead credential", dead, REVOKED_REQUESTS);
    let message = answers
        .iter()
        .find_map(|a| a.report.as_ref())
        .map(RecoveryReport::to_string);
    let expected_message =
        format!("sign in again: the refresh token of credential `{id}` was revoked or rejected");
    checks.check(
        message.as_deref() == Some(expected_message.as_str()),
        || format!("the user is told {message:?}"),
    );

    let outcome = format!("{dead} x 403 \"sign in again\", 1 token request");
    Ok(Run::new(&answers, &seen, outcome, checks).with_message(message))
}

/// 5. Refreshes that hand out tokens the API keeps rejecting: each request refreshes and retries
///    into another stale 403 until the credential's budget is spent; from then on every request
///    gets its 403 back without a token request.
async fn refresh_loop(demo: &Demo) -> Result<Run, BoxError> {
    let signed_in = demo
        .xai
        .sign_in(Scenario::RefreshLoop.account_id(), Account::Subscribed);
    let (client, _credentials) = demo.client(signed_in, LOOP_BUDGET);
    demo.xai.expire_access_tokens();
    demo.xai.set_refresh_issues_stale_tokens(true);
    let _restore = Restore {
        xai: &demo.xai,
        undo: |xai| xai.set_refresh_issues_stale_tokens(false),
    };

    let before = demo.xai.stats();
    let answers = demo.send_sequentially(&client, LOOP_REQUESTS).await?;
    let seen = Seen::between(&before, &demo.xai.stats());

    let budget = u64::from(LOOP_BUDGET.max_refreshes());
    let refreshing = LOOP_BUDGET.max_refreshes() as usize;
    let mut checks = Checks::default();
    checks.equal("refresher calls", seen.token_requests, budget);
    checks.equal("successful refreshes", seen.refreshes_ok, budget);
    let forbidden = count(&answers, |a| a.status == StatusCode::FORBIDDEN);
    checks.equal("403 responses", forbidden, LOOP_REQUESTS);
    let (first, later) = answers.split_at(refreshing.min(answers.len()));
    let refreshed = count(first, |a| {
        a.report
            .as_ref()
            .is_some_and(|r| r.refreshed() && r.retried())
    });
    checks.equal("requests that refreshed and retried", refreshed, refreshing);
    let exhausted = count(later, |a| {
        a.report
            .as_ref()
            .is_some_and(|r| r.skipped() == Some(&Skip::BudgetExhausted) && !r.retried())
    });
    checks.equal(
        "later responses with the budget spent",
        exhausted,
        LOOP_REQUESTS - refreshing,
    );

    let outcome = format!(
        "{} refreshes, then {exhausted} x \"budget spent\" (all 403)",
        seen.refreshes_ok
    );
    Ok(Run::new(&answers, &seen, outcome, checks))
}

/// Turns a knob of the mock back when dropped, also when a scenario ends early.
struct Restore<'a> {
    xai: &'a MockXai,
    undo: fn(&MockXai),
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        (self.undo)(self.xai);
    }
}

/// What one request came back with.
struct Answer {
    status: StatusCode,
    report: Option<RecoveryReport>,
    body: Bytes,
}

/// Sends a chat completion request through `client` and reads the whole answer.
async fn send(client: XaiClient, uri: Uri) -> Result<Answer, BoxError> {
    let request = Request::post(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))?;
    let response = client.oneshot(request).await?;
    let status = response.status();
    let report = response.extensions().get::<RecoveryReport>().cloned();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        report,
        body,
    })
}

/// What the mock counted between two snapshots.
#[derive(Debug, Default)]
struct Seen {
    token_requests: u64,
    refreshes_ok: u64,
    invalid_grant: u64,
    inference_ok: u64,
    stale_403: u64,
    entitlement_403: u64,
}

impl Seen {
    fn between(before: &MockStats, after: &MockStats) -> Self {
        Self {
            token_requests: after.token_requests - before.token_requests,
            refreshes_ok: after.refreshes_ok - before.refreshes_ok,
            invalid_grant: after.invalid_grant - before.invalid_grant,
            inference_ok: after.inference_ok - before.inference_ok,
            stale_403: after.stale_403 - before.stale_403,
            entitlement_403: after.entitlement_403 - before.entitlement_403,
        }
    }
}

/// The expectations a scenario found broken.
#[derive(Debug, Default)]
struct Checks {
    problems: Vec<String>,
}

impl Checks {
    fn check(&mut self, holds: bool, problem: impl FnOnce() -> String) {
        if !holds {
            self.problems.push(problem());
        }
    }

    fn equal<T: PartialEq + fmt::Debug>(&mut self, what: &str, got: T, expected: T) {
        if got != expected {
            self.problems
                .push(format!("{what}: {got:?}, expected {expected:?}"));
        }
    }

    fn fail(&mut self, problem: &str) {
        self.problems.push(problem.to_owned());
    }
}

fn count(answers: &[Answer], f: impl Fn(&Answer) -> bool) -> usize {
    answers.iter().filter(|a| f(a)).count()
}

fn is_bad_credentials(verdict: &Verdict) -> bool {
    matches!(verdict, Verdict::StaleToken(StaleReason::Wke(reason)) if reason == "bad-credentials")
}

/// `1000` as `1,000`.
pub(crate) fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
