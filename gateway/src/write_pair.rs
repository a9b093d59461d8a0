//! Two byte slices written back to back without first copying them into one buffer.

use std::io::{self, IoSlice};

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Writes all of `first` then all of `second`, in one `writev` when the socket takes both (a
/// response head and a small body, a request head and a small body). Copying the second behind
/// the first cost a copy of the body into freshly allocated memory per message.
pub(crate) async fn write_all_pair<W: AsyncWrite + Unpin>(
    w: &mut W,
    first: &[u8],
    second: &[u8],
) -> io::Result<()> {
    let mut done = 0;
    while done < first.len() {
        let slices = [IoSlice::new(&first[done..]), IoSlice::new(second)];
        match w.write_vectored(&slices).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    w.write_all(&second[done - first.len()..]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, to cut writes anywhere.
    struct Trickle {
        taken: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.taken.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn both_slices_arrive_whole_and_in_order_however_writes_are_cut() {
        for step in [1, 2, 3, 5, 8, 100] {
            for (first, second) in [("head", "body"), ("h", ""), ("", "b"), ("", "")] {
                let mut w = Trickle {
                    taken: Vec::new(),
                    step,
                };
                write_all_pair(&mut w, first.as_bytes(), second.as_bytes())
                    .await
                    .expect("a writer that never fails");
                assert_eq!(
                    w.taken,
                    format!("{first}{second}").as_bytes(),
                    "step {step}"
                );
            }
        }
    }
}
