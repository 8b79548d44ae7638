//! I/O helpers the actor tests share: deterministic data and the requests that carry it.
//!
//! Included with `#[path = "common/io.rs"] mod io;` by the tests that use it.

use std::sync::Arc;

use qrbd_actors::buffer::BufferPool;
use qrbd_actors::device::IoOp;
use qrbd_actors::testing::buf_from;

/// Deterministic bytes: `len` bytes of an xorshift stream seeded by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A write of `bytes` at `offset`, its data copied into a buffer of `pool`.
pub fn write_op(pool: &BufferPool, offset: u64, bytes: &[u8]) -> IoOp {
    IoOp::Write {
        offset,
        data: Arc::new(buf_from(pool, bytes)),
    }
}
