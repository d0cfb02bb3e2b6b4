//! The handle, its builder, and the accept loop.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::{StatusCode, Uri};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::routes::{self, Shared, CHAT_COMPLETIONS_PATH, DISCOVERY_PATH, TOKEN_PATH};
use super::state::{probability, Account, Settings, State};
use super::stats::MockStats;
use crate::Credential;

/// How long a stopping server lets the requests in flight finish before it drops them.
const GRACE: Duration = Duration::from_secs(5);

/// Configures a [`MockXai`] before it starts; from [`MockXai::builder`].
///
/// ```
/// use std::time::Duration;
/// use xai_oauth_recovery::mock::MockXai;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let xai = MockXai::builder()
///     .access_token_ttl(Duration::from_secs(900))
///     .rotate_refresh_tokens(false)
///     .seed(7)
///     .start()
///     .await?;
/// assert!(xai.base_url().starts_with("http://127.0.0.1:"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MockXaiBuilder {
    settings: Settings,
}

impl MockXaiBuilder {
    /// How long access tokens live (`expires_in` of the token endpoint), default one hour.
    /// A token older than this is stale, on Tokio's clock.
    pub fn access_token_ttl(mut self, ttl: Duration) -> Self {
        self.settings.access_token_ttl = ttl;
        self
    }

    /// Whether a refresh hands out a new refresh token and spends the old one (the default, as
    /// xAI does), or returns none and keeps the old one valid.
    pub fn rotate_refresh_tokens(mut self, yes: bool) -> Self {
        self.settings.rotate_refresh_tokens = yes;
        self
    }

    /// How long the inference API and the token endpoint wait before they answer; see
    /// [`MockXai::set_latency`].
    pub fn latency(mut self, inference: Duration, token: Duration) -> Self {
        self.settings.inference_latency = inference;
        self.settings.token_latency = token;
        self
    }

    /// The probability that a token request fails with a 503; see
    /// [`MockXai::set_token_failure_rate`].
    pub fn token_failure_rate(mut self, p: f64) -> Self {
        self.settings.token_failure_rate = probability(p);
        self
    }

    /// Seeds the generator behind tokens and random failures: the same seed and the same calls
    /// give the same tokens and the same failures.
    pub fn seed(mut self, seed: u64) -> Self {
        self.settings.seed = seed;
        self
    }

    /// Binds an ephemeral port on `127.0.0.1` and starts serving on the current Tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub async fn start(self) -> io::Result<MockXai> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let base_url = format!("http://{addr}");
        let uris = Uris::new(&base_url)?;
        let shared = Arc::new(Shared::new(State::new(self.settings), base_url));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept(listener, shared.clone(), stopped));
        Ok(MockXai {
            shared,
            uris: Arc::new(uris),
            server: Arc::new(Server {
                addr,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

#[derive(Debug)]
struct Uris {
    chat_completions: Uri,
    token_endpoint: Uri,
    discovery: Uri,
}

impl Uris {
    fn new(base_url: &str) -> io::Result<Self> {
        let uri = |path: &str| {
            format!("{base_url}{path}")
                .parse::<Uri>()
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
        };
        Ok(Self {
            chat_completions: uri(CHAT_COMPLETIONS_PATH)?,
            token_endpoint: uri(TOKEN_PATH)?,
            discovery: uri(DISCOVERY_PATH)?,
        })
    }
}

/// Stops the server when the last handle goes.
struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A mock xAI server on `127.0.0.1`: inference API, OAuth token endpoint and discovery
/// document. See the [module documentation](super) for what it answers.
///
/// A cheap-to-clone handle: the server stops when the last clone is dropped, or on
/// [`shutdown`](Self::shutdown). Its `Debug` output shows the address and the counters, never
/// a token.
#[derive(Clone)]
pub struct MockXai {
    shared: Arc<Shared>,
    uris: Arc<Uris>,
    server: Arc<Server>,
}

impl MockXai {
    /// A builder, to start a server with other settings than the defaults.
    pub fn builder() -> MockXaiBuilder {
        MockXaiBuilder::default()
    }

    /// Starts a server with the default settings: access tokens live an hour, refresh tokens
    /// rotate, no latency, no failures.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub async fn start() -> io::Result<Self> {
        Self::builder().start().await
    }

    /// The server's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// `{base_url}/v1/chat/completions`. Every path under `/v1/` answers the same way.
    pub fn chat_completions_uri(&self) -> Uri {
        self.uris.chat_completions.clone()
    }

    /// `{base_url}/oauth2/token`, the OAuth token endpoint.
    pub fn token_endpoint(&self) -> Uri {
        self.uris.token_endpoint.clone()
    }

    /// `{base_url}/.well-known/openid-configuration`, the discovery document.
    pub fn discovery_uri(&self) -> Uri {
        self.uris.discovery.clone()
    }

    /// Signs in the account `id` as `account` (or changes its account, if it exists): a
    /// credential with that id, a valid access token, a refresh token and the access token's
    /// expiry.
    pub fn sign_in(&self, id: &str, account: Account) -> Credential {
        let issued = self.shared.lock().sign_in(id, account);
        let mut credential = Credential::new(id, issued.access_token);
        if let Some(refresh_token) = issued.refresh_token {
            credential = credential.with_refresh_token(refresh_token);
        }
        if let Some(expires_at) = SystemTime::now().checked_add(issued.expires_in) {
            credential = credential.with_expires_at(expires_at);
        }
        credential
    }

    /// Changes the account of `id` for all its tokens, issued or to come: a subscription that
    /// lapses, credits that run out.
    pub fn set_account(&self, id: &str, account: Account) {
        self.shared.lock().set_account(id, account);
    }

    /// Makes every access token issued so far stale: its next use gets the stale-token 403.
    /// Tokens issued later are valid.
    pub fn expire_access_tokens(&self) {
        self.shared.lock().expire_access_tokens();
    }

    /// Revokes every refresh token issued so far: the token endpoint answers `invalid_grant`.
    /// Tokens issued later are valid.
    pub fn revoke_refresh_tokens(&self) {
        self.shared.lock().revoke_refresh_tokens();
    }

    /// While `yes`, refreshes succeed but hand out access tokens that the inference API rejects
    /// as stale: refreshed tokens that keep failing.
    pub fn set_refresh_issues_stale_tokens(&self, yes: bool) {
        self.shared.lock().settings.refresh_issues_stale_tokens = yes;
    }

    /// How long the inference API and the token endpoint wait before they answer, on Tokio's
    /// clock.
    pub fn set_latency(&self, inference: Duration, token: Duration) {
        let mut state = self.shared.lock();
        state.settings.inference_latency = inference;
        state.settings.token_latency = token;
    }

    /// The probability, clamped to `0.0..=1.0`, that a token request fails with a 503
    /// `temporarily_unavailable`. The draws come from the seeded generator: the same seed and
    /// the same requests fail the same way.
    pub fn set_token_failure_rate(&self, p: f64) {
        self.shared.lock().settings.token_failure_rate = probability(p);
    }

    /// Fails the next `n` token requests with `status` and an RFC 6749 error body
    /// (`invalid_request` for 400, `invalid_client` for 401, `access_denied` for 403,
    /// `temporarily_unavailable` for 429 and 503, `server_error` otherwise), whatever they ask.
    /// Replaces any count left from an earlier call; these failures come before random ones.
    pub fn fail_next_token_requests(&self, n: u32, status: StatusCode) {
        self.shared.lock().fail_next(n, status);
    }

    /// The fields of the last form the token endpoint received, in order, secrets included.
    pub fn last_token_form(&self) -> Option<Vec<(String, String)>> {
        self.shared.lock().last_token_form.clone()
    }

    /// What the server has answered so far.
    pub fn stats(&self) -> MockStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting connections and waits for the server's task to end: requests in flight
    /// get a few seconds to finish, then their connections close. Other clones of the handle
    /// keep working, without a server.
    pub async fn shutdown(&self) {
        self.server.stop.send_replace(true);
        let task = self
            .server
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // The task ends on its own; a panic or cancellation leaves nothing to clean up.
            let _ = task.await;
        }
    }
}

impl fmt::Debug for MockXai {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockXai")
            .field("base_url", &self.shared.base_url)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The accept loop: one task for the listener, one per connection, until told to stop.
async fn accept(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // A `true` or a dropped sender: both mean stop.
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, shared.clone(), stop.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(%error, "mock xAI server: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    // Whatever is left after the grace period is aborted when the set drops.
    let _ = tokio::time::timeout(GRACE, drained).await;
}

/// Serves one connection until the client closes it or the server stops.
async fn serve(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // Small JSON answers: don't let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(routes::handle(&shared, req).await) }
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = stop.changed() => {}
    }
    // Finish the request in flight, if any, then close.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}
