//! What the controller and an agent exchange, defined once.
//!
//! Agent commands (each one process, one SSH channel):
//! - `agent scan ROOT [--checksum] [--exclude G]…`: stdout = frame(Manifest).
//! - `agent hash ROOT`: stdin = frame(Vec<path>); stdout = frame(Vec<(path, Option<Digest>)>).
//! - `agent send ROOT`: stdin = frame(Vec<SendItem>); stdout = the tar+zstd stream, raw.
//! - `agent receive ROOT`: stdin = frame(Plan) then the raw stream; stdout = JSON Lines of
//!   [`AgentMessage`], ending with `done` or `error`.
//!
//! A frame is an 8-byte little-endian length and a zstd-compressed postcard body: compact,
//! and raw byte paths travel as they are.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sync::receive::{ReceiveProgress, ReceiveStats};

/// Refuse absurd lengths from a confused peer instead of allocating them.
const MAX_FRAME: u64 = 8 << 30;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let raw = postcard::to_stdvec(value).context("encoding a protocol message")?;
    let packed = zstd::encode_all(&raw[..], 1).context("compressing a protocol message")?;
    let mut out = (packed.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&packed);
    Ok(out)
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    let raw = zstd::decode_all(body).context("decompressing a protocol message")?;
    postcard::from_bytes(&raw)
        .context("decoding a protocol message (is the agent the same version?)")
}

fn check_len(len: u64) -> Result<usize> {
    if len > MAX_FRAME {
        bail!("protocol frame of {len} bytes is too large; the peer is not a relaymove agent of this version");
    }
    Ok(len as usize)
}

pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).context("reading a protocol frame")?;
    let mut body = vec![0u8; check_len(u64::from_le_bytes(len))?];
    r.read_exact(&mut body)
        .context("reading a protocol frame")?;
    decode_body(&body)
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, value: &T) -> Result<()> {
    w.write_all(&encode(value)?)?;
    w.flush()?;
    Ok(())
}

pub async fn read_frame_async<T: DeserializeOwned>(r: &mut (impl AsyncRead + Unpin)) -> Result<T> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)
        .await
        .context("reading a protocol frame")?;
    let mut body = vec![0u8; check_len(u64::from_le_bytes(len))?];
    r.read_exact(&mut body)
        .await
        .context("reading a protocol frame")?;
    decode_body(&body)
}

pub async fn write_frame_async<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> Result<()> {
    w.write_all(&encode(value)?).await?;
    w.flush().await?;
    Ok(())
}

/// One line of `agent receive` output.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Progress(ReceiveProgress),
    Done(ReceiveStats),
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_raw_bytes() {
        let paths: Vec<Vec<u8>> = vec![b"a\nb".to_vec(), vec![0xff, 0xfe], Vec::new()];
        let mut buf = Vec::new();
        write_frame(&mut buf, &paths).unwrap();
        let back: Vec<Vec<u8>> = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(back, paths);
    }

    #[test]
    fn a_truncated_or_oversized_frame_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec![1u32, 2, 3]).unwrap();
        assert!(read_frame::<Vec<u32>>(&mut &buf[..buf.len() - 1]).is_err());
        let huge = u64::MAX.to_le_bytes();
        assert!(read_frame::<Vec<u32>>(&mut &huge[..]).is_err());
    }
}
