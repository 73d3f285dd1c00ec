//! Writing frames to a socket, shared by the block server and the client: small frames are
//! coalesced in a buffer (one syscall for many), and a large payload is written straight from
//! its `Bytes` next to its header (vectored), so shard data is never copied in user space.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::wire::{FrameRepr, FIXED_LEN};

/// Payloads at least this large bypass the coalescing buffer.
const DIRECT_PAYLOAD_BYTES: usize = 16 * 1024;
/// Coalescing buffer of one connection.
const BUFFER_BYTES: usize = 256 * 1024;

/// Sends the frames of `rx` until it closes, an error, or `alive` turns false; flushes when
/// the queue runs empty.
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    wr: W,
    rx: &mut mpsc::Receiver<FrameRepr>,
    alive: Option<&AtomicBool>,
) -> std::io::Result<()> {
    let mut wr = BufWriter::with_capacity(BUFFER_BYTES, wr);
    let mut head = Vec::with_capacity(4096);
    while let Some(f) = rx.recv().await {
        if alive.is_some_and(|a| !a.load(Ordering::Acquire)) {
            break;
        }
        head.resize(FIXED_LEN + f.header.len(), 0);
        f.emit_head(&mut head);
        if f.payload.len() < DIRECT_PAYLOAD_BYTES {
            wr.write_all(&head).await?;
            wr.write_all(&f.payload).await?;
        } else {
            // Frames already buffered go first: order on the wire is order in the queue.
            wr.flush().await?;
            write_all_vectored(wr.get_mut(), &[&head, &f.payload]).await?;
        }
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    wr.flush().await
}

/// Writes every byte of `parts`, in order, with as few syscalls as the socket allows.
pub(crate) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
