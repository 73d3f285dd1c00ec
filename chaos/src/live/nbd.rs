//! A small NBD client for the live workload: fixed newstyle handshake with `NBD_OPT_GO`, then
//! one request at a time (simple replies). It speaks to the gateway exactly as QEMU's client
//! does on the wire, but every call has a deadline, so a hung gateway is an error the workload
//! sees (and counts), never a stuck worker.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use continuum_nbd::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How an NBD request ended.
#[derive(Debug)]
pub enum Reply {
    /// Success (a read's data is returned in the `Vec`).
    Ok(Vec<u8>),
    /// The server answered with an NBD error (errno value): the request may or may not have
    /// taken effect (a write that failed midway leaves some blocks written).
    Error(u32),
}

/// One negotiated connection to an export.
pub struct NbdClient {
    stream: TcpStream,
    pub size: u64,
    pub flags: u16,
    handle: u64,
    timeout: Duration,
}

impl NbdClient {
    /// Connects and negotiates `export`.
    pub async fn connect(addr: &str, export: &str, timeout: Duration) -> Result<Self> {
        let go = async {
            let stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            negotiate(stream, export).await
        };
        let (stream, size, flags) = tokio::time::timeout(timeout, go)
            .await
            .context("NBD handshake timed out")??;
        Ok(Self {
            stream,
            size,
            flags,
            handle: 0,
            timeout,
        })
    }

    async fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Reply> {
        self.handle += 1;
        let handle = self.handle;
        let mut req = Vec::with_capacity(wire::REQUEST_HEADER_LEN + data.len());
        req.extend_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        let stream = &mut self.stream;
        let exchange = async move {
            stream.write_all(&req).await?;
            let mut hdr = [0u8; 16];
            stream.read_exact(&mut hdr).await?;
            let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4 bytes"));
            let error = u32::from_be_bytes(hdr[4..8].try_into().expect("4 bytes"));
            let got = u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes"));
            if magic != wire::SIMPLE_REPLY_MAGIC {
                bail!("bad reply magic {magic:#x}");
            }
            if got != handle {
                bail!("reply for handle {got}, expected {handle}");
            }
            if error != 0 {
                return Ok(Reply::Error(error));
            }
            let mut out = Vec::new();
            if cmd == wire::CMD_READ {
                out.resize(len as usize, 0);
                stream.read_exact(&mut out).await?;
            }
            Ok(Reply::Ok(out))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .context("NBD request timed out")?
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Reply> {
        self.request(wire::CMD_READ, 0, offset, len, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<Reply> {
        let flags = if fua { wire::CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len()).context("write too large")?;
        self.request(wire::CMD_WRITE, flags, offset, len, data)
            .await
    }

    pub async fn flush(&mut self) -> Result<Reply> {
        self.request(wire::CMD_FLUSH, 0, 0, 0, &[]).await
    }
}

async fn negotiate(mut s: TcpStream, export: &str) -> Result<(TcpStream, u64, u16)> {
    let mut greet = [0u8; wire::GREETING_LEN];
    s.read_exact(&mut greet).await?;
    let magic = u64::from_be_bytes(greet[0..8].try_into().expect("8 bytes"));
    let opt = u64::from_be_bytes(greet[8..16].try_into().expect("8 bytes"));
    let hflags = u16::from_be_bytes(greet[16..18].try_into().expect("2 bytes"));
    if magic != wire::NBD_MAGIC || opt != wire::IHAVEOPT {
        bail!("not a newstyle NBD server");
    }
    if hflags & wire::FLAG_FIXED_NEWSTYLE == 0 {
        bail!("server is not fixed newstyle");
    }
    let mut cflags = wire::FLAG_C_FIXED_NEWSTYLE;
    if hflags & wire::FLAG_NO_ZEROES != 0 {
        cflags |= wire::FLAG_C_NO_ZEROES;
    }
    let mut out = Vec::new();
    out.extend_from_slice(&cflags.to_be_bytes());
    // NBD_OPT_GO: name length, name, no information requests.
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&data);
    s.write_all(&out).await?;
    let mut export_info = None;
    loop {
        let mut hdr = [0u8; 20];
        s.read_exact(&mut hdr).await?;
        let magic = u64::from_be_bytes(hdr[0..8].try_into().expect("8 bytes"));
        let reply = u32::from_be_bytes(hdr[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(hdr[16..20].try_into().expect("4 bytes"));
        if magic != wire::OPT_REPLY_MAGIC {
            bail!("bad option reply magic {magic:#x}");
        }
        if len > 1 << 20 {
            bail!("option reply of {len} bytes");
        }
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).await?;
        match reply {
            wire::REP_ACK => break,
            wire::REP_INFO if body.len() >= 12 => {
                let kind = u16::from_be_bytes([body[0], body[1]]);
                if kind == wire::INFO_EXPORT {
                    let size = u64::from_be_bytes(body[2..10].try_into().expect("8 bytes"));
                    let flags = u16::from_be_bytes([body[10], body[11]]);
                    export_info = Some((size, flags));
                }
            }
            wire::REP_INFO => {}
            r if r & (1 << 31) != 0 => bail!(
                "export {export} refused (reply {r:#x}): {}",
                String::from_utf8_lossy(&body)
            ),
            _ => {}
        }
    }
    let (size, flags) = export_info.context("server sent no NBD_INFO_EXPORT")?;
    Ok((s, size, flags))
}
