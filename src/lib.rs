//! A [tower] middleware that keeps long-running xAI API clients alive when their OAuth access
//! token goes stale.
//!
//! xAI answers HTTP 403 with the same `code` text for a stale OAuth access token and for an
//! account without an active Grok subscription; only the body's `error` tells them apart
//! (`[WKE=unauthenticated:bad-credentials]` for the stale token). [`XaiOAuthRecoveryLayer`]
//! wraps any tower HTTP client service, buffers 401/403 bodies, [classifies](classify) them, and
//! for a stale token asks your [`TokenRefresher`] for a new credential before retrying the
//! request once:
//!
//! - one refresher call per credential however many requests fail at once (single flight with a
//!   generation guard), surviving the cancellation of the request that started it;
//! - at most [`RefreshBudget`] refreshes per credential per window (default 3 per 5 minutes),
//!   and none at all for a credential a terminal [`RefreshError`] marked dead;
//! - exactly one retry per request, with the request body replayed from a copy kept while it
//!   streamed to the first attempt;
//! - entitlement, billing and unrecognized responses come back untouched, body and all, with a
//!   [`RecoveryReport`] in their extensions that explains the outcome to a person.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
//! use xai_oauth_recovery::{body::RequestBody, Credential, Credentials, RecoveryReport, RefreshRequest, XaiOAuthRecoveryLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // A stand-in for xAI: "token-1" is stale, "token-2" works.
//! let xai = service_fn(|req: Request<RequestBody<Full<Bytes>>>| async move {
//!     let auth = req.headers()["authorization"].to_str().unwrap_or_default().to_owned();
//!     // Like a server, read the request body: the layer replays what the first attempt read.
//!     req.into_body().collect().await?;
//!     let response = if auth == "Bearer token-2" {
//!         Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")))
//!     } else {
//!         let body = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
//!         let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
//!         *response.status_mut() = StatusCode::FORBIDDEN;
//!         response
//!     };
//!     Ok::<_, Infallible>(response)
//! });
//!
//! let credentials = Credentials::new(Credential::new("default", "token-1"));
//! let refresher = service_fn(|req: RefreshRequest| async move {
//!     Ok::<_, BoxError>(Credential::new(req.stale().id(), "token-2"))
//! });
//! let mut client = ServiceBuilder::new()
//!     .layer(XaiOAuthRecoveryLayer::new(credentials.clone(), refresher))
//!     .service(xai);
//!
//! let request = Request::post("https://api.x.ai/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(b"{\"model\":\"grok-4\"}")))?;
//! let response = client.ready().await?.call(request).await?;
//!
//! assert_eq!(response.status(), StatusCode::OK);
//! let report = response.extensions().get::<RecoveryReport>().cloned();
//! assert!(report.is_some_and(|r| r.retried() && r.refreshed()));
//! assert_eq!(response.into_body().collect().await?.to_bytes(), "{\"ok\":true}");
//! assert_eq!(credentials.default_credential().access_token().secret(), "token-2");
//! # Ok(())
//! # }
//! ```
//!
//! # The request's path
//!
//! 1. The credential is the one named by a [`CredentialId`] extension, else the default one. If
//!    it is known to expire within the refresh-ahead window (default 5 minutes; for a token a
//!    refresh returned, at most half of the lifetime it came with), it is refreshed first,
//!    through the same single flight and budget.
//! 2. `Authorization: Bearer <token>` (marked sensitive) replaces any the caller set, and the
//!    request goes to the inner service while its body is recorded for one replay.
//! 3. Any status but 401/403 comes back untouched, its body streaming.
//! 4. A 401/403 body is buffered up to `max_error_body_bytes` and classified. A stale token
//!    waits for a credential newer than the one the request used, then the request is retried
//!    once and the retry's response returned, whatever it is. Everything else comes back with
//!    its whole body: the buffered prefix, then the rest of the stream.
//! 5. Every response whose first attempt was a 401/403 carries a [`RecoveryReport`].
//!
//! # Clients
//!
//! - Any tower HTTP client service whose request body type is the layer's
//!   [`RequestBody<B>`](body::RequestBody): a hyper-util legacy
//!   `Client<HttpConnector, RequestBody<Full<Bytes>>>` for example (`examples/hyper_client.rs`).
//! - reqwest, through reqwest-middleware: `xai_oauth_recovery::reqwest::XaiOAuthRecoveryMiddleware`
//!   (feature `reqwest`) runs the same service over the rest of the middleware chain.
//! - Tests and demos: `xai_oauth_recovery::mock::MockXai` (feature `mock`), a loopback stand-in
//!   for xAI's API and token endpoint.
//!
//! # Where the layer goes in a stack
//!
//! Outermost first:
//!
//! ```text
//! TraceLayer                 tower-http: one span per call, the layer's retry included
//!   generic retry            tower::retry: 5xx and errors; each retry goes through the layer
//!     XaiOAuthRecoveryLayer  Authorization, 401/403 classification, refresh, one retry
//!       TimeoutLayer         tower::timeout: bounds each attempt
//!         DecompressionLayer tower-http: the layer reads decompressed 401/403 bodies
//!           client           hyper-util legacy Client<_, RequestBody<B>>
//! ```
//!
//! - **Decompression below the layer.** The layer classifies a 401/403 by its body; a gzip body
//!   reads as noise, so above the layer decompression would leave a stale token unrecognised
//!   and unrecovered (the caller would get the decompressed 403, nothing else). Below it,
//!   `DecompressionLayer` also asks for compression (`Accept-Encoding`), and the layer sees the
//!   decoded bytes. It changes only the response body type, which the layer passes on.
//! - **Request bodies below the layer are the layer's.** Everything under the layer receives
//!   [`RequestBody<B>`](body::RequestBody), which records the body for the replay while it
//!   streams: the client must be built for that body type (or for what the layers in between
//!   turn it into), and a layer in between must not consume the body before the client sends it.
//! - **A timeout below the layer** bounds each attempt; the wait for a refresh has its own bound
//!   (`refresh_timeout`). Use tower's `TimeoutLayer` there: tower-http's answers a 408 with a
//!   `Default` body, and hyper's `Incoming` body has no default. To bound a whole call,
//!   refresh and retry included, add a timeout above the layer too.
//! - **A generic retry above the layer**, never below: its retries go through the layer, so each
//!   gets the current token, and refreshes stay within the [`RefreshBudget`] whatever the policy
//!   does, even one that retries every 403. Below the layer it would resend a stale token behind
//!   the layer's back (and `RequestBody` is not `Clone`).
//! - **Tracing outermost**, to see one span per call with its final status.
//!
//! ```
//! use std::future::{ready, Ready};
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use hyper_util::client::legacy::{connect::HttpConnector, Client};
//! use hyper_util::rt::TokioExecutor;
//! use tower::retry::{Policy, RetryLayer};
//! use tower::timeout::TimeoutLayer;
//! use tower::{service_fn, BoxError, ServiceBuilder};
//! use tower_http::decompression::DecompressionLayer;
//! use tower_http::trace::TraceLayer;
//! use xai_oauth_recovery::body::RequestBody;
//! use xai_oauth_recovery::{Credential, Credentials, RefreshRequest, XaiOAuthRecoveryLayer};
//!
//! /// Retries 5xx answers and errors, up to `.0` more times.
//! #[derive(Clone)]
//! struct RetryServerErrors(usize);
//!
//! impl<B: Clone, ResB, E> Policy<Request<B>, Response<ResB>, E> for RetryServerErrors {
//!     type Future = Ready<()>;
//!
//!     fn retry(&mut self, _: &mut Request<B>, result: &mut Result<Response<ResB>, E>) -> Option<Ready<()>> {
//!         let failed = result.as_ref().map_or(true, |r| r.status().is_server_error());
//!         if failed && self.0 > 0 {
//!             self.0 -= 1;
//!             Some(ready(()))
//!         } else {
//!             None
//!         }
//!     }
//!
//!     fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
//!         Some(request.clone())
//!     }
//! }
//!
//! let credentials = Credentials::new(Credential::new("default", "token"));
//! let refresher = service_fn(|req: RefreshRequest| async move {
//!     Ok::<_, BoxError>(Credential::new(req.stale().id(), "new-token"))
//! });
//! let client: Client<HttpConnector, RequestBody<Full<Bytes>>> =
//!     Client::builder(TokioExecutor::new()).build_http();
//!
//! let stack = ServiceBuilder::new()
//!     .layer(TraceLayer::new_for_http())
//!     .layer(RetryLayer::new(RetryServerErrors(2)))
//!     .layer(XaiOAuthRecoveryLayer::new(credentials, refresher))
//!     .layer(TimeoutLayer::new(Duration::from_secs(60)))
//!     .layer(DecompressionLayer::new())
//!     .service(client);
//! # fn assert_client<S: tower::Service<Request<Full<Bytes>>>>(_: &S) {}
//! # assert_client(&stack);
//! ```
//!
//! [tower]: https://docs.rs/tower
#![cfg_attr(docsrs, feature(doc_cfg))]
// Nothing from outside may panic the library: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod budget;
mod classify;
mod credential;
mod future;
mod layer;
mod oauth2;
mod refresh;
mod report;
mod service;

pub mod body;
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub mod mock;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;

pub use budget::RefreshBudget;
pub use classify::{classify, Classify, StaleReason, Verdict, XaiClassifier};
pub use credential::{
    AccessToken, Credential, CredentialError, CredentialId, CredentialUpdates, Credentials,
    RefreshToken,
};
pub use future::ResponseFuture;
pub use layer::XaiOAuthRecoveryLayer;
pub use oauth2::OAuth2Refresher;
pub use refresh::{RefreshError, RefreshReason, RefreshRequest, TokenRefresher};
pub use report::{RecoveryReport, Skip};
pub use service::XaiOAuthRecovery;

/// The error type of boxed errors, as in tower.
pub use tower::BoxError;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
