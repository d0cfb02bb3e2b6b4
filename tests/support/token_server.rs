//! A scriptable OAuth token endpoint on 127.0.0.1: a small hyper 1 server that records every
//! request it receives (with its form fields) and answers as the test scripted it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How the server answers one request.
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    /// A status and a body, with `content-type` and, when set, `location`.
    Full {
        status: u16,
        content_type: &'static str,
        location: Option<String>,
        body: String,
    },
    /// A 200 whose body streams `len` bytes in 8 KiB chunks, without a length.
    Chunked { len: usize },
    /// Never answers.
    Hang,
}

impl Answer {
    /// A JSON answer.
    pub(crate) fn json(status: u16, body: impl Into<String>) -> Self {
        Self::Full {
            status,
            content_type: "application/json",
            location: None,
            body: body.into(),
        }
    }

    /// A plain-text answer.
    pub(crate) fn text(status: u16, body: impl Into<String>) -> Self {
        Self::Full {
            status,
            content_type: "text/plain",
            location: None,
            body: body.into(),
        }
    }

    /// A redirect to `location`.
    pub(crate) fn redirect(status: u16, location: impl Into<String>) -> Self {
        Self::Full {
            status,
            content_type: "text/plain",
            location: Some(location.into()),
            body: String::new(),
        }
    }

    /// A successful token response.
    pub(crate) fn token(access: &str, refresh: Option<&str>, expires_in: Option<u64>) -> Self {
        let mut body = serde_json::json!({
            "access_token": access,
            "token_type": "Bearer",
            "id_token": "ignored.id.token",
            "scope": "api",
        });
        if let Some(refresh) = refresh {
            body["refresh_token"] = refresh.into();
        }
        if let Some(expires_in) = expires_in {
            body["expires_in"] = expires_in.into();
        }
        Self::json(200, body.to_string())
    }
}

/// One request the server received.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    /// The body's form fields, in order.
    pub(crate) form: Vec<(String, String)>,
}

impl Received {
    /// The value of a header, as text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

struct State {
    script: Mutex<VecDeque<Answer>>,
    fallback: Mutex<Answer>,
    received: Mutex<Vec<Received>>,
    connections: AtomicUsize,
}

/// The running server. It stops with the test's runtime.
pub(crate) struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
}

impl TokenServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub(crate) async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            script: Mutex::new(VecDeque::new()),
            fallback: Mutex::new(Answer::text(500, "no answer scripted")),
            received: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
        });
        let accepting = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepting.connections.fetch_add(1, Ordering::SeqCst);
                let state = accepting.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    // A client that goes away mid-answer is not the server's problem.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, state })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub(crate) fn uri(&self, path: &str) -> Uri {
        let uri = format!("http://{}{path}", self.addr);
        uri.parse().unwrap_or_default()
    }

    /// The port the server listens on.
    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Answers the next request (after those scripted before) with `answer`.
    pub(crate) fn answer(&self, answer: Answer) {
        lock(&self.state.script).push_back(answer);
    }

    /// Answers every request the script does not cover with `answer`.
    pub(crate) fn answer_always(&self, answer: Answer) {
        *lock(&self.state.fallback) = answer;
    }

    /// Every request received so far.
    pub(crate) fn received(&self) -> Vec<Received> {
        lock(&self.state.received).clone()
    }

    /// How many connections were accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let (parts, body) = request.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let form = form_urlencoded::parse(&bytes).into_owned().collect();
    lock(&state.received).push(Received {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        form,
    });
    let answer = lock(&state.script).pop_front();
    let answer = answer.unwrap_or_else(|| lock(&state.fallback).clone());
    let response = match answer {
        Answer::Full {
            status,
            content_type,
            location,
            body,
        } => {
            let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let Ok(value) = content_type.parse() {
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, value);
            }
            if let Some(Ok(value)) = location.map(|location| location.parse()) {
                response.headers_mut().insert(http::header::LOCATION, value);
            }
            response
        }
        Answer::Chunked { len } => Response::new(Chunks { left: len }.boxed()),
        Answer::Hang => std::future::pending().await,
    };
    Ok(response)
}

/// A body of `left` bytes in 8 KiB frames, with no size hint.
struct Chunks {
    left: usize,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = this.left.min(8 * 1024);
        this.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b' '; n])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
