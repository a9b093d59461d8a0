//! Read buffers a worker thread keeps between uses. A connection that waits (a client between
//! requests, an upstream connection back in the pool) holds no buffer, so idle connections stay
//! small; the next read on the thread takes a kept one instead of allocating and later freeing
//! several KiB per request (a medium-sized block, mimalloc's slower path each time), and the
//! memory it reuses is likely still in cache.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers up to this capacity are kept: a usual head and a small body.
pub(crate) const KEPT_CAPACITY: usize = 8 * 1024;
/// Most buffers one thread keeps (256 KiB).
const KEPT: usize = 32;

thread_local! {
    static KEPT_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer kept by this thread, if it has one.
pub(crate) fn take() -> Option<BytesMut> {
    KEPT_BUFFERS.with(|kept| kept.borrow_mut().pop())
}

/// Keeps `buf`, emptied, for this thread's next read, unless it is too big or enough are kept
/// (then it is freed).
pub(crate) fn give(mut buf: BytesMut) {
    if buf.capacity() == 0 || buf.capacity() > KEPT_CAPACITY {
        return;
    }
    buf.clear();
    KEPT_BUFFERS.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.len() < KEPT {
            kept.push(buf);
        }
    });
}

/// Buffers this thread keeps now.
#[cfg(test)]
pub(crate) fn kept() -> usize {
    KEPT_BUFFERS.with(|kept| kept.borrow().len())
}

/// Frees this thread's kept buffers.
#[cfg(test)]
pub(crate) fn forget() {
    KEPT_BUFFERS.with(|kept| kept.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_buffers_are_bounded_in_size_and_number() {
        forget();
        give(BytesMut::new());
        give(BytesMut::with_capacity(KEPT_CAPACITY + 1));
        assert_eq!(kept(), 0, "empty and oversized buffers are freed");
        let mut used = BytesMut::with_capacity(1024);
        used.extend_from_slice(b"leftover");
        give(used);
        let again = take().expect("a kept buffer");
        assert!(again.is_empty() && again.capacity() >= 1024);
        for _ in 0..KEPT + 5 {
            give(BytesMut::with_capacity(64));
        }
        assert_eq!(kept(), KEPT);
        forget();
        assert!(take().is_none());
    }
}
