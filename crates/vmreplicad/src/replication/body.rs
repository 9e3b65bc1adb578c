//! The body of a request or an answer between hosts: bytes in memory, or bytes streamed as they
//! are produced (a log from memory or from a file as it is written, a failback base's map from the
//! old primary's file), so neither side holds a large body whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame};

pub enum WireBody {
    Full(Full<Bytes>),
    Stream(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl WireBody {
    pub fn bytes(bytes: impl Into<Bytes>) -> WireBody {
        WireBody::Full(Full::new(bytes.into()))
    }
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            WireBody::Full(f) => Pin::new(f)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(|never| match never {}))),
            WireBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    // Passed on, so an answer in memory keeps its `content-length` and an empty one ends with
    // its headers.
    fn is_end_stream(&self) -> bool {
        match self {
            WireBody::Full(f) => f.is_end_stream(),
            WireBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            WireBody::Full(f) => f.size_hint(),
            WireBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}
