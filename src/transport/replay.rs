//! A request body read once and kept as the frames it arrived in: every attempt sends the same
//! frames again (shared `Bytes`, so a failover copies nothing), and hyper writes them with one
//! vectored write beside the request head. The top-level JSON members the gateway reads (`model`
//! near the front, `stream` and `metadata` at the end of Claude Code's bodies) are found in the
//! first or last frame; only a body whose layout defeats that is joined into one buffer, once.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::wire::json_top;

/// How many bytes from the body's end a lookup of a trailing member reads before it joins the
/// whole body: Claude Code's `stream` and `metadata` members take a few hundred.
const TAIL: usize = 16 * 1024;

/// A request body as the frames it arrived in.
#[derive(Clone, Debug, Default)]
pub struct Frames {
    frames: Arc<[Bytes]>,
    len: usize,
    /// The frames joined, made the first time a lookup needs the whole body.
    joined: OnceLock<Bytes>,
}

impl From<Vec<Bytes>> for Frames {
    fn from(mut frames: Vec<Bytes>) -> Self {
        frames.retain(|f| !f.is_empty());
        Self {
            len: frames.iter().map(Bytes::len).sum(),
            frames: frames.into(),
            joined: OnceLock::new(),
        }
    }
}

impl From<Bytes> for Frames {
    fn from(body: Bytes) -> Self {
        Self::from(vec![body])
    }
}

impl Frames {
    /// The whole body in one buffer: the frame itself when there is one, else a copy made once
    /// and shared by every later call.
    pub fn joined(&self) -> Bytes {
        match &self.frames[..] {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => self
                .joined
                .get_or_init(|| {
                    let mut all = BytesMut::with_capacity(self.len);
                    for f in many {
                        all.extend_from_slice(f);
                    }
                    all.freeze()
                })
                .clone(),
        }
    }

    /// The last `TAIL` bytes or more: the last frame when it is long enough, else the end of the
    /// body copied out of its last frames.
    fn tail(&self) -> Bytes {
        match self.frames.last() {
            None => Bytes::new(),
            Some(last) if last.len() >= TAIL || self.frames.len() == 1 => last.clone(),
            Some(_) => {
                if let Some(all) = self.joined.get() {
                    return all.clone();
                }
                let mut need = TAIL.min(self.len);
                let mut parts = Vec::new();
                for f in self.frames.iter().rev() {
                    let take = need.min(f.len());
                    parts.push(&f[f.len() - take..]);
                    need -= take;
                    if need == 0 {
                        break;
                    }
                }
                let mut tail = BytesMut::with_capacity(TAIL.min(self.len));
                for p in parts.iter().rev() {
                    tail.extend_from_slice(p);
                }
                tail.freeze()
            }
        }
    }

    /// The raw values of the last top-level members named `keys`, in one walk from the body's end
    /// (Claude Code writes `stream` and `metadata` last); the whole body is walked only when its
    /// end does not hold them all.
    pub fn last_members<const N: usize>(&self, keys: [&[u8]; N]) -> [Option<Bytes>; N] {
        let find = |json: &Bytes| {
            let mut found: [Option<Bytes>; N] = std::array::from_fn(|_| None);
            let mut missing = N;
            for (name, value) in json_top::members(json) {
                if let Some(i) = keys.iter().position(|k| json_top::name_is(name, k))
                    && found[i].is_none()
                {
                    found[i] = Some(json.slice_ref(value));
                    missing -= 1;
                    if missing == 0 {
                        break;
                    }
                }
            }
            (found, missing)
        };
        let tail = self.tail();
        let (found, missing) = find(&tail);
        if missing == 0 || tail.len() == self.len {
            return found;
        }
        find(&self.joined()).0
    }

    /// The raw value of the last top-level member `key` (see [`json_top::member`]), read from the
    /// body's end and, only when the end does not hold it, from the whole body.
    pub fn last_member(&self, key: &[u8]) -> Option<Bytes> {
        let [value] = self.last_members([key]);
        value
    }

    /// The raw string value of `key` when it is the body's first member (see
    /// [`json_top::first_string_member`]), read from the first frame when it holds it.
    pub fn first_string_member(&self, key: &[u8]) -> Option<Bytes> {
        let head = self.frames.first()?;
        if let Some(v) = json_top::first_string_member(head, key) {
            return Some(head.slice_ref(v));
        }
        if head.len() == self.len {
            return None;
        }
        let all = self.joined();
        json_top::first_string_member(&all, key).map(|v| all.slice_ref(v))
    }

    /// A body that sends these frames.
    pub fn body(&self) -> ReplayBody {
        ReplayBody {
            frames: Arc::clone(&self.frames),
            next: 0,
            remaining: self.len as u64,
        }
    }
}

/// The body of one upstream attempt: the request's frames, sent in order.
#[derive(Debug)]
pub struct ReplayBody {
    frames: Arc<[Bytes]>,
    next: usize,
    remaining: u64,
}

impl From<Bytes> for ReplayBody {
    fn from(body: Bytes) -> Self {
        Frames::from(body).body()
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(frame) = self.frames.get(self.next).cloned() else {
            return Poll::Ready(None);
        };
        self.next += 1;
        self.remaining -= frame.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    /// `text` cut into frames of `size` bytes.
    fn cut(text: &[u8], size: usize) -> Frames {
        Frames::from(
            text.chunks(size)
                .map(Bytes::copy_from_slice)
                .collect::<Vec<_>>(),
        )
    }

    fn claude_code_body(history: usize) -> Vec<u8> {
        let turns: Vec<String> = (0..history)
            .map(|i| {
                format!(
                    r#"{{"role":"user","content":"turn {i} says \"hi\" {}"}}"#,
                    "x".repeat(90)
                )
            })
            .collect();
        format!(
            r#"{{"model":"claude-sonnet-4","messages":[{}],"stream":true,"metadata":{{"user_id":"{{\"session_id\":\"s-1\"}}"}}}}"#,
            turns.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn lookups_agree_with_the_whole_body_however_it_is_cut() {
        for history in [0, 3, 400] {
            let text = claude_code_body(history);
            let whole = |k: &[u8]| json_top::member(&text, k).map(<[u8]>::to_vec);
            for size in [1, 7, 100, 4096, TAIL - 1, TAIL + 3, text.len()] {
                let f = cut(&text, size);
                assert_eq!(f.len, text.len());
                for key in [
                    &b"stream"[..],
                    b"metadata",
                    b"model",
                    b"messages",
                    b"absent",
                ] {
                    assert_eq!(
                        f.last_member(key).map(|b| b.to_vec()),
                        whole(key),
                        "{history} turns, frames of {size}, {key:?}"
                    );
                }
                for keys in [
                    [&b"stream"[..], b"metadata"],
                    [b"absent", b"stream"],
                    [b"model", b"metadata"],
                ] {
                    let got = f.last_members(keys).map(|v| v.map(|b| b.to_vec()));
                    assert_eq!(got, keys.map(whole), "{history} turns, frames of {size}");
                }
                assert_eq!(
                    f.first_string_member(b"model").as_deref(),
                    Some(&br#""claude-sonnet-4""#[..])
                );
                assert_eq!(&f.joined()[..], &text[..]);
            }
        }
    }

    #[tokio::test]
    async fn every_attempt_sends_the_same_frames() {
        let text = claude_code_body(50);
        let f = cut(&text, 1000);
        for _ in 0..2 {
            let body = f.body();
            assert_eq!(body.size_hint().exact(), Some(text.len() as u64));
            let sent = body.collect().await.expect("infallible").to_bytes();
            assert_eq!(&sent[..], &text[..]);
        }
        let empty = Frames::default().body();
        assert!(empty.is_end_stream());
        assert_eq!(Frames::from(vec![Bytes::new()]).len, 0);
    }
}
