//! The middleware service.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::HeaderName;
use http::header::AUTHORIZATION;
use http::{Extensions, HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

use crate::body::{Plan, RequestBody, ResponseBody, Retained};
use crate::classify::{Classify, XaiClassifier};
use crate::credential::{CredentialError, CredentialId, Credentials, Current, CurrentCache, Slot};
use crate::future::ResponseFuture;
use crate::layer::{Settings, Shared};
use crate::refresh::{RefreshReason, TokenRefresher};

/// Sets `Authorization: Bearer <token>` on every request and recovers from stale-token
/// 401/403 responses: one refresh per credential however many requests fail at once, within a
/// per-credential budget, and one retry per request.
///
/// Made by [`XaiOAuthRecoveryLayer`](crate::XaiOAuthRecoveryLayer); see the crate docs for the
/// request's whole path.
///
/// # The `Authorization` header
///
/// The layer owns authorization: it replaces any `Authorization` header the caller set with the
/// bearer token of the request's credential (the one named by a [`CredentialId`] extension,
/// else the default one). The header value is built once per credential generation, marked
/// sensitive, and cloned into each request.
///
/// # Errors
///
/// The service's error is a [`BoxError`]: the inner service's error as it was, or a
/// [`CredentialError`] when the request names a credential that does not exist or whose token
/// cannot be a header value. Refresh failures are never errors: the original response comes
/// back with a [`RecoveryReport`](crate::RecoveryReport) that says what happened.
pub struct XaiOAuthRecovery<S, R, C = XaiClassifier> {
    inner: S,
    shared: Arc<Shared<R, C>>,
    /// The default credential as this service last saw it: checking that it is still current
    /// is one atomic read.
    default: CurrentCache,
}

impl<S, R: TokenRefresher> XaiOAuthRecovery<S, R> {
    /// Wraps `inner` with xAI's classifier and the default bounds. To change them, use
    /// [`XaiOAuthRecoveryLayer`](crate::XaiOAuthRecoveryLayer).
    pub fn new(inner: S, credentials: Credentials, refresher: R) -> Self {
        let shared = Shared::new(credentials, refresher, XaiClassifier, &Settings::default());
        Self::from_shared(inner, Arc::new(shared))
    }
}

impl<S, R, C> XaiOAuthRecovery<S, R, C> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<R, C>>) -> Self {
        let default = shared.refresh.credentials.default_slot().cache();
        Self {
            inner,
            shared,
            default,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The credentials the service uses.
    pub fn credentials(&self) -> &Credentials {
        &self.shared.refresh.credentials
    }
}

impl<S: Clone, R, C> Clone for XaiOAuthRecovery<S, R, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            default: self.default.clone(),
        }
    }
}

impl<S: fmt::Debug, R, C: fmt::Debug> fmt::Debug for XaiOAuthRecovery<S, R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XaiOAuthRecovery")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, R, C, ReqB, ResB> Service<Request<ReqB>> for XaiOAuthRecovery<S, R, C>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ReqB: Body,
    ResB: Body,
    C: Classify,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqB, ResB, R, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        // Call the instance `poll_ready` readied; keep a clone for the next call.
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();

        let named = request.extensions().get::<CredentialId>().cloned();
        let (looked_up, guard);
        let (slot, current): (&Arc<Slot>, &Current) = match &named {
            None => (
                shared.refresh.credentials.default_slot(),
                self.default.load(),
            ),
            Some(id) => match shared.refresh.credentials.slot(id.as_str()) {
                Some(slot) => {
                    looked_up = slot;
                    guard = looked_up.load();
                    (&looked_up, &guard)
                }
                None => {
                    let error = CredentialError::unknown(id.as_str());
                    return ResponseFuture::failed(inner, shared, error.into());
                }
            },
        };
        let header = match &current.header {
            Ok(header) => header.clone(),
            Err(error) => return ResponseFuture::failed(inner, shared, error.clone().into()),
        };
        let generation = current.generation;
        let failures = current.failures;
        let expiring = !current.dead && current.expires_within(shared.refresh_ahead);

        request.headers_mut().insert(AUTHORIZATION, header);
        let limit = shared.max_replay_body_bytes;
        let plan = Plan::of(request.body(), limit);
        let retained = Retained::new(&request, plan, limit);
        let request = request.map(|body| RequestBody::first(body, plan, &retained));
        let attempt = Attempt {
            id: named,
            serial: slot.serial,
            generation,
            failures,
            retained,
        };
        if expiring {
            // `slot` may borrow from `shared`, which moves into the future.
            let slot = Arc::clone(slot);
            return send_after_refresh(inner, shared, &slot, attempt, request);
        }
        ResponseFuture::first(inner, shared, attempt, request)
    }
}

/// Waits for the refresh of a credential that expires soon before sending `request`.
#[cold]
#[inline(never)]
fn send_after_refresh<S, ReqB, ResB, R, C>(
    inner: S,
    shared: Arc<Shared<R, C>>,
    slot: &Arc<Slot>,
    attempt: Attempt,
    request: Request<RequestBody<ReqB>>,
) -> ResponseFuture<S, ReqB, ResB, R, C>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body,
{
    let wait = shared
        .refresh
        .newer_than(slot, attempt.generation, attempt.failures, || {
            RefreshReason::ExpiresSoon
        });
    ResponseFuture::expiring(inner, shared, attempt, wait, request)
}

/// What a request needs for its one retry.
pub(crate) struct Attempt {
    /// The credential the request named, `None` for the default one.
    pub(crate) id: Option<CredentialId>,
    /// The serial number of the slot of the credential the request was sent with.
    pub(crate) serial: u64,
    /// The generation of the credential the request was sent with.
    pub(crate) generation: u64,
    /// How many refreshes of that generation had failed when the request was sent.
    pub(crate) failures: u64,
    /// The request's head and body, kept for the retry.
    pub(crate) retained: Retained,
}

impl Attempt {
    /// The slot that holds the request's credential now: the one the request used, another one
    /// if the credential was removed and inserted again since, or none if it was removed.
    pub(crate) fn slot<R, C>(&self, shared: &Shared<R, C>) -> Option<Arc<Slot>> {
        let credentials = &shared.refresh.credentials;
        match &self.id {
            None => Some(credentials.default_slot().clone()),
            Some(id) => credentials.slot(id.as_str()),
        }
    }

    /// The id of the request's credential.
    pub(crate) fn credential_id<R, C>(&self, shared: &Shared<R, C>) -> Arc<str> {
        match &self.id {
            None => shared.refresh.credentials.default_slot().id.clone(),
            Some(id) => id.as_arc().clone(),
        }
    }
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempt")
            .field("credential", &self.id)
            .field("generation", &self.generation)
            .field("retained", &self.retained)
            .finish_non_exhaustive()
    }
}

/// The request's head, kept for the retry (the body is replayed separately).
///
/// The retry sets its own `Authorization`, so the head keeps every other header and where
/// `Authorization` goes. A head with few headers keeps them inline, in the order the request
/// had them: cloning names and values costs no allocation, where cloning a `HeaderMap`
/// allocates twice for every request, retried or not.
pub(crate) struct RetryParts {
    method: Method,
    uri: Uri,
    version: Version,
    headers: KeptHeaders,
    extensions: Extensions,
}

/// At most this many header values (besides `Authorization`) are kept inline.
const INLINE_HEADERS: usize = 4;

enum KeptHeaders {
    /// The values in the map's order; `Authorization` goes before the one at index
    /// `authorization` (after the last one when there is none).
    Inline {
        values: [Option<(HeaderName, HeaderValue)>; INLINE_HEADERS],
        authorization: usize,
    },
    /// A clone of the whole map, `Authorization` included (the retry replaces it in place).
    Map(HeaderMap),
}

impl KeptHeaders {
    fn empty() -> Self {
        KeptHeaders::Inline {
            values: Default::default(),
            authorization: 0,
        }
    }

    /// Keeps `headers`, which hold exactly one `Authorization` value, in place of the empty
    /// `self` (written where it lies: the head is large and lives on the heap).
    #[inline]
    fn keep(&mut self, headers: &HeaderMap) {
        let KeptHeaders::Inline {
            values,
            authorization,
        } = self
        else {
            *self = KeptHeaders::Map(headers.clone());
            return;
        };
        if headers.len() > INLINE_HEADERS + 1 {
            *self = KeptHeaders::Map(headers.clone());
            return;
        }
        let mut kept = 0;
        for (name, value) in headers {
            if name == AUTHORIZATION {
                *authorization = kept;
                continue;
            }
            match values.get_mut(kept) {
                Some(slot) => *slot = Some((name.clone(), value.clone())),
                None => {
                    *self = KeptHeaders::Map(headers.clone());
                    return;
                }
            }
            kept += 1;
        }
    }

    fn into_map(self, authorization: HeaderValue) -> HeaderMap {
        match self {
            KeptHeaders::Map(mut headers) => {
                headers.insert(AUTHORIZATION, authorization);
                headers
            }
            KeptHeaders::Inline {
                values,
                authorization: at,
            } => {
                let mut headers = HeaderMap::with_capacity(INLINE_HEADERS + 1);
                let mut authorization = Some(authorization);
                for (i, value) in values.into_iter().enumerate() {
                    if i == at {
                        if let Some(authorization) = authorization.take() {
                            headers.insert(AUTHORIZATION, authorization);
                        }
                    }
                    if let Some((name, value)) = value {
                        headers.append(name, value);
                    }
                }
                if let Some(authorization) = authorization {
                    headers.insert(AUTHORIZATION, authorization);
                }
                headers
            }
        }
    }
}

impl RetryParts {
    /// An empty head, to keep a request's in.
    pub(crate) fn empty() -> Self {
        Self {
            method: Method::GET,
            uri: Uri::default(),
            version: Version::default(),
            headers: KeptHeaders::empty(),
            extensions: Extensions::new(),
        }
    }

    /// Keeps the head of `request`, whose headers hold its `Authorization`, in place of the
    /// empty `self`.
    #[inline]
    pub(crate) fn keep<B>(&mut self, request: &Request<B>) {
        self.method = request.method().clone();
        self.uri = request.uri().clone();
        self.version = request.version();
        self.headers.keep(request.headers());
        self.extensions = request.extensions().clone();
    }

    pub(crate) fn into_request<B>(
        self,
        body: RequestBody<B>,
        authorization: http::HeaderValue,
    ) -> Request<RequestBody<B>> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.into_map(authorization);
        *request.extensions_mut() = self.extensions;
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap_or_else(|_| {
            unreachable!("a valid header value");
        });
        value.set_sensitive(true);
        value
    }

    fn listed(headers: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect()
    }

    /// The retry's headers are the first attempt's, in the same order, with the new
    /// `Authorization` where the old one was: for heads kept inline and for heads kept whole.
    #[test]
    fn the_retry_head_is_the_first_heads_with_the_new_authorization() {
        let names = ["accept", "x-a", "x-b", "x-c", "x-d", "x-e"];
        for count in 0..=names.len() {
            for auth_at in 0..=count {
                for repeated in [false, true] {
                    let mut first = HeaderMap::new();
                    for (i, name) in names.iter().take(count).enumerate() {
                        if i == auth_at {
                            first.insert(AUTHORIZATION, bearer("old"));
                        }
                        first.append(*name, HeaderValue::from_static("1"));
                        if repeated && i == 0 {
                            first.append(*name, HeaderValue::from_static("2"));
                        }
                    }
                    if auth_at == count {
                        first.insert(AUTHORIZATION, bearer("old"));
                    }
                    let mut kept = KeptHeaders::empty();
                    kept.keep(&first);
                    let mut expected = first.clone();
                    expected.insert(AUTHORIZATION, bearer("new"));
                    let retried = kept.into_map(bearer("new"));
                    assert_eq!(listed(&retried), listed(&expected), "{count} {auth_at}");
                }
            }
        }
    }
}
