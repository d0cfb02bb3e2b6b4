//! The body types the layer puts around requests and responses.
//!
//! [`RequestBody`] is what the inner service receives: the caller's body, recorded for one
//! replay while it streams. [`ResponseBody`] is what the caller receives: the inner service's
//! body untouched, or a buffered 401/403 prefix followed by the rest of the stream.

use std::collections::VecDeque;
use std::fmt;
use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{response, HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::report::RecoveryReport;
use crate::service::RetryParts;

pin_project! {
    /// The request body the layer hands to the inner service.
    ///
    /// On the first attempt it streams the caller's body unchanged (no added latency) while
    /// keeping a copy of up to `max_replay_body_bytes`; on the retry it replays that copy. A
    /// body larger than the limit streams just the same, it only cannot be retried.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Empty,
        // `ended` once the tape is: the last poll of the body takes no lock.
        Recording { #[pin] body: B, kept: Arc<Mutex<Kept>>, ended: bool },
        Passthrough { #[pin] body: B },
        /// A replay of a body that was one chunk, the common case: kept without allocating.
        Once { chunk: Option<Bytes> },
        // Boxed: rare, and large beside the others (the body is moved with every request).
        Replay { replay: Box<Replayed> },
    }
}

/// What the first attempt does with a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Empty: nothing to record, it replays as empty.
    Empty,
    /// Record it while it streams, for a replay.
    Record,
    /// Over the limit before it starts: stream it, no replay.
    Pass,
}

impl Plan {
    /// The plan for `body` with a replay limit of `limit` bytes.
    pub(crate) fn of<B: Body>(body: &B, limit: usize) -> Self {
        if body.is_end_stream() {
            Plan::Empty
        } else if body.size_hint().lower() > limit as u64 {
            Plan::Pass
        } else {
            Plan::Record
        }
    }
}

impl<B> RequestBody<B>
where
    B: Body,
{
    /// Wraps `body` for a first attempt, recording it into `retained` when `plan` says so.
    pub(crate) fn first(body: B, plan: Plan, retained: &Retained) -> Self {
        let kind = match plan {
            Plan::Empty => RequestKind::Empty,
            Plan::Pass => RequestKind::Passthrough { body },
            Plan::Record => RequestKind::Recording {
                body,
                kept: retained.0.clone(),
                ended: false,
            },
        };
        Self { kind }
    }
}

impl<B> RequestBody<B> {
    fn empty() -> Self {
        Self {
            kind: RequestKind::Empty,
        }
    }

    fn replay(chunks: VecDeque<Bytes>, trailers: Option<HeaderMap>) -> Self {
        let replay = Box::new(Replayed { chunks, trailers });
        Self {
            kind: RequestKind::Replay { replay },
        }
    }

    /// Takes the whole body as bytes when it is all in memory: an empty body, a replay without
    /// trailers, or a body whose bytes `whole` can tell without polling it. A first attempt's
    /// body is recorded for the replay as if it had streamed, and the body is left empty.
    /// `None` leaves any other body as it was.
    ///
    /// For clients that treat a body held in memory better than a stream (reqwest can clone a
    /// request with such a body, to follow a redirect or to retry it).
    #[cfg(any(feature = "reqwest", test))]
    pub(crate) fn take_whole(&mut self, whole: impl FnOnce(&B) -> Option<Bytes>) -> Option<Bytes> {
        let bytes = match &mut self.kind {
            RequestKind::Empty => Bytes::new(),
            RequestKind::Once { chunk } => chunk.take().unwrap_or_default(),
            RequestKind::Replay { replay } if replay.trailers.is_none() => {
                match replay.chunks.len() {
                    0 => Bytes::new(),
                    1 => replay.chunks.pop_front().unwrap_or_default(),
                    _ => {
                        let len = replay.chunks.iter().map(Bytes::len).sum();
                        let mut all = bytes::BytesMut::with_capacity(len);
                        (replay.chunks.iter()).for_each(|chunk| all.extend_from_slice(chunk));
                        all.freeze()
                    }
                }
            }
            RequestKind::Replay { .. } => return None,
            RequestKind::Recording { body, kept, .. } => {
                let bytes = whole(body)?;
                let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                kept.tape.record(&bytes);
                kept.tape.end();
                bytes
            }
            RequestKind::Passthrough { body } => whole(body)?,
        };
        self.kind = RequestKind::Empty;
        Some(bytes)
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Empty => Poll::Ready(None),
            RequestKindProj::Passthrough { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|res| res.map(|frame| frame.map_data(into_bytes))))
            }
            RequestKindProj::Recording {
                mut body,
                kept,
                ended,
            } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                if *ended {
                    return Poll::Ready(
                        frame.map(|res| res.map(|frame| frame.map_data(into_bytes))),
                    );
                }
                let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                let tape = &mut kept.tape;
                match frame {
                    Some(Ok(frame)) => {
                        let frame = frame.map_data(into_bytes);
                        if let Some(data) = frame.data_ref() {
                            tape.record(data);
                        } else if let Some(trailers) = frame.trailers_ref() {
                            tape.record_trailers(trailers);
                        }
                        if body.is_end_stream() {
                            tape.end();
                            *ended = true;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(error)) => {
                        tape.fail();
                        *ended = true;
                        Poll::Ready(Some(Err(error)))
                    }
                    None => {
                        tape.end();
                        *ended = true;
                        Poll::Ready(None)
                    }
                }
            }
            RequestKindProj::Once { chunk } => {
                Poll::Ready(chunk.take().map(|c| Ok(Frame::data(c))))
            }
            RequestKindProj::Replay { replay } => {
                if let Some(chunk) = replay.chunks.pop_front() {
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                } else if let Some(trailers) = replay.trailers.take() {
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                } else {
                    Poll::Ready(None)
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Empty => true,
            RequestKind::Recording { body, .. } | RequestKind::Passthrough { body } => {
                body.is_end_stream()
            }
            RequestKind::Once { chunk } => chunk.is_none(),
            RequestKind::Replay { replay } => replay.chunks.is_empty() && replay.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Empty => SizeHint::with_exact(0),
            RequestKind::Recording { body, .. } | RequestKind::Passthrough { body } => {
                body.size_hint()
            }
            RequestKind::Once { chunk } => {
                SizeHint::with_exact(chunk.as_ref().map_or(0, |c| c.len() as u64))
            }
            RequestKind::Replay { replay } => {
                SizeHint::with_exact(replay.chunks.iter().map(|c| c.len() as u64).sum())
            }
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            RequestKind::Empty => "empty",
            RequestKind::Recording { .. } => "recording",
            RequestKind::Passthrough { .. } => "passthrough",
            RequestKind::Once { .. } | RequestKind::Replay { .. } => "replay",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    // Free for `Bytes`: it splits off the whole buffer without copying.
    let len = data.remaining();
    data.copy_to_bytes(len)
}

/// A recorded body, replaying.
struct Replayed {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

/// The copy of a request body kept for a replay.
pub(crate) struct Tape {
    /// The first chunk, apart: most request bodies are one chunk, kept without allocating.
    first: Option<Bytes>,
    rest: Vec<Bytes>,
    /// Boxed: rare, and large beside the rest.
    trailers: Option<Box<HeaderMap>>,
    len: usize,
    limit: usize,
    state: TapeState,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TapeState {
    Recording,
    Complete,
    /// Over the limit or failed: no replay.
    Lost,
    /// Handed to a replay already.
    Taken,
}

impl Tape {
    #[inline]
    fn new(limit: usize, state: TapeState) -> Self {
        Self {
            first: None,
            rest: Vec::new(),
            trailers: None,
            len: 0,
            limit,
            state,
        }
    }

    fn record(&mut self, data: &Bytes) {
        if self.state != TapeState::Recording || data.is_empty() {
            return;
        }
        self.len = self.len.saturating_add(data.len());
        if self.len > self.limit {
            self.lose();
        } else if self.first.is_none() {
            self.first = Some(data.clone());
        } else {
            self.rest.push(data.clone());
        }
    }

    fn record_trailers(&mut self, trailers: &HeaderMap) {
        if self.state == TapeState::Recording {
            self.trailers = Some(Box::new(trailers.clone()));
        }
    }

    fn end(&mut self) {
        if self.state == TapeState::Recording {
            self.state = TapeState::Complete;
        }
    }

    fn fail(&mut self) {
        self.lose();
    }

    fn lose(&mut self) {
        self.state = TapeState::Lost;
        self.first = None;
        self.rest = Vec::new();
        self.trailers = None;
    }
}

/// What a request keeps for its retry: its head and its body's recording.
pub(crate) struct Kept {
    head: RetryParts,
    /// The head went to the retry.
    taken: bool,
    tape: Tape,
}

/// The response future's handle on what its request kept for the retry.
pub(crate) struct Retained(Arc<Mutex<Kept>>);

impl Retained {
    /// Keeps `head` for the retry of a request whose body goes by `plan`, with a replay limit
    /// of `limit` bytes: one allocation per request, shared by the body (which records) and
    /// the response future (which replays).
    #[inline]
    pub(crate) fn new<B>(request: &Request<B>, plan: Plan, limit: usize) -> Self {
        let state = match plan {
            Plan::Empty => TapeState::Complete,
            Plan::Record => TapeState::Recording,
            Plan::Pass => TapeState::Lost,
        };
        // Built empty on the heap, then filled where it lies: the head is a few hundred bytes,
        // and copying it into place would cost more than keeping it.
        let mut kept = Arc::new(Mutex::new(Kept {
            head: RetryParts::empty(),
            taken: false,
            tape: Tape::new(limit, state),
        }));
        if let Some(kept) = Arc::get_mut(&mut kept) {
            let kept = kept.get_mut().unwrap_or_else(PoisonError::into_inner);
            kept.head.keep(request);
        }
        Self(kept)
    }

    /// The request for the retry, with `authorization`, if the first attempt's body was
    /// recorded whole (an empty body always is). A body the first attempt did not read to its
    /// end, one over the limit and one that failed cannot be replayed. Only one retry is made.
    pub(crate) fn take<B>(&self, authorization: HeaderValue) -> Option<Request<RequestBody<B>>> {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = &mut *kept;
        let tape = &mut kept.tape;
        if tape.state != TapeState::Complete {
            return None;
        }
        if kept.taken {
            return None;
        }
        kept.taken = true;
        let head = mem::replace(&mut kept.head, RetryParts::empty());
        tape.state = TapeState::Taken;
        let body = match (
            tape.first.take(),
            tape.rest.is_empty(),
            tape.trailers.take().map(|trailers| *trailers),
        ) {
            (None, _, None) => RequestBody::empty(),
            (chunk, true, None) => RequestBody {
                kind: RequestKind::Once { chunk },
            },
            (first, _, trailers) => {
                let mut chunks: VecDeque<Bytes> = mem::take(&mut tape.rest).into();
                if let Some(first) = first {
                    chunks.push_front(first);
                }
                RequestBody::replay(chunks, trailers)
            }
        };
        Some(head.into_request(body, authorization))
    }
}

impl fmt::Debug for Retained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Retained")
            .field("tape", &kept.tape.state)
            .field("taken", &kept.taken)
            .finish()
    }
}

pin_project! {
    /// The response body the layer hands back.
    ///
    /// Responses the layer does not inspect keep their body as it is, streaming. A 401/403
    /// whose body the layer buffered to classify it and then handed back yields the buffered
    /// frames first and then the rest of the original stream, trailers and errors included:
    /// nothing is lost.
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B>
    where
        B: Body,
    {
        Inner { #[pin] body: B },
        Rejoined { held: Pin<Box<Held<B>>> },
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx),
            ResponseKindProj::Rejoined { held } => {
                held.as_mut().project().buffered.poll_rejoined(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Rejoined { held } => held.buffered.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Rejoined { held } => held.buffered.size_hint(),
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            ResponseKind::Inner { .. } => "inner",
            ResponseKind::Rejoined { .. } => "rejoined",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

pin_project! {
    /// A 401/403 response the layer holds while it reads, classifies and perhaps retries it:
    /// the whole error path lives in this one allocation, which becomes the handed-back
    /// response's body if there is no retry.
    pub(crate) struct Held<B>
    where
        B: Body,
    {
        parts: Option<response::Parts>,
        pub(crate) report: Option<RecoveryReport>,
        #[pin]
        pub(crate) buffered: Buffered<B>,
    }
}

impl<B: Body> Held<B> {
    /// Holds a response whose body is to be buffered.
    pub(crate) fn new(parts: response::Parts, body: B) -> Pin<Box<Self>> {
        Box::pin(Self {
            parts: Some(parts),
            report: None,
            buffered: Buffered::new(body),
        })
    }

    /// The response's head (`None` once handed back).
    pub(crate) fn parts(&self) -> Option<&response::Parts> {
        self.parts.as_ref()
    }

    /// The original response, whole: its head, the buffered frames and the rest of its
    /// stream, with `report` in its extensions. `None` if it was handed back already.
    pub(crate) fn hand_back(
        mut held: Pin<Box<Self>>,
        report: RecoveryReport,
    ) -> Option<Response<ResponseBody<B>>> {
        let parts = held.as_mut().project().parts.take()?;
        let body = ResponseBody {
            kind: ResponseKind::Rejoined { held },
        };
        let mut response = Response::from_parts(parts, body);
        response.extensions_mut().insert(report);
        Some(response)
    }
}

/// A frame of `B`, or its error.
type FrameResult<B> = Result<Frame<<B as Body>::Data>, <B as Body>::Error>;

/// Frames in order: the first one kept apart (most error bodies are one frame) and the others.
struct Frames<D> {
    first: Option<Frame<D>>,
    more: VecDeque<Frame<D>>,
}

impl<D> Frames<D> {
    fn push(&mut self, frame: Frame<D>) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(frame);
        } else {
            self.more.push_back(frame);
        }
    }

    fn pop(&mut self) -> Option<Frame<D>> {
        self.first.take().or_else(|| self.more.pop_front())
    }

    fn iter(&self) -> impl Iterator<Item = &Frame<D>> {
        self.first.iter().chain(self.more.iter())
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.more.is_empty()
    }
}

pin_project! {
    /// A 401/403 body read up to the limit: its first frames and what is left of it.
    pub(crate) struct Buffered<B>
    where
        B: Body,
    {
        frames: Frames<B::Data>,
        // The error the body failed with while it was read.
        error: Option<B::Error>,
        // The rest of the stream, `None` once it ended.
        #[pin]
        rest: Option<B>,
        // Bytes of data buffered.
        len: usize,
        // The limit was reached before the body ended.
        overflow: bool,
    }
}

impl<B: Body> Buffered<B> {
    fn new(body: B) -> Self {
        Self {
            frames: Frames {
                first: None,
                more: VecDeque::new(),
            },
            error: None,
            rest: Some(body),
            len: 0,
            overflow: false,
        }
    }

    /// Reads frames until the body ends, fails or passes `limit` bytes.
    pub(crate) fn poll_fill(self: Pin<&mut Self>, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        let mut this = self.project();
        loop {
            if *this.overflow || this.error.is_some() {
                return Poll::Ready(());
            }
            let Some(body) = this.rest.as_mut().as_pin_mut() else {
                return Poll::Ready(());
            };
            if body.is_end_stream() {
                this.rest.set(None);
                return Poll::Ready(());
            }
            match ready!(body.poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        *this.len = this.len.saturating_add(data.remaining());
                        if *this.len > limit {
                            *this.overflow = true;
                        }
                    }
                    this.frames.push(frame);
                }
                Some(Err(error)) => *this.error = Some(error),
                None => this.rest.set(None),
            }
        }
    }

    /// Whether the whole body is buffered (it ended, within the limit, without error).
    pub(crate) fn is_complete(&self) -> bool {
        self.rest.is_none() && !self.overflow && self.error.is_none()
    }

    /// Whether the body stopped being read because it passed the limit.
    pub(crate) fn overflowed(&self) -> bool {
        self.overflow
    }

    /// The buffered frames, then the error the body failed with, then the rest of the stream.
    fn poll_rejoined(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult<B>>> {
        let mut this = self.project();
        if let Some(frame) = this.frames.pop() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.error.take() {
            this.rest.set(None);
            return Poll::Ready(Some(Err(error)));
        }
        let Some(body) = this.rest.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(body.poll_frame(cx));
        if frame.is_none() {
            this.rest.set(None);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|body| body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|frame| frame.data_ref().map(|d| d.remaining() as u64))
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |body| body.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(buffered));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }

    /// The buffered data as one slice: borrowed when it is one chunk, copied otherwise.
    pub(crate) fn contiguous(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut data = self.frames.iter().filter_map(Frame::data_ref);
        match (data.next(), data.next()) {
            (None, _) => std::borrow::Cow::Borrowed(&[]),
            (Some(only), None) if only.chunk().len() == only.remaining() => {
                std::borrow::Cow::Borrowed(only.chunk())
            }
            _ => {
                let mut out = Vec::with_capacity(self.len);
                for chunk in self.frames.iter().filter_map(Frame::data_ref) {
                    if chunk.chunk().len() == chunk.remaining() {
                        out.extend_from_slice(chunk.chunk());
                    } else {
                        // A `Buf` may hold its bytes in several slices; read them without
                        // consuming the frame, which is handed back intact.
                        let mut slices = [std::io::IoSlice::new(&[]); 64];
                        let n = chunk.chunks_vectored(&mut slices);
                        for slice in &slices[..n] {
                            out.extend_from_slice(slice);
                        }
                    }
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// The `Content-Length` a response declares, if it declares a valid one.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn replay(chunks: &[&'static str], trailers: Option<HeaderMap>) -> RequestBody<Full<Bytes>> {
        let chunks = chunks.iter().map(|c| Bytes::from_static(c.as_bytes()));
        RequestBody::replay(chunks.collect(), trailers)
    }

    fn hello() -> (RequestBody<Full<Bytes>>, Retained) {
        let body = Full::new(Bytes::from_static(b"hello"));
        let plan = Plan::of(&body, 64);
        let retained = Retained::new(&Request::new(()), plan, 64);
        (RequestBody::first(body, plan, &retained), retained)
    }

    fn retry(retained: &Retained) -> Option<RequestBody<Full<Bytes>>> {
        let authorization = HeaderValue::from_static("Bearer new");
        let request = retained.take::<Full<Bytes>>(authorization)?;
        assert_eq!(request.headers()["authorization"], "Bearer new");
        Some(request.into_body())
    }

    #[tokio::test]
    async fn a_body_taken_whole_is_recorded_for_the_replay() {
        let (mut body, retained) = hello();
        let whole = body.take_whole(|_| Some(Bytes::from_static(b"hello")));
        assert_eq!(whole.as_deref(), Some(&b"hello"[..]));
        assert!(body.is_end_stream());

        let again = retry(&retained).map(|mut body| body.take_whole(|_| None));
        assert_eq!(again.flatten().as_deref(), Some(&b"hello"[..]));
        assert!(retry(&retained).is_none(), "one retry only");
    }

    #[tokio::test]
    async fn a_body_not_whole_streams_and_records_as_before() {
        let (mut body, retained) = hello();
        assert!(retry(&retained).is_none(), "not read to its end yet");
        assert_eq!(body.take_whole(|_| None), None);
        let sent = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(sent.ok().as_deref(), Some(&b"hello"[..]));
        let replayed = match retry(&retained) {
            Some(body) => body.collect().await.map(|c| c.to_bytes()).ok(),
            None => None,
        };
        assert_eq!(replayed.as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn replays_join_their_chunks_unless_they_have_trailers() {
        let mut body = replay(&["he", "ll", "o"], None);
        assert_eq!(body.take_whole(|_| None).as_deref(), Some(&b"hello"[..]));
        let mut body = replay(&[], None);
        assert_eq!(body.take_whole(|_| None).as_deref(), Some(&b""[..]));
        let mut body = replay(&["hello"], Some(HeaderMap::new()));
        assert_eq!(body.take_whole(|_| None), None);
        assert_eq!(body.size_hint().exact(), Some(5));
    }
}
