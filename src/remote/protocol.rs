//! What the controller and an agent exchange, defined once.
//!
//! The controller starts one `relaymove agent serve` per host (one process, one SSH channel).
//! The agent first sends a [`Hello`]; then the controller sends [`Request`]s on stdin, one
//! at a time:
//! - `Scan`, `Hash`: answered with one frame, `Reply<Manifest>` or `Reply<Vec<(path, hash)>>`.
//! - `Send`: answered with the transfer stream (a tar, zstd-compressed unless the request
//!   says otherwise) cut into chunks, then
//!   a `Reply<()>` frame saying whether the sender finished.
//! - `Space`: answered with `Reply<Space>`, the free space where a root is (or would be).
//! - `DirectKey` on the sender, `DirectAccept` on the receiver: set up a direct transfer
//!   (`remote::direct`); `Send` and `Receive` then name it and the stream flows between the
//!   hosts, not through the controller.
//! - `Receive`: followed on stdin by the stream's chunks (or, direct, preceded by `Connected`); answered with [`ReceiveEvent`]
//!   frames, progress then `Done` or `Failed`. `Failed` is sent as soon as the receiver
//!   fails; the controller then may close the agent's input instead of finishing the
//!   stream, and the agent ends.
//!
//! A frame is an 8-byte little-endian length and a zstd-compressed postcard body: compact,
//! and raw byte paths travel as they are. A chunk is a 4-byte little-endian length and that
//! many stream bytes; a zero length ends the stream. Concatenated chunk payloads are exactly
//! the stream, so `--tee-stream` writes them as they pass.

use anyhow::{bail, Context, Result};
use serde::de::{DeserializeOwned, DeserializeSeed, EnumAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::net::IpAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sync::compress::Compression;
use crate::sync::manifest::{raw_path, Digest, Entry, Manifest, Skipped};
use crate::sync::plan::{Plan, SendItem};
use crate::sync::receive::{ReceiveProgress, ReceiveStats};

/// Largest decoded frame body. The biggest messages are manifests and plans: measured on
/// /usr (138,000 entries), a manifest is 100 bytes an entry decoded (127 with `--checksum`),
/// so 1 GiB holds some 8 million entries, far more than a mail server's trees. Without this
/// bound a 33 KB frame of compressed zeros made the reader allocate whatever it decoded to.
const MAX_DECODED: u64 = 1 << 30;
/// Largest compressed frame body. The same manifests compress 7:1 (3:1 with hashes, which do
/// not compress); half the decoded bound leaves room for less regular names. The body is
/// read as it arrives, so a length claimed but not sent costs no memory.
const MAX_FRAME: u64 = MAX_DECODED / 2;
/// Stream chunks are at most this long.
pub const CHUNK: usize = 1 << 20;

/// Makes the pipe `fd` (if it is one) hold a whole chunk instead of Linux's default 64 KiB.
/// With 64 KiB, a chunk crossed each pipe in 16 hand-overs while the process on its other end
/// waited: the sender, the controller's relay and the receiver took turns instead of working
/// at once (perf trace of a local first copy: the sender blocked in write 4.2 s, the
/// receiver's reader in read 4.2 s, of 6.6 s). Best effort: fs.pipe-max-size may refuse it.
pub fn widen_pipe(fd: impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
}

/// Changes whenever a message changes shape; the agent's file name pins the exact build.
pub const PROTOCOL: u32 = 9;

/// The agent's first frame: proof it started and speaks this protocol.
#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub protocol: u32,
}

/// `Send` and `Receive` borrow the plan on the controller's side: it sends them without a
/// copy (measured: the copies were 8 MB of the controller's 54 MB peak on a 66k-entry first
/// copy); an agent decodes them owned.
#[derive(Serialize, Deserialize, Debug)]
pub enum Request<'a> {
    Scan {
        root: Vec<u8>,
        checksum: bool,
        excludes: Vec<String>,
    },
    Hash {
        root: Vec<u8>,
        #[serde(with = "crate::sync::manifest::raw_path::list")]
        paths: Vec<Vec<u8>>,
    },
    Send {
        root: Vec<u8>,
        items: Cow<'a, [SendItem]>,
        /// How the stream is compressed: a plain tar when both agents are on the
        /// controller's host, where compressing would only cost CPU.
        compression: Compression,
        /// Bytes of stream a second at most (`--bwlimit`).
        bwlimit: Option<u64>,
        /// Write the stream to new's agent directly instead of to stdout (the direct route);
        /// the chunks then never reach the controller, only the `Reply<()>` does.
        to: Option<DirectSend>,
    },
    Receive {
        root: Vec<u8>,
        plan: Cow<'a, Plan>,
        /// Keep setuid/setgid bits on root-owned files; else the receiver drops them,
        /// whatever the stream's headers say.
        keep_setuid: bool,
        /// The stream is zstd-compressed (the sender's compression is not `None`).
        compressed: bool,
        /// Read the stream from the connection of this direct transfer (see `DirectAccept`)
        /// instead of stdin; stdin then only cancels: any input or its end stops the wait.
        from: Option<String>,
    },
    /// On the sending host: make the one-time key of direct transfer `token` to new at
    /// `address:port`; answered with `Reply<KeyMade>`.
    DirectKey {
        token: String,
        address: String,
        port: u16,
    },
    /// On the receiving host: authorize `public_key` from `from` for transfer `token` and
    /// listen for it; answered with `Reply<Accepting>`.
    DirectAccept {
        token: String,
        public_key: String,
        from: IpAddr,
    },
    /// Run at low CPU and I/O priority (nice 10, best-effort I/O class level 7) or at
    /// normal priority from now on; answered with `Reply<()>`.
    Priority { low: bool },
    /// Free space of the file system that holds `root` (or its nearest existing ancestor).
    Space { root: Vec<u8> },
    /// Lock the tree at `root` for this agent's session (a file per tree under /run),
    /// waiting up to `wait_s` seconds while another process holds it; answered with
    /// `Reply<()>`, an error naming the holder's pid when another still has it.
    LockTree { root: Vec<u8>, wait_s: u32 },
    /// Take an exclusive lock on a file of the host and hold it while the agent runs;
    /// answered with `Reply<()>`, an error naming the holder when another process has it.
    Lock { path: Vec<u8> },
}

/// An agent's answer: the value, or the error chain as text.
pub type Reply<T> = Result<T, String>;

pub type Hashes = Vec<(Vec<u8>, Option<Digest>)>;

/// What the agent's user may still use on a file system (`statvfs`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct Space {
    pub bytes_free: u64,
    /// `u64::MAX` where the file system has no inode limit (btrfs reports none).
    pub inodes_free: u64,
    /// Allocation unit: every file takes a whole number of these.
    pub block: u64,
}

/// Where the sender of a direct transfer connects, as the two agents agreed.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DirectSend {
    pub token: String,
    /// The login user on new.
    pub user: String,
    /// New's SSH host keys, `type base64` each: the only ones old's `ssh` accepts.
    pub host_keys: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum ReceiveEvent {
    /// A direct transfer's sender connected.
    Connected,
    Progress(ReceiveProgress),
    Done(ReceiveStats),
    /// The error chain as text, and the OS error number behind it, if any: the controller
    /// tells a full or read-only DEST (a rerun fails the same way) from a broken stream.
    Failed {
        message: String,
        errno: Option<i32>,
    },
}

/// Counts the bytes that pass through and refuses any past `limit`: the bound on a frame's
/// decoded body, applied while it is encoded or decoded, never to a whole copy of it.
/// Postcard reports any I/O error as its own, so `over` says afterwards which it was.
struct Bounded<T> {
    inner: T,
    left: u64,
    over: bool,
}

impl<T> Bounded<T> {
    fn new(inner: T, limit: u64) -> Bounded<T> {
        Bounded {
            inner,
            left: limit,
            over: false,
        }
    }

    fn refuse(&mut self) -> io::Error {
        self.over = true;
        io::Error::other("protocol message over its size bound")
    }
}

impl<W: Write> Write for Bounded<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.len() as u64 > self.left {
            return Err(self.refuse());
        }
        let n = self.inner.write(data)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // One byte past the limit tells "exactly the limit" from "more".
        let room = usize::try_from(self.left).map_or(usize::MAX, |l| l.saturating_add(1));
        let want = out.len().min(room);
        let n = self.inner.read(&mut out[..want])?;
        if n as u64 > self.left {
            return Err(self.refuse());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Longest string or path a frame may hold: postcard decoding from a reader copies each
/// string, and each path read as bytes (`manifest::raw_path`), here.
const SCRATCH: usize = 1 << 20;

/// A frame: the length, then the body postcard-encoded straight into the compressor, so a
/// manifest never exists uncompressed in one piece (measured: 8 MB of a 66k-entry sender's
/// 46 MB peak).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![0u8; 8];
    let encoder = zstd::Encoder::new(&mut out, 1).context("compressing a protocol message")?;
    let mut bounded = Bounded::new(encoder, MAX_DECODED);
    let encoded = postcard::to_io(value, io::BufWriter::with_capacity(64 << 10, &mut bounded))
        .map_err(anyhow::Error::from)
        .and_then(|w| w.into_inner().map(drop).map_err(|e| e.into_error().into()));
    if bounded.over {
        bail!("a protocol message is larger than the {MAX_DECODED} bytes the peer accepts; sync the tree in parts");
    }
    encoded.context("encoding a protocol message")?;
    bounded
        .inner
        .finish()
        .context("compressing a protocol message")?;
    let len = (out.len() - 8) as u64;
    out[..8].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// A `Reply<Manifest>` frame written as a scan goes: each entry is encoded and compressed
/// when it is found, so an agent never holds its tree's manifest (measured on 66k files: an
/// agent peaked at 24-25 MB holding it, more than the controller). The body is three zstd
/// frames, which a decoder reads as one stream: the reply up to the number of entries (known
/// only at the end), the entries, and the rest of the manifest.
pub struct ManifestFrame {
    entries: Bounded<zstd::Encoder<'static, Vec<u8>>>,
    /// Entries encoded, not yet compressed: the compressor gets them in large writes. (Each
    /// entry through `postcard::to_io` flushed the compressor, one block an entry: 0.4 s of
    /// CPU for 56k entries, and twice the bytes.)
    pending: Vec<u8>,
    count: u64,
}

/// How much of encoded entries [`ManifestFrame`] compresses at once.
const PENDING: usize = 64 << 10;

impl ManifestFrame {
    pub fn new() -> Result<ManifestFrame> {
        let encoder =
            zstd::Encoder::new(Vec::new(), 1).context("compressing a protocol message")?;
        Ok(ManifestFrame {
            entries: Bounded::new(encoder, MAX_DECODED),
            pending: Vec::with_capacity(PENDING + 4096),
            count: 0,
        })
    }

    pub fn push(&mut self, e: &Entry) -> Result<()> {
        self.pending = postcard::to_extend(e, std::mem::take(&mut self.pending))
            .context("encoding a manifest")?;
        self.count += 1;
        if self.pending.len() >= PENDING {
            self.compress()?;
        }
        Ok(())
    }

    fn compress(&mut self) -> Result<()> {
        if let Err(e) = self.entries.write_all(&self.pending) {
            if self.entries.over {
                bail!("the manifest is larger than the {MAX_DECODED} bytes the controller accepts; sync the tree in parts");
            }
            return Err(e).context("compressing a manifest");
        }
        self.pending.clear();
        Ok(())
    }

    /// Writes the frame: the entries pushed, and of `rest` everything but its entries.
    pub fn write(mut self, w: &mut impl Write, rest: &Manifest) -> Result<()> {
        self.compress()?;
        let entries = self
            .entries
            .inner
            .finish()
            .context("compressing a manifest")?;
        /// `Reply::Ok`'s variant and `Manifest`'s fields, as their derived encodings write
        /// them; a length is a varint either way.
        #[derive(Serialize)]
        struct Head(u32, bool, u64);
        #[derive(Serialize)]
        struct Tail<'a>(&'a [Skipped], Vec<raw_path::Borrowed<'a>>);
        let compress = |part: Vec<u8>| zstd::bulk::compress(&part, 1);
        let head = compress(postcard::to_stdvec(&Head(0, rest.root_exists, self.count))?)?;
        let leftovers = rest
            .leftovers
            .iter()
            .map(|p| raw_path::Borrowed(p))
            .collect();
        let tail = compress(postcard::to_stdvec(&Tail(&rest.skipped, leftovers))?)?;
        let len = (head.len() + entries.len() + tail.len()) as u64;
        if len > MAX_FRAME {
            bail!("the manifest is larger than the {MAX_FRAME} bytes the controller accepts; sync the tree in parts");
        }
        w.write_all(&len.to_le_bytes())?;
        for part in [head, entries, tail] {
            w.write_all(&part)?;
        }
        w.flush()?;
        Ok(())
    }
}

/// Decodes a frame's body as it is decompressed, never holding it whole.
fn decode_body<T: DeserializeOwned>(body: &[u8], limit: u64) -> Result<T> {
    decode_body_seed(body, limit, PhantomData::<T>)
}

/// [`decode_body`] through a seed, which may hand on parts of the message as they come.
fn decode_body_seed<T, S: for<'de> DeserializeSeed<'de, Value = T>>(
    body: impl Read,
    limit: u64,
    seed: S,
) -> Result<T> {
    let decoder =
        zstd::stream::read::Decoder::new(body).context("decompressing a protocol message")?;
    let mut bounded = Bounded::new(decoder, limit);
    let mut scratch = vec![0u8; SCRATCH];
    let reader = io::BufReader::with_capacity(64 << 10, &mut bounded);
    let mut de = postcard::Deserializer::from_flavor(postcard::de_flavors::io::io::IOReader::new(
        reader,
        &mut scratch[..],
    ));
    let decoded = seed.deserialize(&mut de);
    if bounded.over {
        bail!("protocol message decodes to more than {limit} bytes; refused (the peer is not a relaymove agent of this version)");
    }
    decoded.context("decoding a protocol message (is the agent the same version?)")
}

/// A frame's body as a blocking reader gets it: pieces read by an async task, which go
/// through a channel of a few, so the body is never whole in memory.
struct Pieces {
    from: tokio::sync::mpsc::Receiver<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
}

impl Read for Pieces {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.piece.len() {
            match self.from.blocking_recv() {
                Some(piece) => (self.piece, self.at) = (piece, 0),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.piece.len() - self.at);
        out[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn check_len(len: u64) -> Result<u64> {
    if len > MAX_FRAME {
        bail!("protocol frame of {len} bytes is too large; the peer is not a relaymove agent of this version");
    }
    Ok(len)
}

/// Reads one frame; `Ok(None)` on a clean end of input before the frame started.
pub fn read_frame_opt<T: DeserializeOwned>(r: &mut impl Read) -> Result<Option<T>> {
    let mut len = [0u8; 8];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => bail!("input ended inside a protocol frame"),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading a protocol frame"),
        }
    }
    let len = check_len(u64::from_le_bytes(len))?;
    let mut body = Vec::new();
    (&mut *r)
        .take(len)
        .read_to_end(&mut body)
        .context("reading a protocol frame")?;
    if body.len() as u64 != len {
        bail!("input ended inside a protocol frame");
    }
    decode_body(&body, MAX_DECODED).map(Some)
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, value: &T) -> Result<()> {
    w.write_all(&encode(value)?)?;
    w.flush()?;
    Ok(())
}

/// Frames with a body this large are decoded on a blocking thread, so the controller
/// decodes the two manifests of a mirror at once, on two cores, not one after the other.
const DECODE_APART: u64 = 64 << 10;

pub async fn read_frame_async<T: DeserializeOwned + Send + 'static>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<T> {
    let body = read_body(r).await?;
    if (body.len() as u64) < DECODE_APART {
        return decode_body(&body, MAX_DECODED);
    }
    tokio::task::spawn_blocking(move || decode_body(&body, MAX_DECODED))
        .await
        .context("decoding a protocol message")?
}

/// [`read_frame_async`] through a seed (`Reply<Manifest>` through [`ReplySeed`] and
/// `manifest::EachBatch`, so a manifest's entries are passed on as they are decoded),
/// decoded as it arrives: neither the body nor what it decodes to is ever whole here.
/// Always decoded on a blocking thread: a seed may wait on whoever it hands its parts to.
pub async fn read_frame_seed_async<T, S>(r: &mut (impl AsyncRead + Unpin), seed: S) -> Result<T>
where
    T: Send + 'static,
    S: for<'de> DeserializeSeed<'de, Value = T> + Send + 'static,
{
    let mut len = [0u8; 8];
    r.read_exact(&mut len)
        .await
        .context("reading a protocol frame")?;
    let mut left = check_len(u64::from_le_bytes(len))?;
    let (pieces, from) = tokio::sync::mpsc::channel(4);
    let body = Pieces {
        from,
        piece: Vec::new(),
        at: 0,
    };
    let decoding = tokio::task::spawn_blocking(move || decode_body_seed(body, MAX_DECODED, seed));
    while left > 0 {
        let mut piece = vec![0u8; left.min(PIECE) as usize];
        if let Err(e) = r.read_exact(&mut piece).await {
            let cut = e.kind() == io::ErrorKind::UnexpectedEof;
            // The decoder, its input ended, fails on its own: that error says less.
            drop(pieces);
            let _ = decoding.await;
            return Err(e).context(if cut {
                "input ended inside a protocol frame"
            } else {
                "reading a protocol frame"
            });
        }
        left -= piece.len() as u64;
        // A decoder that has what it needs (or failed) takes no more; the rest of the frame
        // is still read, so that the next frame starts where it should.
        let _ = pieces.send(piece).await;
    }
    drop(pieces);
    decoding.await.context("decoding a protocol message")?
}

/// How much of a frame's body [`read_frame_seed_async`] reads at a time.
const PIECE: u64 = 256 << 10;

/// A frame's length, then its (compressed) body.
async fn read_body(r: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)
        .await
        .context("reading a protocol frame")?;
    let len = check_len(u64::from_le_bytes(len))?;
    let mut body = Vec::new();
    (&mut *r)
        .take(len)
        .read_to_end(&mut body)
        .await
        .context("reading a protocol frame")?;
    if body.len() as u64 != len {
        bail!("input ended inside a protocol frame");
    }
    Ok(body)
}

/// Decodes a [`Reply`] whose answer goes through a seed.
pub struct ReplySeed<S>(pub S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for ReplySeed<S> {
    type Value = Reply<S::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        // `Result`'s own name and variants, as its derived decoding gives them.
        d.deserialize_enum("Result", &["Ok", "Err"], self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for ReplySeed<S> {
    type Value = Reply<S::Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an agent's reply")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        match data.variant::<u32>()? {
            (0, answer) => answer.newtype_variant_seed(self.0).map(Ok),
            (1, error) => error.newtype_variant::<String>().map(Err),
            (n, _) => Err(serde::de::Error::custom(format!("reply variant {n}"))),
        }
    }
}

pub async fn write_frame_async<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> Result<()> {
    w.write_all(&encode(value)?).await?;
    w.flush().await?;
    Ok(())
}

/// Cuts what is written into chunks; `finish` writes the end marker.
pub struct ChunkWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> ChunkWriter<W> {
    pub fn new(inner: W) -> ChunkWriter<W> {
        ChunkWriter {
            inner,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner
                .write_all(&(self.buf.len() as u32).to_le_bytes())?;
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.emit()?;
        self.inner.write_all(&0u32.to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ChunkWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.emit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

/// Reads the payload of a chunked stream; end of input before the end marker is an error,
/// so a dropped connection is never mistaken for a finished stream.
pub struct ChunkReader<R: Read> {
    inner: R,
    left: usize,
    ended: bool,
}

impl<R: Read> ChunkReader<R> {
    pub fn new(inner: R) -> ChunkReader<R> {
        ChunkReader {
            inner,
            left: 0,
            ended: false,
        }
    }

    /// Reads and drops whatever is left of the stream, up to its end marker.
    pub fn drain(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        while self.read(&mut buf)? > 0 {}
        Ok(())
    }
}

impl<R: Read> Read for ChunkReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.ended || out.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            self.inner.read_exact(&mut len).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed in the middle of the stream ({e})"),
                )
            })?;
            self.left = u32::from_le_bytes(len) as usize;
            if self.left == 0 {
                self.ended = true;
                return Ok(0);
            }
        }
        let want = self.left.min(out.len());
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of the stream",
            ));
        }
        self.left -= n;
        Ok(n)
    }
}

/// Reads one chunk header and payload into `buf`; `Ok(false)` at the end marker.
pub async fn read_chunk_async(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > CHUNK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "stream chunk of {len} bytes; the peer is not a relaymove agent of this version"
            ),
        ));
    }
    buf.clear();
    let got = (&mut *r).take(len as u64).read_to_end(buf).await?;
    if got != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a stream chunk",
        ));
    }
    Ok(len > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::{EachBatch, Entry, Kind, Manifest, Meta, Skipped};
    use sha2::Digest as _;

    /// What `Agent::scan_each` reads: the manifest an agent answers a scan with, written as
    /// the scan goes, its entries handed over in order and in batches, everything else as
    /// decoded whole; and read whole, as `Agent::call` reads it.
    #[tokio::test]
    async fn a_manifest_read_in_batches_is_the_manifest_sent() {
        let entry = |i: usize| Entry {
            path: format!("cur/{i}:2,S").as_bytes().into(),
            kind: if i.is_multiple_of(7) {
                Kind::Dir
            } else {
                Kind::File
            },
            size: i as u64,
            meta: Meta {
                mode: 0o600,
                user: Some("vmail".into()),
                mtime: i as i64,
                ..Meta::default()
            },
            dev: 1,
            ino: i as u64,
            nlink: 1,
            target: None,
            // Incompressible, so that the frame is many pieces long.
            hash: Some(Box::new(sha2::Sha256::digest(i.to_le_bytes()).into())),
        };
        let sent = Manifest {
            root_exists: true,
            entries: (0..60_000).map(entry).collect(),
            skipped: vec![Skipped {
                path: b"sock".to_vec(),
                reason: "socket".into(),
            }],
            leftovers: vec![b".relaymove-tmp.1".to_vec()],
            ..Manifest::default()
        };
        let mut streamed = ManifestFrame::new().unwrap();
        for e in &sent.entries {
            streamed.push(e).unwrap();
        }
        let mut frame = Vec::new();
        streamed.write(&mut frame, &sent).unwrap();
        assert!(frame.len() as u64 > 10 * PIECE, "{} bytes", frame.len());
        // Each read is followed by another frame, which must be read as sent.
        frame.extend(encode(&Reply::Ok(7u32)).unwrap());
        let next = async |r: &mut &[u8]| read_frame_async::<Reply<u32>>(r).await.unwrap();
        let wire = |m: &Manifest| postcard::to_stdvec(m).unwrap();
        let r = &mut &frame[..];
        let whole: Reply<Manifest> = read_frame_async(r).await.unwrap();
        assert_eq!(wire(&whole.unwrap()), wire(&sent));
        assert_eq!(next(r).await, Ok(7));

        let (tx, rx) = std::sync::mpsc::channel();
        let seed = ReplySeed(EachBatch(move |batch: Vec<Entry>| tx.send(batch).is_ok()));
        let r = &mut &frame[..];
        let read = read_frame_seed_async(r, seed).await.unwrap().unwrap();
        assert_eq!(next(r).await, Ok(7));
        let batches: Vec<Vec<Entry>> = rx.into_iter().collect();
        assert!(batches.len() > 1, "{} batches", batches.len());
        let entries: Vec<Entry> = batches.into_iter().flatten().collect();
        assert_eq!(wire(&Manifest { entries, ..read }), wire(&sent));

        // A reader that stops at the first batch fails the decoding; the frame is still read
        // to its end.
        let r = &mut &frame[..];
        let seed = ReplySeed(EachBatch(|_: Vec<Entry>| false));
        assert!(read_frame_seed_async(r, seed).await.is_err());
        assert_eq!(next(r).await, Ok(7));

        let failed = encode(&Reply::<Manifest>::Err("no such tree".into())).unwrap();
        let seed = ReplySeed(EachBatch(|_: Vec<Entry>| true));
        let read = read_frame_seed_async(&mut &failed[..], seed).await.unwrap();
        assert_eq!(read.unwrap_err(), "no such tree");
    }

    #[test]
    fn a_widened_pipe_holds_a_whole_chunk() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let size = |fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap();
        assert!(
            (size(&read) as usize) < CHUNK,
            "the test needs a pipe below one chunk"
        );
        widen_pipe(&write);
        assert_eq!(size(&read) as usize, CHUNK);
        // Not a pipe: nothing happens, nothing fails.
        widen_pipe(std::fs::File::open("/dev/null").unwrap());
    }

    #[test]
    fn frames_round_trip_raw_bytes() {
        let paths: Vec<Vec<u8>> = vec![b"a\nb".to_vec(), vec![0xff, 0xfe], Vec::new()];
        let mut buf = Vec::new();
        write_frame(&mut buf, &paths).unwrap();
        let back: Option<Vec<Vec<u8>>> = read_frame_opt(&mut &buf[..]).unwrap();
        assert_eq!(back, Some(paths));
        assert!(read_frame_opt::<Vec<u8>>(&mut &b""[..]).unwrap().is_none());
    }

    #[test]
    fn a_truncated_or_oversized_frame_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec![1u32, 2, 3]).unwrap();
        assert!(read_frame_opt::<Vec<u32>>(&mut &buf[..buf.len() - 1]).is_err());
        assert!(read_frame_opt::<Vec<u32>>(&mut &buf[..3]).is_err());
        let huge = u64::MAX.to_le_bytes();
        assert!(read_frame_opt::<Vec<u32>>(&mut &huge[..]).is_err());
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_it_is_decoded_whole() {
        // 64 MiB of zeros compress to a few KB; the decoder must stop at the limit.
        let zeros = postcard::to_stdvec(&vec![0u8; 64 << 20]).unwrap();
        let bomb = zstd::encode_all(&zeros[..], 19).unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let err = decode_body::<Vec<u8>>(&bomb, 1 << 20).unwrap_err();
        assert!(
            format!("{err:#}").contains("more than 1048576 bytes"),
            "{err:#}"
        );
        // The same message under the limit decodes.
        assert_eq!(
            decode_body::<Vec<u8>>(&bomb, 64 << 21).unwrap().len(),
            64 << 20
        );
    }

    #[test]
    fn a_frame_length_claimed_but_not_sent_is_an_error_without_allocating_it() {
        let mut wire = (MAX_FRAME).to_le_bytes().to_vec();
        wire.extend_from_slice(b"short");
        let err = read_frame_opt::<Vec<u8>>(&mut &wire[..]).unwrap_err();
        assert!(format!("{err:#}").contains("ended inside"), "{err:#}");
        let wire = (MAX_FRAME + 1).to_le_bytes();
        assert!(read_frame_opt::<Vec<u8>>(&mut &wire[..]).is_err());
    }

    #[test]
    fn chunks_round_trip_and_a_missing_end_marker_is_an_error() {
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| i as u8).collect();
        let mut w = ChunkWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let wire = w.finish().unwrap();
        let mut back = Vec::new();
        ChunkReader::new(&wire[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        let cut = &wire[..wire.len() - 4];
        let mut back = Vec::new();
        let err = ChunkReader::new(cut).read_to_end(&mut back).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
