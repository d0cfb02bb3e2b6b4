//! [`reqwest_middleware`] integration: [`XaiOAuthRecoveryMiddleware`].
//!
//! The middleware runs the tower layer's own service, [`XaiOAuthRecovery`], over the rest of the
//! middleware chain: the same classification, the same single flight and refresh budget per
//! credential (shared with any tower layer built on the same [`Credentials`]), the same one retry
//! and the same [`RecoveryReport`], which ends up in the [`reqwest::Response`]'s extensions.
//!
//! ```
//! use bytes::Bytes;
//! use reqwest_middleware::ClientBuilder;
//! use tower::{service_fn, BoxError};
//! use xai_oauth_recovery::reqwest::XaiOAuthRecoveryMiddleware;
//! use xai_oauth_recovery::{Credential, Credentials, OAuth2Refresher, RecoveryReport};
//!
//! # async fn example() -> Result<(), BoxError> {
//! let http = reqwest::Client::new();
//!
//! // The refresher speaks tower's `Service<http::Request<_>>`: a few lines let it send its
//! // token requests through the same reqwest client.
//! let token_client = http.clone();
//! let token_http = service_fn(move |request: http::Request<Bytes>| {
//!     let client = token_client.clone();
//!     async move {
//!         let response = client.execute(reqwest::Request::try_from(request)?).await?;
//!         Ok::<_, reqwest::Error>(http::Response::<reqwest::Body>::from(response))
//!     }
//! });
//! let refresher = OAuth2Refresher::xai(token_http, "my-client-id");
//!
//! let credentials = Credentials::new(
//!     Credential::new("default", "access-token").with_refresh_token("refresh-token"),
//! );
//! let client = ClientBuilder::new(http)
//!     .with(XaiOAuthRecoveryMiddleware::new(credentials, refresher))
//!     .build();
//!
//! let response = client
//!     .post("https://api.x.ai/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(r#"{"model":"grok-4","messages":[{"role":"user","content":"Hi"}]}"#)
//!     .send()
//!     .await?;
//! if let Some(report) = response.extensions().get::<RecoveryReport>() {
//!     eprintln!("{report}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Request bodies
//!
//! A body reqwest holds in memory (`.body(String)`, `.body(Vec<u8>)`, `.json(..)`) is handed on
//! as one in memory, on the first attempt and on the retry: reqwest can still clone the request
//! to follow a 307/308 redirect, and so can middleware further down the chain. A streaming body
//! (`reqwest::Body::wrap` of an `http_body::Body`, or `Body::wrap_stream`) is recorded while it
//! streams to the first attempt, up to `max_replay_body_bytes`, and replayed from that record:
//! such a request is retried once although [`reqwest::Request::try_clone`] returns `None` for it.
//!
//! # Choosing the credential
//!
//! A request uses the credential named by a [`CredentialId`] in reqwest-middleware's extensions
//! (`RequestBuilder::with_extension`) or in the request's own extensions (an `http::Request`
//! made into a [`reqwest::Request`] with `TryFrom` keeps them), the request's own first; else
//! the default credential.
//!
//! # Errors
//!
//! Errors from further down the chain come back as they were (an [`Error::Reqwest`] stays one).
//! A request that names an unknown credential, or a credential whose token cannot be a header
//! value, fails with an [`Error::Middleware`] holding a [`CredentialError`] (see
//! `anyhow::Error::downcast_ref`). Refresh failures are never errors: the original response
//! comes back with a [`RecoveryReport`] that says what happened.
//!
//! # Where it goes in the chain
//!
//! reqwest-middleware runs middleware in the order it was added, the first one outermost. Add
//! tracing first, then a generic retry middleware, then this one: a retry of a 5xx goes through
//! the middleware again and gets the current token, and the refresh budget bounds the refreshes
//! whatever the retry does.
//!
//! [`RecoveryReport`]: crate::RecoveryReport
//! [`Error::Reqwest`]: reqwest_middleware::Error::Reqwest
//! [`Error::Middleware`]: reqwest_middleware::Error::Middleware

use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use ::reqwest::ResponseBuilderExt as _;
use bytes::Bytes;
use http::Extensions;
use reqwest_middleware::{Middleware, Next};
use tower::{BoxError, ServiceExt as _};
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::classify::{Classify, XaiClassifier};
use crate::credential::{CredentialError, CredentialId, Credentials};
use crate::layer::{settings_builders, Settings, Shared, XaiOAuthRecoveryLayer};
use crate::refresh::TokenRefresher;
use crate::service::XaiOAuthRecovery;

/// A [`reqwest_middleware::Middleware`] that sets `Authorization: Bearer` from [`Credentials`]
/// and recovers from stale-token 401/403 responses, with one refresh per credential and one
/// retry per request: [`XaiOAuthRecoveryLayer`] for reqwest. See the [module docs](self).
///
/// Building it needs no async runtime.
///
/// ```
/// use std::time::Duration;
/// use tower::{service_fn, BoxError};
/// use xai_oauth_recovery::reqwest::XaiOAuthRecoveryMiddleware;
/// use xai_oauth_recovery::{Credential, Credentials, RefreshBudget, RefreshRequest};
///
/// let credentials = Credentials::new(Credential::new("default", "token"));
/// let refresher = service_fn(|req: RefreshRequest| async move {
///     Ok::<_, BoxError>(Credential::new(req.stale().id(), "new-token"))
/// });
/// let middleware = XaiOAuthRecoveryMiddleware::new(credentials, refresher)
///     .refresh_budget(RefreshBudget::new(3, Duration::from_secs(300)))
///     .refresh_timeout(Duration::from_secs(10));
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(middleware)
///     .build();
/// ```
pub struct XaiOAuthRecoveryMiddleware<R, C = XaiClassifier> {
    /// The configuration, kept to apply builder methods to.
    config: XaiOAuthRecoveryLayer<R, C>,
    /// Built from `config` once, shared by every request.
    shared: Arc<Shared<R, C>>,
}

impl<R: TokenRefresher> XaiOAuthRecoveryMiddleware<R> {
    /// A middleware that authorizes requests with `credentials` and refreshes them with
    /// `refresher`, with xAI's classifier and the default bounds.
    pub fn new(credentials: Credentials, refresher: R) -> Self {
        XaiOAuthRecoveryLayer::new(credentials, refresher).into()
    }
}

impl<R: TokenRefresher, C: Clone> XaiOAuthRecoveryMiddleware<R, C> {
    settings_builders!();

    /// Uses another classifier, for example one for another OAuth provider.
    pub fn classifier<C2: Classify + Clone>(
        self,
        classifier: C2,
    ) -> XaiOAuthRecoveryMiddleware<R, C2> {
        self.config.classifier(classifier).into()
    }

    fn map_settings(self, f: impl FnOnce(&mut Settings)) -> Self {
        self.config.map_settings(f).into()
    }
}

impl<R, C> XaiOAuthRecoveryMiddleware<R, C> {
    /// The credentials the middleware uses.
    pub fn credentials(&self) -> &Credentials {
        self.config.credentials()
    }
}

/// A middleware with the layer's configuration.
impl<R: TokenRefresher, C: Clone> From<XaiOAuthRecoveryLayer<R, C>>
    for XaiOAuthRecoveryMiddleware<R, C>
{
    fn from(config: XaiOAuthRecoveryLayer<R, C>) -> Self {
        let shared = Arc::new(config.shared());
        Self { config, shared }
    }
}

impl<R: Clone, C: Clone> Clone for XaiOAuthRecoveryMiddleware<R, C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<R, C: fmt::Debug> fmt::Debug for XaiOAuthRecoveryMiddleware<R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XaiOAuthRecoveryMiddleware")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl<R, C> Middleware for XaiOAuthRecoveryMiddleware<R, C>
where
    R: TokenRefresher + Sync,
    C: Classify + Send + Sync + 'static,
{
    async fn handle(
        &self,
        request: ::reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<::reqwest::Response> {
        let mut request = http::Request::<::reqwest::Body>::try_from(request)?;
        if request.extensions().get::<CredentialId>().is_none() {
            if let Some(id) = extensions.get::<CredentialId>() {
                request.extensions_mut().insert(id.clone());
            }
        }
        // The rest of the chain borrows the extensions for each attempt in turn.
        let extensions_cell = Mutex::new(mem::take(extensions));
        let downstream = Downstream {
            next,
            extensions: &extensions_cell,
        };
        let result = recover(&self.shared, downstream, request).await;
        *extensions = extensions_cell
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(response) => Ok(into_reqwest_response(response)),
            Err(error) => Err(into_middleware_error(error)),
        }
    }
}

async fn recover<R, C>(
    shared: &Arc<Shared<R, C>>,
    downstream: Downstream<'_>,
    request: http::Request<::reqwest::Body>,
) -> Result<http::Response<ResponseBody<::reqwest::Body>>, BoxError>
where
    R: TokenRefresher,
    C: Classify,
{
    let mut service = XaiOAuthRecovery::from_shared(downstream, shared.clone());
    service.ready().await?.call(request).await
}

/// The rest of the middleware chain as a tower service, for [`XaiOAuthRecovery`] to call once,
/// or twice when it retries.
#[derive(Clone)]
struct Downstream<'a> {
    next: Next<'a>,
    /// reqwest-middleware's extensions, lent to one attempt at a time.
    extensions: &'a Mutex<Extensions>,
}

impl<'a> Service<http::Request<RequestBody<::reqwest::Body>>> for Downstream<'a> {
    type Response = http::Response<::reqwest::Body>;
    type Error = reqwest_middleware::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'a>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<RequestBody<::reqwest::Body>>) -> Self::Future {
        let next = self.next.clone();
        let cell = self.extensions;
        Box::pin(async move {
            let request = ::reqwest::Request::try_from(request.map(into_reqwest_body))?;
            let mut extensions =
                mem::take(&mut *cell.lock().unwrap_or_else(PoisonError::into_inner));
            let result = next.run(request, &mut extensions).await;
            *cell.lock().unwrap_or_else(PoisonError::into_inner) = extensions;
            let response = result?;
            let url = ResponseUrl(response.url().clone());
            let mut response = http::Response::<::reqwest::Body>::from(response);
            response.extensions_mut().insert(url);
            Ok(response)
        })
    }
}

/// A body held in memory stays one, so that reqwest and the middleware after this one can
/// clone the request; a streaming one streams through the layer's recording body.
fn into_reqwest_body(mut body: RequestBody<::reqwest::Body>) -> ::reqwest::Body {
    match body.take_whole(|inner| inner.as_bytes().map(Bytes::copy_from_slice)) {
        Some(bytes) => ::reqwest::Body::from(bytes),
        None => ::reqwest::Body::wrap(body),
    }
}

/// The URL a response came from, carried across the conversion to `http::Response`, which
/// drops it.
#[derive(Clone)]
struct ResponseUrl(::reqwest::Url);

fn into_reqwest_response(
    response: http::Response<ResponseBody<::reqwest::Body>>,
) -> ::reqwest::Response {
    let (mut parts, body) = response.into_parts();
    if let Some(ResponseUrl(url)) = parts.extensions.remove::<ResponseUrl>() {
        // reqwest reads the URL from an extension that only its response builder can set.
        let mut builder = http::Response::builder().url(url);
        if let Some(with_url) = builder.extensions_mut() {
            parts.extensions.extend(mem::take(with_url));
        }
    }
    ::reqwest::Response::from(http::Response::from_parts(
        parts,
        ::reqwest::Body::wrap(body),
    ))
}

fn into_middleware_error(error: BoxError) -> reqwest_middleware::Error {
    let error = match error.downcast::<reqwest_middleware::Error>() {
        Ok(error) => return *error,
        Err(error) => error,
    };
    match error.downcast::<CredentialError>() {
        Ok(error) => reqwest_middleware::Error::Middleware(anyhow::Error::new(*error)),
        Err(error) => reqwest_middleware::Error::Middleware(anyhow::Error::from_boxed(error)),
    }
}
