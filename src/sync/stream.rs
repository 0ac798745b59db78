//! The transfer stream: a standard POSIX (PAX) tar, zstd-compressed, readable with
//! `zstd -d | tar tv`. Each member carries PAX records for what ustar cannot hold:
//! `path`/`linkpath` (any length, raw bytes), `mtime` with nanoseconds, `uname`/`gname`,
//! `uid`/`gid`, and `RELAYMOVE.sha256`, the hex SHA-256 of a regular file's content, which
//! the receiver checks before the file gets its real name.
//!
//! The stream ends with a PAX global header carrying `RELAYMOVE.trailer`, a JSON object
//! listing what the sender could not send (vanished from a live source). A stream without
//! it was cut short. This module only encodes and decodes; it touches no file system.

use crate::sync::hash_cache::{hex, parse_hex_digest};
use crate::sync::manifest::{Digest, Kind, Meta};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use tar::{EntryType, Header};

pub const SHA256_KEY: &str = "RELAYMOVE.sha256";
pub const TRAILER_KEY: &str = "RELAYMOVE.trailer";

/// What a member is, as the receiver must create it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberKind {
    File { digest: Digest },
    Symlink { target: Vec<u8> },
    HardLink { target: Vec<u8> },
    Fifo,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub path: Vec<u8>,
    pub kind: MemberKind,
    pub meta: Meta,
}

impl Member {
    pub fn plan_kind(&self) -> Kind {
        match self.kind {
            MemberKind::File { .. } | MemberKind::HardLink { .. } => Kind::File,
            MemberKind::Symlink { .. } => Kind::Symlink,
            MemberKind::Fifo => Kind::Fifo,
        }
    }
}

/// The sender's closing note.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct Trailer {
    pub members: u64,
    /// Hex-encoded raw paths that vanished or changed type on the live source after the scan.
    pub vanished: Vec<String>,
}

pub struct StreamWriter<W: Write> {
    tar: tar::Builder<W>,
    members: u64,
}

fn pax_time(sec: i64, nsec: u32) -> String {
    if sec >= 0 {
        format!("{sec}.{nsec:09}")
    } else {
        let total = sec as i128 * 1_000_000_000 + nsec as i128;
        let (abs, sign) = (total.unsigned_abs(), if total < 0 { "-" } else { "" });
        format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
    }
}

fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let whole: i128 = whole.parse().ok()?;
    let mut frac9 = frac.chars().take(9).collect::<String>();
    while frac9.len() < 9 {
        frac9.push('0');
    }
    let frac: i128 = frac9.parse().ok()?;
    let mut total = whole * 1_000_000_000 + frac;
    if neg {
        total = -total;
    }
    let sec = total.div_euclid(1_000_000_000);
    let nsec = total.rem_euclid(1_000_000_000);
    Some((i64::try_from(sec).ok()?, nsec as u32))
}

/// Encodes PAX records: each "LEN key=value\n", where LEN counts the whole record.
fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // space, '=', newline
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

impl<W: Write> StreamWriter<W> {
    pub fn new(w: W) -> StreamWriter<W> {
        let mut tar = tar::Builder::new(w);
        tar.mode(tar::HeaderMode::Complete);
        StreamWriter { tar, members: 0 }
    }

    fn header(
        path: &[u8],
        meta: &Meta,
        ty: EntryType,
        size: u64,
    ) -> (Header, Vec<(String, Vec<u8>)>) {
        let mut h = Header::new_ustar();
        h.set_entry_type(ty);
        h.set_mode(meta.mode);
        h.set_size(size);
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(ustar) = h.as_ustar_mut() {
            let n = path.len().min(100);
            ustar.name[..n].copy_from_slice(&path[..n]);
        }
        if path.len() > 100 {
            pax.push(("path".into(), path.to_vec()));
        }
        h.set_mtime(meta.mtime.max(0) as u64);
        pax.push((
            "mtime".into(),
            pax_time(meta.mtime, meta.mtime_nsec).into_bytes(),
        ));
        // ustar numeric fields hold 7 octal digits; larger ids go in PAX records.
        h.set_uid(u64::from(meta.uid.min(0o7777777)));
        h.set_gid(u64::from(meta.gid.min(0o7777777)));
        if meta.uid > 0o7777777 {
            pax.push(("uid".into(), meta.uid.to_string().into_bytes()));
        }
        if meta.gid > 0o7777777 {
            pax.push(("gid".into(), meta.gid.to_string().into_bytes()));
        }
        for (key, name) in [("uname", &meta.user), ("gname", &meta.group)] {
            if let Some(name) = name {
                pax.push((key.into(), name.clone().into_bytes()));
            }
        }
        if let Some(u) = &meta.user {
            let _ = h.set_username(u);
        }
        if let Some(g) = &meta.group {
            let _ = h.set_groupname(g);
        }
        (h, pax)
    }

    fn append(
        &mut self,
        mut h: Header,
        mut pax: Vec<(String, Vec<u8>)>,
        link: Option<&[u8]>,
        data: impl Read,
    ) -> io::Result<()> {
        if let Some(link) = link {
            if let Some(ustar) = h.as_ustar_mut() {
                let n = link.len().min(100);
                ustar.linkname[..n].copy_from_slice(&link[..n]);
            }
            if link.len() > 100 {
                pax.push(("linkpath".into(), link.to_vec()));
            }
        }
        let records: Vec<(&str, &[u8])> = pax
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        self.tar.append_pax_extensions(records)?;
        h.set_cksum();
        self.tar.append(&h, data)?;
        self.members += 1;
        Ok(())
    }

    /// Appends a regular file; `data` must yield exactly `size` bytes hashing to `digest`.
    pub fn file(
        &mut self,
        path: &[u8],
        meta: &Meta,
        size: u64,
        digest: &Digest,
        data: impl Read,
    ) -> io::Result<()> {
        let (h, mut pax) = Self::header(path, meta, EntryType::Regular, size);
        pax.push((SHA256_KEY.into(), hex(digest).into_bytes()));
        self.append(h, pax, None, data)
    }

    pub fn symlink(&mut self, path: &[u8], meta: &Meta, target: &[u8]) -> io::Result<()> {
        let (h, pax) = Self::header(path, meta, EntryType::Symlink, 0);
        self.append(h, pax, Some(target), io::empty())
    }

    pub fn hardlink(&mut self, path: &[u8], meta: &Meta, target: &[u8]) -> io::Result<()> {
        let (h, pax) = Self::header(path, meta, EntryType::Link, 0);
        self.append(h, pax, Some(target), io::empty())
    }

    pub fn fifo(&mut self, path: &[u8], meta: &Meta) -> io::Result<()> {
        let (h, pax) = Self::header(path, meta, EntryType::Fifo, 0);
        self.append(h, pax, None, io::empty())
    }

    /// Writes the trailer and the end-of-archive marker, returning the inner writer.
    pub fn finish(mut self, mut trailer: Trailer) -> io::Result<W> {
        trailer.members = self.members;
        let json = serde_json::to_vec(&trailer).map_err(io::Error::other)?;
        let body = pax_records(&[(TRAILER_KEY, &json)]);
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XGlobalHeader);
        h.set_path("relaymove-trailer")?;
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.tar.append(&h, &body[..])?;
        self.tar.into_inner()
    }
}

/// Reads what a member header says. Returns `Ok(None)` for the trailer, whose content is
/// stored in `trailer`.
pub fn read_member<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    trailer: &mut Option<Trailer>,
) -> Result<Option<Member>> {
    let ty = entry.header().entry_type();
    let mut digest = None;
    let mut mtime = None;
    let (mut user, mut group) = (None, None);
    if let Some(exts) = entry.pax_extensions().context("reading PAX records")? {
        for ext in exts {
            let ext = ext.context("reading a PAX record")?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            match key {
                SHA256_KEY => {
                    let text = std::str::from_utf8(value).unwrap_or_default();
                    digest = Some(
                        parse_hex_digest(text)
                            .ok_or_else(|| anyhow!("malformed {SHA256_KEY} record"))?,
                    );
                }
                TRAILER_KEY if ty == EntryType::XGlobalHeader => {
                    *trailer =
                        Some(serde_json::from_slice(value).context("malformed stream trailer")?);
                }
                "mtime" => mtime = parse_pax_time(value),
                "uname" => user = Some(String::from_utf8_lossy(value).into_owned()),
                "gname" => group = Some(String::from_utf8_lossy(value).into_owned()),
                _ => {}
            }
        }
    }
    if ty == EntryType::XGlobalHeader {
        return Ok(None);
    }
    let path = entry.path_bytes().into_owned();
    let h = entry.header();
    let (mtime, mtime_nsec) = match mtime {
        Some(t) => t,
        None => (h.mtime().map(|m| m as i64).unwrap_or(0), 0),
    };
    let meta = Meta {
        mode: h.mode().context("reading mode")? & 0o7777,
        uid: h.uid().context("reading uid")? as u32,
        gid: h.gid().context("reading gid")? as u32,
        user,
        group,
        mtime,
        mtime_nsec,
    };
    let link = || -> Result<Vec<u8>> {
        Ok(entry
            .link_name_bytes()
            .ok_or_else(|| anyhow!("link member without a target"))?
            .into_owned())
    };
    let kind = match ty {
        EntryType::Regular | EntryType::Continuous => MemberKind::File {
            digest: digest.ok_or_else(|| anyhow!("file member without a {SHA256_KEY} record"))?,
        },
        EntryType::Symlink => MemberKind::Symlink { target: link()? },
        EntryType::Link => MemberKind::HardLink { target: link()? },
        EntryType::Fifo => MemberKind::Fifo,
        other => bail!("unexpected member type {other:?}"),
    };
    Ok(Some(Member { path, kind, meta }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_time_round_trips_including_negative_times() {
        for (s, n) in [
            (0, 0),
            (1_700_000_000, 123_456_789),
            (-1, 500_000_000),
            (-5, 0),
        ] {
            assert_eq!(
                parse_pax_time(pax_time(s, n).as_bytes()),
                Some((s, n)),
                "{s}.{n}"
            );
        }
        assert_eq!(parse_pax_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        let rec = pax_records(&[("k", b"v")]);
        assert_eq!(rec, b"6 k=v\n");
        let long = vec![b'a'; 95];
        let rec = pax_records(&[("path", &long)]);
        let len: usize = std::str::from_utf8(&rec[..3]).unwrap().parse().unwrap();
        assert_eq!(len, rec.len());
    }
}
