//! Hostile input, generated: arbitrary statuses, headers, bodies cut into arbitrary frames
//! (with lying size hints, trailers, errors, slow polls), arbitrary request bodies, tokens and
//! limits, and refreshers that answer anything.
//!
//! Whatever comes in: nothing panics, a request makes at most two inner calls and one
//! refresher call, a response that was not retried comes back exactly as the inner service
//! sent it (status, headers, every byte, trailers, the error it ended with), a retried one is
//! the retry's, whole, and the retry carried the request body byte for byte.

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use proptest::prelude::*;
use support::*;
use tower::{BoxError, Layer, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::{
    classify, Credential, CredentialError, Credentials, RecoveryReport, RefreshBudget, Verdict,
    XaiOAuthRecoveryLayer,
};

/// Panics other than the refresher's own, on any thread (refresh tasks included).
static UNEXPECTED_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if message != "refresher panicked" {
                UNEXPECTED_PANICS.fetch_add(1, Ordering::SeqCst);
                default(info);
            }
        }));
    });
}

/// How a body ends.
#[derive(Clone, Debug)]
enum End {
    Clean,
    Trailers(Vec<(String, Vec<u8>)>),
    Error,
}

/// A body as generated: its bytes, where they are cut, how it ends, its hint, its pace.
#[derive(Clone, Debug)]
struct BodySpec {
    data: Vec<u8>,
    cuts: Vec<usize>,
    end: End,
    /// 0: the default hint; 1: exact; 2: a lower bound of `lie`.
    hint: (u8, u64),
    slow: bool,
}

impl BodySpec {
    fn body(&self) -> TestBody {
        let mut frames = VecDeque::new();
        let mut rest = &self.data[..];
        let mut cuts = self.cuts.iter().cycle();
        while !rest.is_empty() {
            let n = cuts
                .next()
                .copied()
                .unwrap_or(rest.len())
                .clamp(1, rest.len());
            frames.push_back(Ok(Frame::data(Bytes::copy_from_slice(&rest[..n]))));
            rest = &rest[n..];
        }
        match &self.end {
            End::Clean => {}
            End::Trailers(trailers) => {
                frames.push_back(Ok(Frame::trailers(self.trailers(trailers))))
            }
            End::Error => frames.push_back(Err(std::io::Error::other("connection reset"))),
        }
        let hint = match self.hint {
            (1, _) => {
                let mut hint = SizeHint::with_exact(self.data.len() as u64);
                if !matches!(self.end, End::Clean) {
                    hint = SizeHint::default();
                }
                Some(hint)
            }
            (2, lie) => {
                let mut hint = SizeHint::new();
                hint.set_lower(lie);
                Some(hint)
            }
            _ => None,
        };
        let body = TestBody::from_frames(frames, hint);
        if self.slow {
            body.slow()
        } else {
            body
        }
    }

    /// How many frames the body has, its end included.
    fn frames(&self) -> usize {
        let mut frames = 0;
        let mut rest = self.data.len();
        let mut cuts = self.cuts.iter().cycle();
        while rest > 0 {
            rest -= cuts.next().copied().unwrap_or(rest).clamp(1, rest);
            frames += 1;
        }
        frames + usize::from(!matches!(self.end, End::Clean))
    }

    fn trailers(&self, trailers: &[(String, Vec<u8>)]) -> HeaderMap {
        header_map(trailers)
    }

    /// What reading it yields: data, trailers, error.
    fn expected(&self) -> (Vec<u8>, Option<HeaderMap>, Option<String>) {
        match &self.end {
            End::Clean => (self.data.clone(), None, None),
            End::Trailers(t) => (self.data.clone(), Some(self.trailers(t)), None),
            End::Error => (self.data.clone(), None, Some("connection reset".into())),
        }
    }
}

fn header_map(pairs: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// A response as generated.
#[derive(Clone, Debug)]
struct ResponseSpec {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: BodySpec,
}

impl ResponseSpec {
    fn response(&self) -> Response<TestBody> {
        let mut response = Response::new(self.body.body());
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap();
        *response.headers_mut() = header_map(&self.headers);
        response
    }
}

/// What the refresher does.
#[derive(Clone, Copy, Debug)]
enum RefresherSpec {
    Fresh,
    Transient,
    Terminal,
    Hang,
    Panic,
    Same,
    Invalid,
}

impl RefresherSpec {
    fn behaviour(self) -> Behaviour {
        match self {
            RefresherSpec::Fresh => Behaviour::Fresh {
                delay: Duration::ZERO,
            },
            RefresherSpec::Transient => Behaviour::Transient,
            RefresherSpec::Terminal => Behaviour::Terminal,
            RefresherSpec::Hang => Behaviour::Hang,
            RefresherSpec::Panic => Behaviour::Panic,
            RefresherSpec::Same => Behaviour::Same,
            RefresherSpec::Invalid => Behaviour::Invalid,
        }
    }
}

/// How much of the request body the inner service reads.
#[derive(Clone, Copy, Debug)]
enum Reads {
    All,
    Nothing,
    OneFrame,
}

#[derive(Clone, Debug)]
struct Case {
    first: ResponseSpec,
    retry: ResponseSpec,
    request: BodySpec,
    reads: Reads,
    token: String,
    max_error_body: usize,
    max_replay_body: usize,
    budget: u32,
    refresher: RefresherSpec,
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => Just(403u16),
        3 => Just(401u16),
        3 => 100u16..=599,
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(
            prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff],
            0..40
        ),
        Just(b"Bearer error=\"invalid_token\"".to_vec()),
        Just(b"Bearer realm=\"x\", ERROR=\"INVALID_TOKEN\"".to_vec()),
        (0u64..100_000).prop_map(|n| n.to_string().into_bytes()),
        Just(b"not a number".to_vec()),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        Just("content-length".to_owned()),
        Just("www-authenticate".to_owned()),
        Just("content-type".to_owned()),
        "[a-z][a-z0-9-]{0,12}",
    ];
    prop::collection::vec((name, header_value()), 0..5)
}

fn known_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(STALE_403.as_bytes().to_vec()),
        Just(ENTITLEMENT_403.as_bytes().to_vec()),
        Just(BILLING_403.as_bytes().to_vec()),
        Just(GENERIC_403.as_bytes().to_vec()),
        Just(b"[WKE=unauthenticated:".to_vec()),
        Just(b"unauthenticated:]".to_vec()),
        Just(b"<html>403 Forbidden</html>".to_vec()),
        Just(br#"{"error":{"message":"x","type":"y","code":"unauthenticated:revoked"}}"#.to_vec()),
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..300),
        3 => (
            prop::collection::vec(any::<u8>(), 0..40),
            known_body(),
            prop::collection::vec(any::<u8>(), 0..40),
            any::<bool>(),
        )
            .prop_map(|(before, known, after, upper)| {
                let mut known = known;
                if upper {
                    known.make_ascii_uppercase();
                }
                [before, known, after].concat()
            }),
        1 => Just(Vec::new()),
    ]
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        6 => Just(End::Clean),
        1 => headers().prop_map(End::Trailers),
        2 => Just(End::Error),
    ]
}

fn body() -> impl Strategy<Value = BodySpec> {
    (
        data(),
        prop::collection::vec(1usize..64, 1..6),
        end(),
        (0u8..3, 0u64..1_000),
        any::<bool>(),
    )
        .prop_map(|(data, cuts, end, hint, slow)| BodySpec {
            data,
            cuts,
            end,
            hint,
            slow,
        })
}

fn response() -> impl Strategy<Value = ResponseSpec> {
    (status(), headers(), body()).prop_map(|(status, headers, body)| ResponseSpec {
        status,
        headers,
        body,
    })
}

fn case() -> impl Strategy<Value = Case> {
    (
        (response(), response(), body()),
        prop_oneof![
            4 => Just(Reads::All),
            1 => Just(Reads::Nothing),
            1 => Just(Reads::OneFrame),
        ],
        prop_oneof![
            8 => "[A-Za-z0-9._~+/=-]{1,40}",
            1 => "[ -~]{0,10}[\\x00-\\x1f\\x7f][ -~]{0,10}",
        ],
        (0usize..400, 0usize..400, 0u32..3),
        prop_oneof![
            4 => Just(RefresherSpec::Fresh),
            1 => Just(RefresherSpec::Transient),
            1 => Just(RefresherSpec::Terminal),
            1 => Just(RefresherSpec::Hang),
            1 => Just(RefresherSpec::Panic),
            1 => Just(RefresherSpec::Same),
            1 => Just(RefresherSpec::Invalid),
        ],
    )
        .prop_map(
            |(
                (first, retry, request),
                reads,
                token,
                (max_error_body, max_replay_body, budget),
                refresher,
            )| Case {
                first,
                retry,
                request,
                reads,
                token,
                max_error_body,
                max_replay_body,
                budget,
                refresher,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// The property

/// One request the inner service received: its authorization, body as read, trailers, error.
#[derive(Clone, Debug)]
struct Received {
    authorization: Option<HeaderValue>,
    read: Option<(Vec<u8>, Option<HeaderMap>, Option<String>)>,
}

async fn run(case: Case) -> Result<(), TestCaseError> {
    let received = Arc::new(Mutex::new(Vec::<Received>::new()));
    let answers = Arc::new(Mutex::new(VecDeque::from([
        case.first.response(),
        case.retry.response(),
    ])));
    let inner = {
        let received = received.clone();
        let answers = answers.clone();
        let reads = case.reads;
        tower::service_fn(move |req: Request<RequestBody<TestBody>>| {
            let received = received.clone();
            let answer = answers.lock().unwrap().pop_front();
            async move {
                let authorization = req.headers().get(http::header::AUTHORIZATION).cloned();
                let body = req.into_body();
                let read = match reads {
                    Reads::All => Some(read_all(body).await),
                    Reads::Nothing => None,
                    Reads::OneFrame => {
                        let mut body = std::pin::pin!(body);
                        let _ = std::future::poll_fn(|cx| {
                            http_body::Body::poll_frame(body.as_mut(), cx)
                        })
                        .await;
                        None
                    }
                };
                received.lock().unwrap().push(Received {
                    authorization,
                    read,
                });
                answer.ok_or_else(|| BoxError::from("a third inner call"))
            }
        })
    };
    let credentials = Credentials::new(Credential::new("default", case.token.clone()));
    let refresher = Refresher::with(case.refresher.behaviour());
    let svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .refresh_budget(RefreshBudget::new(case.budget, Duration::from_secs(300)))
        .refresh_timeout(Duration::from_secs(1))
        .max_error_body_bytes(case.max_error_body)
        .max_replay_body_bytes(case.max_replay_body)
        .layer(inner);

    let request = Request::post("https://api.x.ai/v1/chat/completions")
        .body(case.request.body())
        .unwrap();
    let result = svc.oneshot(request).await;
    let received = received.lock().unwrap().clone();
    prop_assert!(received.len() <= 2, "{} inner calls", received.len());
    prop_assert!(
        refresher.calls() <= 1,
        "{} refresher calls",
        refresher.calls()
    );
    prop_assert!(refresher.calls() as u32 <= case.budget);

    let token_is_header = HeaderValue::from_str(&format!("Bearer {}", case.token)).is_ok();
    let response = match result {
        Err(error) => {
            // Only a token that cannot be a header fails a request here: nothing is sent.
            let error = error.downcast_ref::<CredentialError>();
            prop_assert!(error.is_some_and(CredentialError::is_invalid_token));
            prop_assert!(!token_is_header);
            prop_assert_eq!(received.len(), 0);
            return Ok(());
        }
        Ok(response) => response,
    };
    prop_assert!(token_is_header);
    let first = &received[0];
    prop_assert_eq!(
        first
            .authorization
            .as_ref()
            .map(|v| (v.as_bytes().to_vec(), v.is_sensitive())),
        Some((format!("Bearer {}", case.token).into_bytes(), true))
    );
    if let Some(read) = &first.read {
        prop_assert_eq!(read, &case.request.expected());
    }

    let report = response.extensions().get::<RecoveryReport>().cloned();
    let inspected = case.first.status == 401 || case.first.status == 403;
    prop_assert_eq!(report.is_some(), inspected, "{:?}", report);
    if !inspected {
        prop_assert_eq!(refresher.calls(), 0);
    }
    let retried = received.len() == 2;
    prop_assert_eq!(report.as_ref().is_some_and(|r| r.retried()), retried);
    let sent = if retried {
        // The retry carried the same body, byte for byte, with a new token.
        let retry = &received[1];
        // Only a body read to its end without error (or one empty from the start) can be
        // replayed.
        let frames = case.request.frames();
        let read_whole = match case.reads {
            Reads::All => true,
            Reads::OneFrame => frames <= 1,
            Reads::Nothing => false,
        };
        let failed = matches!(case.request.end, End::Error);
        prop_assert!(frames == 0 || (read_whole && !failed), "{:?}", case.request);
        prop_assert_eq!(&first.read, &retry.read);
        prop_assert_ne!(&first.authorization, &retry.authorization);
        prop_assert!(retry
            .authorization
            .as_ref()
            .is_some_and(HeaderValue::is_sensitive));
        let verdict = report.as_ref().map(RecoveryReport::verdict);
        prop_assert!(
            matches!(verdict, Some(Verdict::StaleToken(_))),
            "{:?}",
            verdict
        );
        &case.retry
    } else {
        &case.first
    };
    // The response is the one sent, whole.
    prop_assert_eq!(response.status().as_u16(), sent.status);
    prop_assert_eq!(response.headers(), &header_map(&sent.headers));
    let read = read_all(response.into_body()).await;
    prop_assert_eq!(read, sent.body.expected());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_whole_service_survives_hostile_input(case in case()) {
        count_panics();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(case))?;
        drop(runtime);
        prop_assert_eq!(UNEXPECTED_PANICS.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn classify_never_panics_and_ignores_ascii_case(
        status in status(),
        headers in headers(),
        body in data(),
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        let headers = header_map(&headers);
        let verdict = classify(status, &headers, &body);
        let upper = classify(status, &headers, &body.to_ascii_uppercase());
        prop_assert_eq!(&verdict, &upper);
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            prop_assert_eq!(verdict, Verdict::Unrecognized);
        }
    }
}
