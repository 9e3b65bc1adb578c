//! Fuzzes the NBD client's parsers of server bytes (greeting, option replies, transmission replies)
//! and the per-request reply checks for READ and BLOCK_STATUS. Nothing may panic; every `Need` must
//! ask for more than is buffered and every `Done` must consume a non-empty prefix.
#![no_main]

use disk::nbd::assemble::{ReadSink, ReplyCollector, ReplySink, StatusSink};
use disk::nbd::parse::{parse_greeting, parse_option_reply, parse_reply, Decoded};
use disk::nbd::NbdProtocolError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let _ = check(rest, parse_greeting(rest));
        }
        1 => option_replies(rest),
        2 => {
            let (len, rest) = take_u16(rest);
            let mut out = vec![0u8; usize::from(len)];
            let _ = collect(rest, ReplyCollector::new(1, ReadSink::new(4096, &mut out)));
        }
        _ => {
            let (len, rest) = take_u16(rest);
            let _ = collect(
                rest,
                ReplyCollector::new(1, StatusSink::new(512, len.into(), vec![1, 2], 1)),
            );
        }
    }
});

fn take_u16(b: &[u8]) -> (u16, &[u8]) {
    match b {
        [x, y, rest @ ..] => (u16::from_be_bytes([*x, *y]), rest),
        _ => (0, b),
    }
}

fn check<T>(buf: &[u8], r: Result<Decoded<T>, NbdProtocolError>) -> Option<(T, usize)> {
    match r.ok()? {
        Decoded::Need(n) => {
            assert!(
                n > buf.len(),
                "asked for {n} bytes with {} buffered",
                buf.len()
            );
            None
        }
        Decoded::Done { value, consumed } => {
            assert!(consumed > 0 && consumed <= buf.len());
            Some((value, consumed))
        }
    }
}

fn option_replies(mut buf: &[u8]) {
    while let Some((_, consumed)) = check(buf, parse_option_reply(buf)) {
        buf = &buf[consumed..];
    }
}

fn collect<S: ReplySink>(mut buf: &[u8], mut collector: ReplyCollector<S>) -> Option<()> {
    loop {
        let (reply, consumed) = check(buf, parse_reply(buf))?;
        if collector.feed(&reply).ok()? {
            let _ = collector.finish();
            return Some(());
        }
        buf = &buf[consumed..];
    }
}
