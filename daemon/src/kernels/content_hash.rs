//! A 128-bit fingerprint of array contents, for keying the derived-matrix cache.
//!
//! Not cryptographic: it guards against accidental reuse (a matrix that changed
//! between calls), not against an adversary, who could only ever hurt their own
//! results. Bytes are cut into fixed pieces of [`PIECE`] bytes, each hashed on its
//! own (in parallel) with four independent multiply-rotate lanes, and the piece
//! hashes are folded in order, so the result depends only on the bytes, never on
//! the thread count or on how a caller feeds them (as long as every update but
//! the last is a whole number of pieces).

use rayon::prelude::*;

/// Bytes per independently hashed piece.
pub const PIECE: usize = 1 << 20;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;

fn round(acc: u64, word: u64) -> u64 {
    acc.wrapping_add(word.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// Two 64-bit hashes of one piece: at most [`PIECE`] bytes, and only a stream's
/// last piece shorter (see [`ContentHash::update_pieces`]).
pub fn piece_hash(bytes: &[u8]) -> (u64, u64) {
    let mut lanes = [P1.wrapping_add(P2), P2, 0, P1.wrapping_neg()];
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&block[8 * i..8 * i + 8]);
            *lane = round(*lane, u64::from_le_bytes(w));
        }
    }
    let mut tail = [0u8; 32];
    let rest = blocks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    for (i, lane) in lanes.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&tail[8 * i..8 * i + 8]);
        *lane = round(*lane, u64::from_le_bytes(w) ^ rest.len() as u64);
    }
    let a = lanes[0].rotate_left(1)
        ^ lanes[1].rotate_left(7)
        ^ lanes[2].rotate_left(12)
        ^ lanes[3].rotate_left(18);
    let b = lanes[0]
        .wrapping_mul(P3)
        .wrapping_add(lanes[1].wrapping_mul(P4))
        .wrapping_add(lanes[2].rotate_left(23))
        .wrapping_add(lanes[3].rotate_left(41).wrapping_mul(P2));
    (
        avalanche(a ^ bytes.len() as u64),
        avalanche(b.wrapping_add(bytes.len() as u64)),
    )
}

/// Incremental fingerprint of a byte stream.
#[derive(Debug, Clone)]
pub struct ContentHash {
    state: (u64, u64),
    len: u64,
}

impl ContentHash {
    /// A fresh hash; `tag` separates streams of different meaning.
    pub fn new(tag: u64) -> Self {
        ContentHash {
            state: (avalanche(tag ^ P4), avalanche(tag.wrapping_add(P3))),
            len: 0,
        }
    }

    /// Adds bytes. Every update but the last must be a multiple of [`PIECE`]
    /// bytes long, so that the pieces do not depend on how the stream was cut.
    pub fn update(&mut self, bytes: &[u8]) {
        debug_assert!(
            self.len.is_multiple_of(PIECE as u64),
            "previous update was not whole pieces"
        );
        let pieces: Vec<(u64, u64)> = bytes.par_chunks(PIECE).map(piece_hash).collect();
        self.update_pieces(&pieces, bytes.len() as u64);
    }

    /// Adds pieces hashed elsewhere ([`piece_hash`] of consecutive [`PIECE`]-byte
    /// pieces of `bytes` bytes in all, in order): the same as [`ContentHash::update`]
    /// with those bytes, for a reader that hashes each piece as it passes.
    pub fn update_pieces(&mut self, pieces: &[(u64, u64)], bytes: u64) {
        debug_assert!(
            self.len.is_multiple_of(PIECE as u64),
            "previous update was not whole pieces"
        );
        debug_assert_eq!(pieces.len() as u64, bytes.div_ceil(PIECE as u64));
        for &(a, b) in pieces {
            self.state.0 = avalanche(self.state.0.rotate_left(17) ^ a).wrapping_mul(P1);
            self.state.1 = avalanche(self.state.1.wrapping_add(b)).rotate_left(29) ^ P3;
        }
        self.len += bytes;
    }

    /// Adds a number (shapes, dtypes) to the stream as its own piece.
    pub fn update_u64(&mut self, v: u64) {
        self.state.0 = avalanche(self.state.0 ^ v.wrapping_mul(P2)).wrapping_add(P4);
        self.state.1 = avalanche(self.state.1.wrapping_add(v).rotate_left(13) ^ P1);
    }

    pub fn finish(&self) -> u128 {
        let a = avalanche(self.state.0 ^ self.len);
        let b = avalanche(self.state.1 ^ self.len.rotate_left(32));
        ((a as u128) << 64) | b as u128
    }
}

/// The bytes of a slice of plain numbers.
pub fn bytes_of<T: Copy>(values: &[T]) -> &[u8] {
    // SAFETY: any initialized memory may be read as bytes; the length is the
    // slice's size in bytes.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(chunks: &[&[u8]]) -> u128 {
        let mut h = ContentHash::new(7);
        for c in chunks {
            h.update(c);
        }
        h.finish()
    }

    #[test]
    fn cut_at_pieces_does_not_matter_and_any_change_does() {
        let data: Vec<u8> = (0..(3 * PIECE + 1234))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let whole = hash(&[&data]);
        assert_eq!(whole, hash(&[&data[..PIECE], &data[PIECE..]]));
        assert_eq!(whole, hash(&[&data[..2 * PIECE], &data[2 * PIECE..]]));
        for &pos in &[0usize, 5, PIECE - 1, PIECE, 2 * PIECE + 17, data.len() - 1] {
            let mut changed = data.clone();
            changed[pos] ^= 1;
            assert_ne!(whole, hash(&[&changed]), "flip at {pos}");
        }
        assert_ne!(whole, hash(&[&data[..data.len() - 1]]));
        let mut other_tag = ContentHash::new(8);
        other_tag.update(&data);
        assert_ne!(whole, other_tag.finish());
    }

    #[test]
    fn pieces_hashed_elsewhere_give_the_same_hash() {
        let data: Vec<u8> = (0..(2 * PIECE + 77)).map(|i| (i % 241) as u8).collect();
        let pieces: Vec<(u64, u64)> = data.chunks(PIECE).map(piece_hash).collect();
        let mut h = ContentHash::new(7);
        h.update_pieces(&pieces, data.len() as u64);
        assert_eq!(h.finish(), hash(&[&data]));
    }

    #[test]
    fn thread_count_does_not_matter() {
        let data: Vec<u8> = (0..(5 * PIECE + 3)).map(|i| (i % 253) as u8).collect();
        let a = crate::kernels::test_util::with_threads(1, || hash(&[&data]));
        let b = crate::kernels::test_util::with_threads(2, || hash(&[&data]));
        assert_eq!(a, b);
    }
}
