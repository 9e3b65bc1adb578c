//! A BLAKE3 hasher whose state can be written down and taken up again, so that a replica can
//! continue verifying a log stream after its own restart (docs/protocol.md §5.3, "Staged upload").
//! `blake3::Hasher` keeps its state private; this one hashes the stream in blocks of [`BLOCK`]
//! bytes, each a complete subtree of BLAKE3's tree, with the low-level functions of
//! `blake3::hazmat`, and keeps the chaining values of the finished subtrees on a stack exactly as
//! BLAKE3's own hasher keeps them for its chunks. Its output is the standard BLAKE3 hash of the
//! bytes (tested against `blake3::hash`), so the writer of a log needs no change.
//!
//! The state is the stack, the count of finished blocks and the bytes of the current block (less
//! than 64 KiB). Whole blocks handed over in one `update` are hashed where they lie; only the
//! current block's bytes are copied.

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use super::bytes::{Cursor, PutLe};

/// Bytes per block: 64 BLAKE3 chunks, enough for the SIMD paths to hash them in parallel.
pub const BLOCK: usize = 64 * blake3::CHUNK_LEN;

/// The deepest stack a 2^64-byte stream needs (one entry per bit of the block count).
const MAX_STACK: usize = 64;

/// BLAKE3 over a stream, with a state that can be saved ([`ResumableHasher::to_bytes`]) and
/// restored ([`ResumableHasher::from_bytes`]).
#[derive(Clone, Default)]
pub struct ResumableHasher {
    /// Chaining values of finished subtrees, largest first.
    stack: Vec<ChainingValue>,
    /// Blocks finished (pushed onto the stack).
    blocks: u64,
    /// The current block's bytes: 0..=BLOCK of them. A full block stays here until more bytes
    /// come, because the last block of the stream is finalized differently (it may be the root).
    pending: Vec<u8>,
}

impl ResumableHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.blocks * BLOCK as u64 + self.pending.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.pending.len() == BLOCK {
                let block = std::mem::take(&mut self.pending);
                self.finish_block(&block);
                self.pending = block;
                self.pending.clear();
            }
            if self.pending.is_empty() {
                // Whole blocks that more bytes follow are hashed in place.
                while data.len() > BLOCK {
                    let (block, rest) = data.split_at(BLOCK);
                    self.finish_block(block);
                    data = rest;
                }
            }
            let take = (BLOCK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    /// Pushes the chaining value of a finished block that is not the last of the stream, merging
    /// every subtree it completes (BLAKE3's `add_chunk_chaining_value`, per block).
    fn finish_block(&mut self, block: &[u8]) {
        debug_assert_eq!(block.len(), BLOCK);
        let mut cv = blake3::Hasher::new()
            .set_input_offset(self.blocks * BLOCK as u64)
            .update(block)
            .finalize_non_root();
        self.blocks += 1;
        let mut total = self.blocks;
        while total & 1 == 0 {
            let left = self
                .stack
                .pop()
                .expect("a completed subtree has a left half");
            cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            total >>= 1;
        }
        self.stack.push(cv);
    }

    /// The BLAKE3 hash of every byte given so far.
    pub fn finalize(&self) -> [u8; 32] {
        if self.blocks == 0 {
            return *blake3::hash(&self.pending).as_bytes();
        }
        // More than one block: the last (non-empty) block is a subtree merged with the stack.
        let mut cv = blake3::Hasher::new()
            .set_input_offset(self.blocks * BLOCK as u64)
            .update(&self.pending)
            .finalize_non_root();
        for left in self.stack[1..].iter().rev() {
            cv = merge_subtrees_non_root(left, &cv, Mode::Hash);
        }
        *merge_subtrees_root(&self.stack[0], &cv, Mode::Hash).as_bytes()
    }

    /// The state, to be given back to [`ResumableHasher::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.stack.len() * 32 + self.pending.len());
        out.put_u64(self.blocks);
        out.put_u32(self.pending.len() as u32);
        out.extend_from_slice(&self.pending);
        out.put_u8(self.stack.len() as u8);
        for cv in &self.stack {
            out.extend_from_slice(cv);
        }
        out
    }

    /// A state [`ResumableHasher::to_bytes`] wrote; `None` if it is not one (the stack must be the
    /// one its block count implies).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut c = Cursor::new(bytes);
        let blocks = c.u64()?;
        let pending_len = c.u32()? as usize;
        let pending = c.take(pending_len)?.to_vec();
        let depth = c.u8()? as usize;
        if pending_len > BLOCK
            || blocks > u64::MAX / BLOCK as u64 - 1
            || (blocks > 0 && pending.is_empty())
            || depth > MAX_STACK
            || depth != blocks.count_ones() as usize
        {
            return None;
        }
        let mut stack = Vec::with_capacity(depth);
        for _ in 0..depth {
            stack.push(c.array::<32>()?);
        }
        if !c.is_empty() {
            return None;
        }
        let mut pending_buf = Vec::with_capacity(BLOCK);
        pending_buf.extend_from_slice(&pending);
        Some(ResumableHasher {
            stack,
            blocks,
            pending: pending_buf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(len: usize) -> Vec<u8> {
        // Not periodic at any block size: a simple xorshift.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn equals_blake3_at_every_length_around_the_block_and_tree_edges() {
        let data = stream(BLOCK * 9 + 3);
        let mut lengths = vec![0, 1, 1023, 1024, 1025];
        for blocks in [1usize, 2, 3, 4, 5, 7, 8, 9] {
            let edge = blocks * BLOCK;
            lengths.extend([edge - 1, edge, edge + 1]);
        }
        lengths.push(data.len());
        for len in lengths.into_iter().filter(|&l| l <= data.len()) {
            let mut h = ResumableHasher::new();
            h.update(&data[..len]);
            assert_eq!(h.len(), len as u64);
            assert_eq!(
                h.finalize(),
                *blake3::hash(&data[..len]).as_bytes(),
                "length {len}"
            );
        }
    }

    #[test]
    fn any_split_of_the_updates_and_any_save_and_restore_give_the_same_hash() {
        let data = stream(BLOCK * 20 + 777);
        let want = *blake3::hash(&data).as_bytes();
        // Pieces of awkward sizes: smaller than, equal to and larger than a block.
        for piece in [1usize, 5, 1000, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let mut h = ResumableHasher::new();
            for (i, chunk) in data.chunks(piece).enumerate() {
                h.update(chunk);
                if i % 3 == 1 {
                    // Saved and restored midway, as across a restart.
                    let saved = h.to_bytes();
                    h = ResumableHasher::from_bytes(&saved).expect("a saved state restores");
                    assert_eq!(h.len() as usize, (i + 1) * piece);
                }
            }
            assert_eq!(h.finalize(), want, "pieces of {piece}");
        }
    }

    #[test]
    fn a_damaged_state_is_refused_not_trusted() {
        let mut h = ResumableHasher::new();
        h.update(&stream(BLOCK * 3 + 5));
        let saved = h.to_bytes();
        assert!(ResumableHasher::from_bytes(&saved).is_some());
        assert!(ResumableHasher::from_bytes(&saved[..saved.len() - 1]).is_none());
        let mut longer = saved.clone();
        longer.push(0);
        assert!(ResumableHasher::from_bytes(&longer).is_none());
        // A block count that does not match the stack's depth.
        let mut wrong = saved.clone();
        wrong[0] = 4;
        assert!(ResumableHasher::from_bytes(&wrong).is_none());
        assert!(ResumableHasher::from_bytes(&[]).is_none());
    }
}
