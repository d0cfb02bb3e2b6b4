//! A loopback mock of xAI: the inference API and the OAuth token endpoint, over real HTTP/1.1.
//!
//! [`MockXai`] listens on an ephemeral `127.0.0.1` port and answers like xAI does, with xAI's
//! own wire bodies, so that tests, examples and demos can drive the layer (or any client)
//! through every case it must tell apart without a network or an account:
//!
//! | request | answer |
//! |---|---|
//! | `/v1/...` without `Authorization: Bearer` | 401, `WWW-Authenticate: Bearer` |
//! | `/v1/...` with an unknown or stale access token | 403, `... could not be validated. [WKE=unauthenticated:bad-credentials]` |
//! | `/v1/...` as an [`Account::NoSubscription`] account | 403, `... do not have an active Grok subscription ...` |
//! | `/v1/...` as an [`Account::OutOfCredits`] account | 403, `personal-team-blocked:spending-limit` |
//! | `/v1/...` as an [`Account::Subscribed`] account | 200, a `chat.completion` that counts and checksums the request body |
//! | `POST /oauth2/token`, `grant_type=refresh_token` | 200 with a new access token and a rotated refresh token, or 400 `invalid_grant` |
//! | `GET /.well-known/openid-configuration` | `{"issuer":..,"token_endpoint":..}` |
//!
//! A test signs an account in with [`MockXai::sign_in`], which hands out a [`Credential`]
//! holding a valid access token and a refresh token, then turns the knobs: tokens go stale
//! ([`MockXai::expire_access_tokens`]), refresh tokens get revoked
//! ([`MockXai::revoke_refresh_tokens`]), refreshes hand out tokens the API rejects
//! ([`MockXai::set_refresh_issues_stale_tokens`]), the token endpoint fails
//! ([`MockXai::fail_next_token_requests`], [`MockXai::set_token_failure_rate`]) or slows down
//! ([`MockXai::set_latency`]). [`MockXai::stats`] counts what the server saw.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use xai_oauth_recovery::mock::{Account, MockXai};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let xai = MockXai::start().await?;
//! let alice = xai.sign_in("alice", Account::Subscribed);
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let chat = |token: &str| {
//!     Request::post(xai.chat_completions_uri())
//!         .header("authorization", format!("Bearer {token}"))
//!         .body(Full::new(Bytes::from_static(br#"{"model":"grok-4","messages":[]}"#)))
//! };
//!
//! let response = client.request(chat(alice.access_token().secret())?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! // The access token goes stale: the 403 that a refresh fixes.
//! xai.expire_access_tokens();
//! let response = client.request(chat(alice.access_token().secret())?).await?;
//! assert_eq!(response.status(), StatusCode::FORBIDDEN);
//! let body = response.into_body().collect().await?.to_bytes();
//! assert!(String::from_utf8_lossy(&body).contains("[WKE=unauthenticated:bad-credentials]"));
//!
//! let stats = xai.stats();
//! assert_eq!((stats.inference_ok, stats.stale_403), (1, 1));
//! # Ok(())
//! # }
//! ```
//!
//! # Tokens
//!
//! Tokens look random but are deterministic: `mock-at-<n>-<hex>` and `mock-rt-<n>-<hex>`, from
//! a counter and a seeded generator ([`MockXaiBuilder::seed`]), which also drives the random
//! token endpoint failures. Refresh tokens are single use when the server rotates them (the
//! default): a refresh returns a new one and the old one answers `invalid_grant` from then on.
//! Without rotation ([`MockXaiBuilder::rotate_refresh_tokens`]`(false)`) a refresh returns no
//! refresh token and the old one stays valid. Access tokens also go stale on their own once
//! their lifetime ([`MockXaiBuilder::access_token_ttl`], default one hour) has passed, measured
//! on Tokio's clock.
//!
//! # Stopping
//!
//! The server runs on a task of the Tokio runtime that started it, each connection on a task
//! of its own. It stops accepting connections when the last clone of its [`MockXai`] is
//! dropped or on [`MockXai::shutdown`]; open connections finish the requests in flight and
//! close.
//!
//! [`Credential`]: crate::Credential

mod routes;
mod server;
mod state;
mod stats;

pub use server::{MockXai, MockXaiBuilder};
pub use state::Account;
pub use stats::{fnv1a_64, MockStats};
