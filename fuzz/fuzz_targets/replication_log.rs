//! Fuzzes the replication log reader: `verify` and the streaming reader must reject or accept any
//! input without panicking, agree on which, and only ever yield extents inside their disk. The
//! expectation is taken from the input's own header, so the fuzzer gets past it to the frames and
//! the trailer. The same input read resumably, saved at a checkpoint and taken up again from the
//! saved bytes (as a replica does after a restart), an extent or a whole frame at a time (as a
//! replica stages a full image; the input's last byte chooses), must come to the same verdict and
//! yield the same extents as the one pass from there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Read;
use wire::{verify, Content, Expect, FrameData, LogReader, OwnedContent, ReaderCheckpoint};

/// An extent as read: disk, offset, and its bytes or its zero length.
type Item = (u32, u64, Result<Vec<u8>, u64>);

/// Reads the rest of `reader` an extent at a time, or a frame at a time with `by_frame`; `None` when
/// the log is rejected.
fn read_all<R: Read>(reader: &mut LogReader<R>, by_frame: bool) -> Option<Vec<Item>> {
    let mut items = Vec::new();
    let mut spare = FrameData::default();
    loop {
        if by_frame {
            match reader.next_frame(spare) {
                Ok(Some(frame)) => {
                    for e in &frame.extents {
                        items.push((e.disk, e.offset, match &e.content {
                            OwnedContent::Data(range) => {
                                assert!(range.start < range.end && range.end <= frame.data.len(), "data outside its frame");
                                Ok(frame.data.bytes()[range.clone()].to_vec())
                            }
                            OwnedContent::Zero(len) => Err(*len),
                        }));
                    }
                    spare = frame.data;
                }
                Ok(None) => return Some(items),
                Err(_) => return None,
            }
        } else {
            match reader.next_extent() {
                Ok(Some(e)) => items.push((e.disk, e.offset, match e.content {
                    Content::Data(data) => Ok(data.to_vec()),
                    Content::Zero(len) => Err(len),
                })),
                Ok(None) => return Some(items),
                Err(_) => return None,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = LogReader::open_unchecked(data) else {
        return;
    };
    let h = reader.header().clone();
    let expect = Expect { vm: h.vm, relationship: h.relationship, sequence: h.sequence, parent: h.parent };
    let verified = verify(data, &expect);

    let items = read_all(&mut reader, false);
    for (disk, offset, content) in items.iter().flatten() {
        let len = match content {
            Ok(bytes) => bytes.len() as u64,
            Err(len) => *len,
        };
        let end = offset.checked_add(len).expect("no overflow");
        assert!(len > 0 && end <= h.disks[*disk as usize].virtual_size, "extent outside its disk");
    }
    let streamed = items.as_ref().and_then(|_| reader.summary().cloned());

    // Resumed at the second checkpoint the reader offers (the first is right after the header).
    let mut resumable = LogReader::open_resumable(data, &expect).expect("opened once already");
    let mut saved = resumable.checkpoint();
    let mut seen = 0;
    while seen < 2 {
        match resumable.next_extent() {
            Ok(Some(_)) => {
                if let Some(c) = resumable.checkpoint() {
                    saved = Some(c);
                    seen += 1;
                }
            }
            _ => break,
        }
    }
    let saved = saved.expect("a checkpoint after the header");
    let saved = ReaderCheckpoint::from_bytes(&saved.to_bytes()).expect("its bytes read back");
    let rest = &data[saved.offset() as usize..];
    let by_frame = data.last().is_some_and(|b| b & 1 == 1);
    let resumed = LogReader::resume(rest, &saved, &expect).ok().and_then(|mut r| {
        let items = read_all(&mut r, by_frame)?;
        Some((items, r.summary().cloned()?))
    });
    assert_eq!(resumed.as_ref().map(|r| &r.1), verified.as_ref().ok(), "resumed and one pass disagree");
    if let (Some((tail, _)), Some(all)) = (&resumed, &items) {
        assert!(tail.len() <= all.len() && all[all.len() - tail.len()..] == tail[..], "resumed extents differ");
    }

    match (verified, streamed) {
        (Ok(a), Some(b)) => {
            assert_eq!(a, b);
            assert_eq!(a.counts.data_extents + a.counts.zero_extents, items.map_or(0, |i| i.len() as u64));
            assert_eq!(a.bytes, data.len() as u64);
        }
        (Err(_), None) => {}
        (a, b) => panic!("verify and the reader disagree: {a:?} vs {b:?}"),
    }
});
