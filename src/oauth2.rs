//! [`OAuth2Refresher`]: the RFC 6749 `refresh_token` grant over any tower HTTP client, with
//! xAI's defaults.
//!
//! The refresher spends the stale credential's refresh token at the token endpoint and turns the
//! answer into a new [`Credential`] with the same id. It is a [`TokenRefresher`]: hand it to
//! [`XaiOAuthRecoveryLayer::new`](crate::XaiOAuthRecoveryLayer::new).
//!
//! # Where refresh tokens may go
//!
//! A refresh token is worth a whole session, so the endpoint is checked before every refresh
//! (and before and after discovery): it must be `https` with a host on the allowlist (`x.ai`
//! and `*.x.ai` unless configured otherwise), or, only with
//! [`allow_insecure_loopback`](OAuth2Refresher::allow_insecure_loopback), a loopback host over
//! plain `http` for tests. A URI with user info is refused too. A refused endpoint is a terminal
//! [`RefreshError`] and nothing is sent. Redirects are never followed: a token endpoint that
//! answers 3xx is misconfigured or impersonated, and following it would hand the refresh token
//! to whoever the `Location` names.
//!
//! # Persisting rotated refresh tokens
//!
//! xAI's refresh tokens are single-use: every successful refresh spends the old one and returns
//! a new one (the refresher keeps the old one only when the answer carries none). The rotated
//! token exists in exactly one place, the credential the layer installs, until the application
//! writes it somewhere. A process that restarts with the refresh token it loaded at start-up
//! presents a token the endpoint has already consumed: the answer is `invalid_grant`, the
//! credential is dead, and the user has to sign in again. Worse, presenting a consumed refresh
//! token is how a provider detects token theft, and it may revoke the whole grant when it sees
//! one.
//!
//! So an application that outlives one access token must persist every refreshed credential:
//! subscribe with [`Credentials::subscribe`](crate::Credentials::subscribe), which publishes a
//! refreshed credential before any request retries with it, and replace the stored copy
//! atomically (a temporary file in the same directory, then a rename) with permissions only the
//! user can read. `examples/persist.rs` does exactly that.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde::Deserialize;
use tower::util::ServiceExt as _;
use tower::BoxError;
use tower_service::Service;

use crate::body::content_length;
use crate::credential::{Credential, RefreshToken};
use crate::refresh::{RefreshError, RefreshRequest};

/// xAI's token endpoint.
const XAI_TOKEN_ENDPOINT: &str = "https://auth.x.ai/oauth2/token";
/// How long a refresh (or a discovery) may take by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes read from the token endpoint's answer.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How much of an `error` code goes into a message.
const MAX_CODE_CHARS: usize = 64;
/// How much of an `error_description` goes into a message.
const MAX_DESCRIPTION_CHARS: usize = 160;
const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

/// A [`TokenRefresher`](crate::TokenRefresher) that runs the OAuth 2.0 `refresh_token` grant
/// (RFC 6749, section 6) over any tower HTTP client `S` whose request body `B` can be made from
/// [`Bytes`]: a hyper-util legacy `Client<C, Full<Bytes>>`, for example.
///
/// Each refresh POSTs `grant_type=refresh_token&client_id=..&refresh_token=..` (plus
/// `client_secret` and `scope` when set) as `application/x-www-form-urlencoded` to the token
/// endpoint, and makes the answer a [`Credential`] with the stale credential's id:
///
/// - the new access token;
/// - the rotated refresh token, or the old one when the answer carries none;
/// - the expiry from `expires_in`, else from the access token's JWT `exp` claim (read, not
///   verified), else none.
///
/// A `token_type` other than `Bearer` (any case) is refused. The answer is read up to 64 KiB.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use xai_oauth_recovery::{Credential, Credentials, OAuth2Refresher, XaiOAuthRecoveryLayer};
///
/// // Use an HTTPS connector (hyper-rustls, hyper-tls) in production: the refresher refuses to
/// // send refresh tokens over plain HTTP to anything but loopback.
/// let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let refresher = OAuth2Refresher::xai(http, "my-client-id");
/// assert_eq!(refresher.token_endpoint(), "https://auth.x.ai/oauth2/token");
/// assert!(refresher.check_endpoint().is_ok());
///
/// let credentials = Credentials::new(
///     Credential::new("default", "access-token").with_refresh_token("refresh-token"),
/// );
/// let layer = XaiOAuthRecoveryLayer::new(credentials, refresher);
/// ```
///
/// # Where refresh tokens may go
///
/// Before every refresh the endpoint must be `https` with a host on the allowlist (by default
/// `x.ai` and `*.x.ai`, see [`allow_host`](Self::allow_host)), or a loopback host when
/// [`allow_insecure_loopback`](Self::allow_insecure_loopback) is set (tests only). Otherwise the
/// refresh fails with a terminal [`RefreshError`] and nothing is sent. Redirects are not
/// followed (do not wrap `S` in a redirect-following middleware either): a 3xx answer is a
/// transient error, so the credential stays alive for the corrected endpoint and the layer's
/// refresh budget bounds the attempts.
///
/// # Errors
///
/// The error is a [`RefreshError`]; its message never contains a token, only the status and
/// the (truncated) `error` and `error_description` of the answer.
///
/// | answer | error |
/// |---|---|
/// | `invalid_grant`, `invalid_client`, `unauthorized_client`, or any 400/401 | terminal: sign in again |
/// | 403 | terminal: the account's tier is denied |
/// | a `token_type` other than `Bearer` | terminal (the refresh token is spent) |
/// | refused endpoint, no refresh token in the credential | terminal, nothing sent |
/// | 429, 5xx, other statuses, 3xx | transient |
/// | timeout, connection error, malformed JSON, an answer over 64 KiB | transient |
///
/// # Persisting rotated refresh tokens
///
/// xAI's refresh tokens are single-use and rotate on every refresh. A rotated token that is not
/// written down is lost with the process, and the next start presents a spent token: the
/// answer is `invalid_grant` and the user must sign in again. Persist every credential that
/// [`Credentials::subscribe`](crate::Credentials::subscribe) publishes, with an atomic replace;
/// `examples/persist.rs` shows how.
pub struct OAuth2Refresher<S, B> {
    http: S,
    config: Arc<Config>,
    _body: PhantomData<fn() -> B>,
}

#[derive(Clone)]
struct Config {
    token_endpoint: Uri,
    client_id: String,
    client_secret: Option<String>,
    scope: Option<String>,
    timeout: Duration,
    allowed_hosts: Vec<HostPattern>,
    insecure_loopback: bool,
}

impl<S, B> OAuth2Refresher<S, B> {
    /// A refresher for `client_id` at `token_endpoint`, sending requests through `http`.
    ///
    /// The default allowlist only admits `x.ai` and its subdomains: for another provider, allow
    /// its host with [`allow_host`](Self::allow_host) or [`allowed_hosts`](Self::allowed_hosts).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use hyper_util::client::legacy::Client;
    /// use hyper_util::rt::TokioExecutor;
    /// use xai_oauth_recovery::OAuth2Refresher;
    ///
    /// let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// let endpoint = http::Uri::from_static("https://login.example.com/oauth2/token");
    /// let refresher = OAuth2Refresher::new(http, endpoint, "my-client-id")
    ///     .allowed_hosts(["login.example.com"]);
    /// assert!(refresher.check_endpoint().is_ok());
    /// ```
    pub fn new(http: S, token_endpoint: Uri, client_id: impl Into<String>) -> Self
    where
        S: Service<Request<B>>,
    {
        Self {
            http,
            config: Arc::new(Config {
                token_endpoint,
                client_id: client_id.into(),
                client_secret: None,
                scope: None,
                timeout: DEFAULT_TIMEOUT,
                allowed_hosts: default_hosts(),
                insecure_loopback: false,
            }),
            _body: PhantomData,
        }
    }

    /// A refresher for `client_id` at xAI's token endpoint, `https://auth.x.ai/oauth2/token`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use hyper_util::client::legacy::{connect::Connect, Client};
    /// use hyper_util::rt::TokioExecutor;
    /// use xai_oauth_recovery::OAuth2Refresher;
    ///
    /// // Any connector: an HTTPS one (hyper-rustls, hyper-tls) in production.
    /// fn xai_refresher<C>(connector: C) -> OAuth2Refresher<Client<C, Full<Bytes>>, Full<Bytes>>
    /// where
    ///     C: Connect + Clone + Send + Sync + 'static,
    /// {
    ///     let http = Client::builder(TokioExecutor::new()).build(connector);
    ///     OAuth2Refresher::xai(http, "my-client-id")
    /// }
    ///
    /// let refresher = xai_refresher(hyper_util::client::legacy::connect::HttpConnector::new());
    /// assert_eq!(refresher.token_endpoint(), "https://auth.x.ai/oauth2/token");
    /// ```
    pub fn xai(http: S, client_id: impl Into<String>) -> Self
    where
        S: Service<Request<B>>,
    {
        Self::new(http, Uri::from_static(XAI_TOKEN_ENDPOINT), client_id)
    }

    /// Sends `client_secret` in the form (RFC 6749 section 2.3.1). xAI's public clients have
    /// none. The secret never shows in `Debug` output or messages.
    pub fn client_secret(mut self, secret: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).client_secret = Some(secret.into());
        self
    }

    /// Sends `scope` in the form. xAI needs none: the refreshed token keeps the granted scope.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).scope = Some(scope.into());
        self
    }

    /// How long a refresh (or a discovery) may take, reading the answer included (default:
    /// 10 seconds). A token endpoint that takes longer is cut off with a transient error.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).timeout = timeout;
        self
    }

    /// Adds a host to the allowlist. `*.example.com` admits every subdomain of `example.com`
    /// (not `example.com` itself, nor `evilexample.com`); anything else names one host exactly.
    /// Matching ignores ASCII case and a trailing dot. A pattern that is no host name (empty,
    /// `*`, or containing `*` elsewhere, `/`, `@`, `:` or whitespace) admits nothing.
    ///
    /// The allowlist starts as `x.ai` and `*.x.ai`.
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # use hyper_util::client::legacy::Client;
    /// # use hyper_util::rt::TokioExecutor;
    /// use xai_oauth_recovery::OAuth2Refresher;
    ///
    /// # let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// let endpoint = http::Uri::from_static("https://auth.example.com/token");
    /// let refresher = OAuth2Refresher::new(http, endpoint, "app").allow_host("*.example.com");
    /// assert!(refresher.check_endpoint().is_ok());
    /// ```
    pub fn allow_host(mut self, pattern: impl AsRef<str>) -> Self {
        Arc::make_mut(&mut self.config)
            .allowed_hosts
            .push(HostPattern::parse(pattern.as_ref()));
        self
    }

    /// Replaces the allowlist with `patterns` (see [`allow_host`](Self::allow_host) for their
    /// form). An empty list admits no host at all.
    pub fn allowed_hosts<I>(mut self, patterns: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Arc::make_mut(&mut self.config).allowed_hosts = patterns
            .into_iter()
            .map(|pattern| HostPattern::parse(pattern.as_ref()))
            .collect();
        self
    }

    /// Also admits plain `http` (and `https`) to a loopback host, `127.0.0.0/8`, `::1` or
    /// `localhost`, whatever the allowlist says. For tests against a local token endpoint only.
    pub fn allow_insecure_loopback(mut self) -> Self {
        Arc::make_mut(&mut self.config).insecure_loopback = true;
        self
    }

    /// The token endpoint.
    pub fn token_endpoint(&self) -> &Uri {
        &self.config.token_endpoint
    }

    /// The OAuth client id.
    pub fn client_id(&self) -> &str {
        &self.config.client_id
    }

    /// Checks the token endpoint as every refresh does: `Err` is the terminal error a refresh
    /// would fail with. Useful to refuse a bad configuration at start-up.
    pub fn check_endpoint(&self) -> Result<(), RefreshError> {
        self.config
            .check(&self.config.token_endpoint, Target::TokenEndpoint)
    }

    /// The HTTP client.
    pub fn get_ref(&self) -> &S {
        &self.http
    }

    /// The HTTP client, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.http
    }

    /// Unwraps the HTTP client.
    pub fn into_inner(self) -> S {
        self.http
    }
}

impl<S, B, ResB> OAuth2Refresher<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    /// A refresher for `client_id` at the `token_endpoint` that the OpenID Connect discovery
    /// document at `discovery_uri` names (for xAI,
    /// `https://auth.x.ai/.well-known/openid-configuration`), with the default settings.
    ///
    /// Both the discovery URI and the endpoint it names must pass the default checks (`https`,
    /// host `x.ai` or `*.x.ai`). To discover with other settings, configure a refresher first and
    /// call [`discover_endpoint`](Self::discover_endpoint).
    ///
    /// # Errors
    ///
    /// A terminal [`RefreshError`] for a refused URI, a 4xx answer (but 429), or a document
    /// without a usable `token_endpoint`; a transient one for a timeout, a connection error, a
    /// 429, 5xx or 3xx answer, malformed JSON or a document over 64 KiB.
    ///
    /// ```no_run
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use hyper_util::client::legacy::Client;
    /// use hyper_util::rt::TokioExecutor;
    /// use xai_oauth_recovery::OAuth2Refresher;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), xai_oauth_recovery::BoxError> {
    /// // An HTTPS connector in production.
    /// let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// let discovery = http::Uri::from_static("https://auth.x.ai/.well-known/openid-configuration");
    /// let refresher = OAuth2Refresher::discover(http, discovery, "my-client-id").await?;
    /// println!("refreshing at {}", refresher.token_endpoint());
    /// # Ok(())
    /// # }
    /// ```
    pub fn discover(
        http: S,
        discovery_uri: Uri,
        client_id: impl Into<String>,
    ) -> impl Future<Output = Result<Self, RefreshError>> + Send {
        Self::new(http, discovery_uri.clone(), client_id).discover_endpoint(discovery_uri)
    }

    /// Replaces the token endpoint with the one the discovery document at `discovery_uri`
    /// names, using this refresher's allowlist, loopback setting and timeout for the discovery
    /// URI and for the endpoint it names.
    ///
    /// # Errors
    ///
    /// As for [`discover`](Self::discover).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # use hyper_util::client::legacy::Client;
    /// # use hyper_util::rt::TokioExecutor;
    /// use xai_oauth_recovery::OAuth2Refresher;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), xai_oauth_recovery::BoxError> {
    /// # let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// let refresher = OAuth2Refresher::xai(http, "my-client-id")
    ///     .timeout(Duration::from_secs(5))
    ///     .discover_endpoint(http::Uri::from_static(
    ///         "https://auth.x.ai/.well-known/openid-configuration",
    ///     ))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn discover_endpoint(
        self,
        discovery_uri: Uri,
    ) -> impl Future<Output = Result<Self, RefreshError>> + Send {
        let Self {
            http,
            mut config,
            _body,
        } = self;
        let checked = config.check(&discovery_uri, Target::Discovery);
        let request = checked.and_then(|()| get_json(&discovery_uri));
        async move {
            let request = request?;
            let timeout = config.timeout;
            let exchange = exchange(http.clone(), request, Target::Discovery);
            let (status, body) = match tokio::time::timeout(timeout, exchange).await {
                Ok(answer) => answer?,
                Err(_) => {
                    return Err(RefreshError::transient(format!(
                        "the discovery document did not arrive within {timeout:?}"
                    )))
                }
            };
            let endpoint = discovered_endpoint(status, body)?;
            config.check(&endpoint, Target::TokenEndpoint)?;
            tracing::debug!(
                host = endpoint.host().unwrap_or_default(),
                "discovered the token endpoint"
            );
            Arc::make_mut(&mut config).token_endpoint = endpoint;
            Ok(Self {
                http,
                config,
                _body,
            })
        }
    }
}

impl<S, B, ResB> Service<RefreshRequest> for OAuth2Refresher<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    type Response = Credential;
    type Error = RefreshError;
    type Future = Pin<Box<dyn Future<Output = Result<Credential, RefreshError>> + Send>>;

    /// Always ready: each refresh drives its own clone of the HTTP client to readiness, within
    /// the refresh's timeout.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RefreshError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RefreshRequest) -> Self::Future {
        let config = self.config.clone();
        let stale = request.stale().clone();
        let prepared = prepare(&config, &stale);
        let http = self.http.clone();
        Box::pin(async move {
            let (request, refresh_token) = prepared?;
            let timeout = config.timeout;
            tracing::debug!(
                credential = %stale.id(),
                host = config.token_endpoint.host().unwrap_or_default(),
                "refreshing at the token endpoint"
            );
            let exchange = exchange(http, request, Target::TokenEndpoint);
            let (status, body) = match tokio::time::timeout(timeout, exchange).await {
                Ok(answer) => answer?,
                Err(_) => {
                    return Err(RefreshError::transient(format!(
                        "the token endpoint did not answer within {timeout:?}"
                    )))
                }
            };
            tracing::debug!(
                credential = %stale.id(),
                status = status.as_u16(),
                "the token endpoint answered"
            );
            let secrets = Secrets {
                refresh_token: refresh_token.secret(),
                access_token: stale.access_token().secret(),
                client_secret: config.client_secret.as_deref(),
            };
            let token = answer(status, body, &secrets)?;
            Ok(token.into_credential(&stale, refresh_token))
        })
    }
}

impl<S: Clone, B> Clone for OAuth2Refresher<S, B> {
    fn clone(&self) -> Self {
        Self {
            http: self.http.clone(),
            config: self.config.clone(),
            _body: PhantomData,
        }
    }
}

impl<S, B> fmt::Debug for OAuth2Refresher<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &*self.config;
        f.debug_struct("OAuth2Refresher")
            .field("token_endpoint", &Shown(&config.token_endpoint))
            .field("client_id", &config.client_id)
            .field(
                "client_secret",
                &config.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("scope", &config.scope)
            .field("allowed_hosts", &config.allowed_hosts)
            .field("insecure_loopback", &config.insecure_loopback)
            .field("timeout", &config.timeout)
            .finish_non_exhaustive()
    }
}

/// A URI without its user info, for `Debug` output.
struct Shown<'a>(&'a Uri);

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = self.0;
        if let Some(scheme) = uri.scheme_str() {
            write!(f, "{scheme}://")?;
        }
        if let Some(authority) = uri.authority() {
            f.write_str(authority.host())?;
            if let Some(port) = authority.port() {
                write!(f, ":{port}")?;
            }
        }
        f.write_str(uri.path())
    }
}

/// Checks the endpoint and builds the token request, or says why no request goes out.
fn prepare<B: From<Bytes>>(
    config: &Config,
    stale: &Credential,
) -> Result<(Request<B>, RefreshToken), RefreshError> {
    let Some(refresh_token) = stale.refresh_token().cloned() else {
        return Err(RefreshError::terminal("no refresh token: sign in again"));
    };
    config.check(&config.token_endpoint, Target::TokenEndpoint)?;
    let form = config.form(refresh_token.secret());
    let request = Request::builder()
        .method(Method::POST)
        .uri(config.token_endpoint.clone())
        .header(CONTENT_TYPE, FORM_CONTENT_TYPE)
        .header(ACCEPT, JSON)
        .body(B::from(Bytes::from(form)))
        .map_err(|_| RefreshError::terminal("the token request cannot be built"))?;
    Ok((request, refresh_token))
}

fn get_json<B: From<Bytes>>(uri: &Uri) -> Result<Request<B>, RefreshError> {
    Request::builder()
        .method(Method::GET)
        .uri(uri.clone())
        .header(ACCEPT, JSON)
        .body(B::from(Bytes::new()))
        .map_err(|_| RefreshError::terminal("the discovery request cannot be built"))
}

/// What reading an answer's body came to.
enum Read {
    Complete(Bytes),
    TooLarge,
    Failed(BoxError),
}

impl Read {
    /// The whole body, or a transient error: `too_large` when it passed the cap, `failed`
    /// (with the cause) when reading it failed.
    fn into_bytes(
        self,
        too_large: &'static str,
        failed: &'static str,
    ) -> Result<Bytes, RefreshError> {
        match self {
            Read::Complete(bytes) => Ok(bytes),
            Read::TooLarge => Err(RefreshError::transient(too_large)),
            Read::Failed(error) => Err(RefreshError::transient(Failure::new(failed, error))),
        }
    }
}

/// Sends `request` and reads the answer's body up to [`MAX_BODY_BYTES`]. Owns everything it
/// holds across an `.await`, so its future is `Send` whenever its parts are.
async fn exchange<S, B, ResB>(
    http: S,
    request: Request<B>,
    target: Target,
) -> Result<(StatusCode, Read), RefreshError>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
    ResB::Error: Into<BoxError>,
{
    let response = http.oneshot(request).await.map_err(|error| {
        let message = match target {
            Target::TokenEndpoint => "could not reach the token endpoint",
            Target::Discovery => "could not reach the discovery uri",
        };
        RefreshError::transient(Failure::new(message, error.into()))
    })?;
    let (parts, body) = response.into_parts();
    let read = read_limited(content_length(&parts.headers), body).await;
    Ok((parts.status, read))
}

async fn read_limited<ResB>(declared: Option<u64>, body: ResB) -> Read
where
    ResB: Body,
    ResB::Error: Into<BoxError>,
{
    let limit = MAX_BODY_BYTES as u64;
    if declared.is_some_and(|len| len > limit) || body.size_hint().lower() > limit {
        return Read::TooLarge;
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Read::Complete(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Read::TooLarge,
        Err(error) => Read::Failed(error),
    }
}

/// The secrets a message must never repeat, whatever the token endpoint echoes.
struct Secrets<'a> {
    refresh_token: &'a str,
    access_token: &'a str,
    client_secret: Option<&'a str>,
}

impl Secrets<'_> {
    fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        let secrets = [
            Some(self.refresh_token),
            Some(self.access_token),
            self.client_secret,
        ];
        for secret in secrets.into_iter().flatten() {
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, "[redacted]");
            }
        }
        text
    }
}

/// An RFC 6749 section 5.1 token response; other fields (`id_token`, `scope`, ...) are ignored.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(skip)]
    expires_at: Option<SystemTime>,
}

impl TokenResponse {
    fn into_credential(self, stale: &Credential, old_refresh_token: RefreshToken) -> Credential {
        let refresh_token = match self.refresh_token {
            Some(rotated) if !rotated.is_empty() => rotated,
            _ => old_refresh_token.secret().to_owned(),
        };
        let credential =
            Credential::new(stale.id(), self.access_token).with_refresh_token(refresh_token);
        match self.expires_at {
            Some(at) => credential.with_expires_at(at),
            None => credential,
        }
    }
}

/// Turns the token endpoint's answer into a token response or an error.
fn answer(
    status: StatusCode,
    body: Read,
    secrets: &Secrets<'_>,
) -> Result<TokenResponse, RefreshError> {
    if !status.is_success() {
        let body = match &body {
            Read::Complete(bytes) => Some(&bytes[..]),
            _ => None,
        };
        return Err(error_answer(status, body, secrets));
    }
    let bytes = body.into_bytes(
        "the token response is larger than 65536 bytes",
        "reading the token response failed",
    )?;
    let mut token: TokenResponse = match from_object(&bytes) {
        Ok(token) => token,
        Err(error) => {
            // Some endpoints answer errors with 200: honour an RFC 6749 error code if there is one.
            if let Some(ErrorBody { error: Some(_), .. }) = ErrorBody::parse(&bytes) {
                return Err(error_answer(status, Some(&bytes), secrets));
            }
            return Err(RefreshError::transient(malformed("token response", &error)));
        }
    };
    if token.access_token.is_empty() {
        return Err(RefreshError::transient(
            "the token response has an empty access_token",
        ));
    }
    if let Some(token_type) = &token.token_type {
        if !token_type.eq_ignore_ascii_case("bearer") {
            return Err(RefreshError::terminal(format!(
                "the token endpoint issued a `{}` token, not a bearer token",
                excerpt(&secrets.redact(token_type), MAX_CODE_CHARS)
            )));
        }
    }
    token.expires_at = token
        .expires_in
        .as_ref()
        .and_then(seconds)
        .and_then(|secs| SystemTime::now().checked_add(Duration::from_secs(secs)))
        .or_else(|| jwt_exp(&token.access_token));
    Ok(token)
}

/// The RFC 6749 section 5.2 error fields, when they are strings.
struct ErrorBody {
    error: Option<String>,
    description: Option<String>,
}

impl ErrorBody {
    fn parse(body: &[u8]) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let text = |key: &str| value.get(key)?.as_str().map(str::to_owned);
        Some(Self {
            error: text("error"),
            description: text("error_description"),
        })
    }
}

/// Maps an error answer to a terminal or transient error (see the table on
/// [`OAuth2Refresher`]).
fn error_answer(status: StatusCode, body: Option<&[u8]>, secrets: &Secrets<'_>) -> RefreshError {
    let parsed = body.and_then(ErrorBody::parse);
    let code = parsed.as_ref().and_then(|body| body.error.as_deref());
    let mut detail = status_text(status);
    if let Some(code) = code {
        detail.push_str(", ");
        detail.push_str(&excerpt(&secrets.redact(code), MAX_CODE_CHARS));
        if let Some(description) = parsed.as_ref().and_then(|body| body.description.as_deref()) {
            detail.push_str(": ");
            detail.push_str(&excerpt(
                &secrets.redact(description),
                MAX_DESCRIPTION_CHARS,
            ));
        }
    }
    let rejected = matches!(
        code,
        Some("invalid_grant" | "invalid_client" | "unauthorized_client")
    );
    if rejected || status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED {
        RefreshError::terminal(format!(
            "the token endpoint rejected the refresh ({detail}): sign in again"
        ))
    } else if status == StatusCode::FORBIDDEN {
        RefreshError::terminal(format!(
            "the token endpoint denied this account's tier ({detail}): sign in with an account that may use this client"
        ))
    } else if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        RefreshError::transient(format!(
            "the token endpoint is unavailable ({detail}): try again later"
        ))
    } else if status.is_redirection() {
        RefreshError::transient(format!(
            "the token endpoint answered with a redirect ({detail}), which is not followed: check the token endpoint"
        ))
    } else {
        RefreshError::transient(format!(
            "the token endpoint answered with an unexpected status ({detail})"
        ))
    }
}

/// The `token_endpoint` of a discovery document.
fn discovered_endpoint(status: StatusCode, body: Read) -> Result<Uri, RefreshError> {
    if !status.is_success() {
        let detail = status_text(status);
        return Err(
            if status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
                || status.is_redirection()
            {
                RefreshError::transient(format!(
                    "the discovery document could not be fetched ({detail})"
                ))
            } else {
                RefreshError::terminal(format!(
                    "the discovery document could not be fetched ({detail})"
                ))
            },
        );
    }
    let bytes = body.into_bytes(
        "the discovery document is larger than 65536 bytes",
        "reading the discovery document failed",
    )?;
    #[derive(Deserialize)]
    struct Discovery {
        token_endpoint: Option<String>,
    }
    let discovery: Discovery = from_object(&bytes)
        .map_err(|error| RefreshError::transient(malformed("discovery document", &error)))?;
    let Some(endpoint) = discovery.token_endpoint else {
        return Err(RefreshError::terminal(
            "the discovery document names no token_endpoint",
        ));
    };
    endpoint
        .parse::<Uri>()
        .map_err(|_| RefreshError::terminal("the discovery document's token_endpoint is not a uri"))
}

/// Deserializes a JSON object, and only an object: serde's derived structs also accept arrays.
fn from_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)?;
    serde_json::from_value(serde_json::Value::Object(object))
}

/// A JSON error without the parts of the input serde may quote.
fn malformed(what: &str, error: &serde_json::Error) -> String {
    let kind = match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not valid json",
        serde_json::error::Category::Data => "valid json of the wrong shape",
        serde_json::error::Category::Eof => "truncated json",
    };
    if error.line() == 0 {
        return format!("the {what} is {kind}");
    }
    format!(
        "the {what} is {kind} (line {} column {})",
        error.line(),
        error.column()
    )
}

/// `403 forbidden`, without the uppercase of the canonical reason.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {}", status.as_u16(), reason.to_ascii_lowercase()),
        None => status.as_u16().to_string(),
    }
}

/// At most `max` characters of `text`, without control characters.
fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(max).collect();
    if text.chars().filter(|c| !c.is_control()).nth(max).is_some() {
        out.push_str("[..]");
    }
    out
}

/// Whole seconds from an `expires_in` value: a number or a string of digits.
fn seconds(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(number) => number.as_u64().or_else(|| {
            let secs = number.as_f64()?;
            (secs.is_finite() && secs >= 0.0 && secs < u64::MAX as f64).then_some(secs as u64)
        }),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// The `exp` claim of a JWS compact token (`header.payload.signature`), read without verifying
/// anything: it only tells when to refresh ahead of time.
fn jwt_exp(token: &str) -> Option<SystemTime> {
    #[derive(Deserialize)]
    struct Claims {
        #[serde(default)]
        exp: Option<serde_json::Value>,
    }
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = from_object(&payload).ok()?;
    let exp = match claims.exp? {
        serde_json::Value::String(_) => return None,
        exp => seconds(&exp)?,
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// An error with a fixed message and the error that caused it.
#[derive(Debug)]
struct Failure {
    message: &'static str,
    source: BoxError,
}

impl Failure {
    fn new(message: &'static str, source: BoxError) -> Self {
        Self { message, source }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Which URI a check is about, for its message.
#[derive(Clone, Copy)]
enum Target {
    TokenEndpoint,
    Discovery,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::TokenEndpoint => "token endpoint",
            Target::Discovery => "discovery uri",
        }
    }
}

impl Config {
    /// The form body of a refresh: `form_urlencoded` does the escaping.
    fn form(&self, refresh_token: &str) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "refresh_token")
            .append_pair("client_id", &self.client_id)
            .append_pair("refresh_token", refresh_token);
        if let Some(secret) = &self.client_secret {
            form.append_pair("client_secret", secret);
        }
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        form.finish()
    }

    /// `https` to an allowed host, or loopback when allowed; a terminal error otherwise.
    fn check(&self, uri: &Uri, target: Target) -> Result<(), RefreshError> {
        let what = target.name();
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(RefreshError::terminal(format!(
                "the {what} is not an absolute uri"
            )));
        };
        if authority.as_str().contains('@') {
            return Err(RefreshError::terminal(format!(
                "the {what} carries user info: refusing to send credentials there"
            )));
        }
        let host = normalize_host(authority.host());
        let loopback = self.insecure_loopback && is_loopback(&host);
        if scheme.eq_ignore_ascii_case("https") {
            if loopback || self.allowed_hosts.iter().any(|p| p.matches(&host)) {
                return Ok(());
            }
            return Err(RefreshError::terminal(format!(
                "the {what} host `{}` is not on the allowlist: refusing to send credentials there",
                excerpt(&host, 253)
            )));
        }
        if scheme.eq_ignore_ascii_case("http") && loopback {
            return Ok(());
        }
        Err(RefreshError::terminal(format!(
            "the {what} must use https: refusing to send credentials over `{}`",
            excerpt(&scheme.to_ascii_lowercase(), 16)
        )))
    }
}

/// Lowercase, without IPv6 brackets or a trailing dot.
fn normalize_host(host: &str) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn default_hosts() -> Vec<HostPattern> {
    vec![
        HostPattern::Exact("x.ai".into()),
        HostPattern::Subdomains("x.ai".into()),
    ]
}

/// An allowlist entry.
#[derive(Clone, PartialEq, Eq)]
enum HostPattern {
    /// Exactly this host.
    Exact(String),
    /// Any subdomain of this domain (`*.domain`).
    Subdomains(String),
    /// Not a host name: admits nothing.
    Nothing,
}

impl HostPattern {
    fn parse(pattern: &str) -> Self {
        let (wildcard, name) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        let name = normalize_host(name);
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains("..")
            && !name
                .chars()
                .any(|c| c == '*' || c == '/' || c == '@' || c == ':' || c.is_whitespace());
        match (valid, wildcard) {
            (false, _) => Self::Nothing,
            (true, false) => Self::Exact(name),
            (true, true) => Self::Subdomains(name),
        }
    }

    /// Whether this pattern admits `host` (normalized).
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Subdomains(domain) => host
                .strip_suffix(domain.as_str())
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty()),
            Self::Nothing => false,
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => write!(f, "{name:?}"),
            Self::Subdomains(domain) => write!(f, "\"*.{domain}\""),
            Self::Nothing => f.write_str("(nothing)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.c2lnbmF0dXJl",
            engine.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            engine.encode(payload)
        )
    }

    #[test]
    fn jwt_exp_is_read_not_verified() {
        let at = |secs: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(
            jwt_exp(&jwt(r#"{"sub":"u","exp":1700000000}"#)),
            at(1_700_000_000)
        );
        assert_eq!(jwt_exp(&jwt(r#"{"exp":1700000000.75}"#)), at(1_700_000_000));
        // Padding is tolerated.
        let padded = {
            let engine = base64::engine::general_purpose::URL_SAFE;
            format!("e30.{}.sig", engine.encode(r#"{"exp":12}"#))
        };
        assert!(padded.contains('='));
        assert_eq!(jwt_exp(&padded), at(12));
        let table: &[(&str, &str)] = &[
            ("no exp", &jwt(r#"{"sub":"u"}"#)),
            ("string exp", &jwt(r#"{"exp":"1700000000"}"#)),
            ("negative exp", &jwt(r#"{"exp":-5}"#)),
            ("not json", &jwt("exp=5")),
            ("opaque token", "xai-opaque-access-token"),
            ("two parts", "e30.e30"),
            ("five parts (JWE)", "a.b.c.d.e"),
            ("bad base64", "e30.!!!.sig"),
            ("empty", ""),
        ];
        for (case, token) in table {
            assert_eq!(jwt_exp(token), None, "{case}");
        }
    }

    #[test]
    fn host_allowlist() {
        let defaults = default_hosts();
        let allowed = |host: &str| {
            let host = normalize_host(host);
            defaults.iter().any(|p| p.matches(&host))
        };
        for host in ["x.ai", "auth.x.ai", "AUTH.X.AI", "auth.x.ai.", "a.b.x.ai"] {
            assert!(allowed(host), "{host} should be allowed");
        }
        for host in [
            "evilx.ai",
            "x.ai.evil.com",
            "xai",
            "ai",
            ".x.ai",
            "auth-x.ai",
            "127.0.0.1",
            "",
        ] {
            assert!(!allowed(host), "{host} should be refused");
        }
        assert_eq!(HostPattern::parse("*"), HostPattern::Nothing);
        assert_eq!(HostPattern::parse("*."), HostPattern::Nothing);
        assert_eq!(HostPattern::parse(""), HostPattern::Nothing);
        assert_eq!(HostPattern::parse("a.*.com"), HostPattern::Nothing);
        assert_eq!(HostPattern::parse("evil.com/x.ai"), HostPattern::Nothing);
        assert_eq!(
            HostPattern::parse("*.Example.COM."),
            HostPattern::Subdomains("example.com".into())
        );
        assert!(!HostPattern::Nothing.matches(""));
    }

    fn config() -> Config {
        Config {
            token_endpoint: Uri::from_static(XAI_TOKEN_ENDPOINT),
            client_id: "app".into(),
            client_secret: None,
            scope: None,
            timeout: DEFAULT_TIMEOUT,
            allowed_hosts: default_hosts(),
            insecure_loopback: false,
        }
    }

    #[test]
    fn endpoint_checks() {
        let strict = config();
        let loopback = Config {
            insecure_loopback: true,
            ..config()
        };
        let table: &[(&str, bool, bool)] = &[
            // uri, allowed by default, allowed with insecure loopback
            ("https://auth.x.ai/oauth2/token", true, true),
            ("https://x.ai:8443/token", true, true),
            ("HTTPS://AUTH.X.AI/oauth2/token", true, true),
            ("http://auth.x.ai/oauth2/token", false, false),
            ("https://evilx.ai/token", false, false),
            ("https://x.ai.evil.com/token", false, false),
            ("https://auth.x.ai@evil.com/token", false, false),
            ("https://user:pass@auth.x.ai/token", false, false),
            ("ftp://auth.x.ai/token", false, false),
            ("/oauth2/token", false, false),
            ("http://127.0.0.1:8080/token", false, true),
            ("http://127.1.2.3/token", false, true),
            ("http://[::1]:8080/token", false, true),
            ("http://localhost/token", false, true),
            ("https://127.0.0.1/token", false, true),
            ("http://10.0.0.1/token", false, false),
            ("http://localhost.evil.com/token", false, false),
        ];
        for (uri, by_default, with_loopback) in table {
            let parsed: Uri = match uri.parse() {
                Ok(uri) => uri,
                Err(error) => panic!("{uri}: {error}"),
            };
            let strict_ok = strict.check(&parsed, Target::TokenEndpoint);
            let loopback_ok = loopback.check(&parsed, Target::TokenEndpoint);
            assert_eq!(strict_ok.is_ok(), *by_default, "{uri} by default");
            assert_eq!(loopback_ok.is_ok(), *with_loopback, "{uri} with loopback");
            if let Err(error) = strict_ok {
                assert!(error.is_terminal(), "{uri}");
                assert!(!error.to_string().contains("pass"), "{uri}: {error}");
            }
        }
    }

    const SECRETS: Secrets<'static> = Secrets {
        refresh_token: "rt-sekret",
        access_token: "at-sekret",
        client_secret: Some("cs-sekret"),
    };

    #[test]
    fn error_mapping() {
        // status, body, terminal
        let table: &[(u16, &str, bool)] = &[
            (
                400,
                r#"{"error":"invalid_grant","error_description":"refresh token reused"}"#,
                true,
            ),
            (400, r#"{"error":"invalid_request"}"#, true),
            (400, "", true),
            (401, r#"{"error":"invalid_client"}"#, true),
            (401, "<html>nope</html>", true),
            (403, r#"{"error":"access_denied"}"#, true),
            (403, "", true),
            (500, r#"{"error":"invalid_grant"}"#, true),
            (503, r#"{"error":"unauthorized_client"}"#, true),
            (429, r#"{"error":"slow_down"}"#, false),
            (500, "", false),
            (502, "<html>bad gateway</html>", false),
            (503, r#"{"error":"temporarily_unavailable"}"#, false),
            (302, "", false),
            (404, "not found", false),
        ];
        for (status, body, terminal) in table {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::IM_A_TEAPOT);
            let error = error_answer(status, Some(body.as_bytes()), &SECRETS);
            assert_eq!(error.is_terminal(), *terminal, "{status} {body}");
            let message = error.to_string();
            assert!(message.contains(status.as_str()), "{message}");
            assert_eq!(message, message.to_lowercase());
            if *terminal {
                assert!(message.contains("sign in"), "{message}");
            }
        }
        let error = error_answer(
            StatusCode::BAD_REQUEST,
            Some(br#"{"error":"invalid_grant","error_description":"Refresh Token rt-sekret was already used"}"#),
            &SECRETS,
        );
        assert_eq!(
            error.to_string(),
            "token refresh failed, sign in again: the token endpoint rejected the refresh (400 bad request, invalid_grant: Refresh Token [redacted] was already used): sign in again"
        );
    }

    #[test]
    fn error_details_are_truncated_and_never_echo_bodies() {
        let long = "x".repeat(10_000);
        let body = format!(
            r#"{{"error":"{long}","error_description":"{long}","access_token":"at-sekret"}}"#
        );
        let message =
            error_answer(StatusCode::BAD_REQUEST, Some(body.as_bytes()), &SECRETS).to_string();
        assert!(message.len() < 400, "{}", message.len());
        let message = error_answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(b"upstream said: rt-sekret at-sekret"),
            &SECRETS,
        )
        .to_string();
        assert_eq!(
            message,
            "token refresh failed: the token endpoint is unavailable (500 internal server error): try again later"
        );
    }

    fn complete(body: &str) -> Read {
        Read::Complete(Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn token_answers() {
        let ok = |body: &str| answer(StatusCode::OK, complete(body), &SECRETS);
        let token =
            ok(r#"{"access_token":"a","token_type":"bearer","expires_in":"60","id_token":"x"}"#);
        let expires = token.ok().and_then(|t| t.expires_at);
        let left = expires.and_then(|at| at.duration_since(SystemTime::now()).ok());
        assert!(left
            .is_some_and(|left| left <= Duration::from_secs(60) && left > Duration::from_secs(50)));

        for (body, terminal) in [
            (r#"{"access_token":"a","token_type":"mac"}"#, true),
            (r#"{"error":"invalid_grant"}"#, true),
            (r#"{"access_token":""}"#, false),
            (r#"{"token_type":"Bearer"}"#, false),
            (r#"{"access_token":"at-sekret""#, false),
            ("not json", false),
            (r#"{"access_token":42}"#, false),
            (r#"["a", "bearer"]"#, false),
        ] {
            match ok(body) {
                Ok(_) => panic!("{body} accepted"),
                Err(error) => {
                    assert_eq!(error.is_terminal(), terminal, "{body}: {error}");
                    assert!(!error.to_string().contains("sekret"), "{error}");
                }
            }
        }
        let too_large = answer(StatusCode::OK, Read::TooLarge, &SECRETS);
        assert!(too_large.err().is_some_and(|e| e.is_transient()));
    }

    #[test]
    fn form_is_urlencoded() {
        let config = Config {
            client_secret: Some("s&cret=1".into()),
            scope: Some("api offline".into()),
            ..config()
        };
        assert_eq!(
            config.form("r+t/=&"),
            "grant_type=refresh_token&client_id=app&refresh_token=r%2Bt%2F%3D%26&client_secret=s%26cret%3D1&scope=api+offline"
        );
    }

    #[test]
    fn excerpts() {
        assert_eq!(excerpt("abc", 3), "abc");
        assert_eq!(excerpt("abcd", 3), "abc[..]");
        assert_eq!(excerpt("a\nb\u{7}c", 10), "abc");
        assert_eq!(status_text(StatusCode::FORBIDDEN), "403 forbidden");
    }
}
