//! The transfer stream: a standard POSIX (PAX) tar, zstd-compressed (`zstd -d | tar tv` reads
//! it) except between two local trees, where compressing would only cost CPU. Each member
//! carries PAX records for what ustar cannot hold: `path`/`linkpath` (any length, raw
//! bytes), `mtime` with nanoseconds, `uname`/`gname`, `uid`/`gid`, and `RELAYMOVE.sha256`,
//! the hex SHA-256 of a regular file's content, which the receiver checks before the file
//! gets its real name.
//!
//! The stream ends with a PAX global header carrying `RELAYMOVE.trailer`, a JSON object
//! listing what the sender could not send (vanished from a live source). A stream without
//! it was cut short. This module only encodes and decodes; it touches no file system.

use crate::sync::hash_cache::{hex, parse_hex_digest};
use crate::sync::manifest::{Digest, Kind, Meta, Name};
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
                pax.push((key.into(), name.as_bytes().to_vec()));
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

/// Largest local PAX header. Ours hold at most two paths (PATH_MAX is 4 KiB) and a few short
/// values; the bound keeps a peer from making the receiver read a header of any size into
/// memory, as the tar crate does with PAX and GNU long-name bodies when it parses them.
pub const MAX_PAX_HEADER: u64 = 1 << 20;

/// Reads the members of a stream, parsing every extension header itself (the archive is
/// iterated raw) so that each is refused by its size before its body is read.
pub struct MemberReader<'a, R: Read> {
    entries: tar::Entries<'a, R>,
    /// Bound for the trailer's global header, which lists vanished paths.
    trailer_cap: u64,
    trailer: Option<Trailer>,
}

impl<'a, R: Read> MemberReader<'a, R> {
    pub fn new(archive: &'a mut tar::Archive<R>, trailer_cap: u64) -> io::Result<Self> {
        Ok(MemberReader {
            entries: archive.entries()?.raw(true),
            trailer_cap,
            trailer: None,
        })
    }

    /// The trailer, once the stream has been read to its end.
    pub fn trailer(&mut self) -> Option<Trailer> {
        self.trailer.take()
    }

    /// The next member and its entry (which reads a file's content); `None` at the end.
    pub fn next_member(&mut self) -> Result<Option<(Member, tar::Entry<'a, R>)>> {
        let mut pax: Option<Vec<u8>> = None;
        loop {
            let Some(entry) = self.entries.next() else {
                if pax.is_some() {
                    bail!("the stream ended after a PAX header, before its member");
                }
                return Ok(None);
            };
            let mut entry = entry.context("reading a member header")?;
            let ty = entry.header().entry_type();
            if ty == EntryType::XHeader || ty == EntryType::XGlobalHeader {
                let cap = if ty == EntryType::XHeader {
                    MAX_PAX_HEADER
                } else {
                    self.trailer_cap
                };
                if entry.size() > cap {
                    bail!(
                        "a PAX header of {} bytes (more than {cap}); refused",
                        entry.size()
                    );
                }
                let mut body = Vec::new();
                entry
                    .read_to_end(&mut body)
                    .context("reading PAX records")?;
                if ty == EntryType::XGlobalHeader {
                    self.read_trailer(&body)?;
                } else if pax.replace(body).is_some() {
                    bail!("two PAX headers for one member");
                }
                continue;
            }
            if ty.is_gnu_longname() || ty.is_gnu_longlink() {
                bail!("a GNU long-name header (relaymove writes PAX); refused unread");
            }
            let member = parse_member(&entry, pax.as_deref().unwrap_or_default())?;
            return Ok(Some((member, entry)));
        }
    }

    fn read_trailer(&mut self, records: &[u8]) -> Result<()> {
        for ext in tar::PaxExtensions::new(records) {
            let ext = ext.context("reading a PAX record")?;
            if ext.key_bytes() == TRAILER_KEY.as_bytes() {
                self.trailer = Some(
                    serde_json::from_slice(ext.value_bytes())
                        .context("malformed stream trailer")?,
                );
            }
        }
        Ok(())
    }
}

/// What a member header says, with its PAX `records` applied.
fn parse_member<R: Read>(entry: &tar::Entry<'_, R>, records: &[u8]) -> Result<Member> {
    let h = entry.header();
    let ty = h.entry_type();
    let mut digest = None;
    let mut mtime = None;
    let (mut user, mut group) = (None, None);
    let mut path = h.path_bytes().into_owned();
    let mut link = h.link_name_bytes().map(|l| l.into_owned());
    let mut uid = h.uid().context("reading uid")?;
    let mut gid = h.gid().context("reading gid")?;
    let number = |v: &[u8], what: &str| -> Result<u64> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("malformed PAX {what} record"))
    };
    for ext in tar::PaxExtensions::new(records) {
        let ext = ext.context("reading a PAX record")?;
        let value = ext.value_bytes();
        match ext.key_bytes() {
            b"path" => path = value.to_vec(),
            b"linkpath" => link = Some(value.to_vec()),
            b"uid" => uid = number(value, "uid")?,
            b"gid" => gid = number(value, "gid")?,
            b"mtime" => mtime = parse_pax_time(value),
            b"uname" => user = Some(Name::shared(&String::from_utf8_lossy(value))),
            b"gname" => group = Some(Name::shared(&String::from_utf8_lossy(value))),
            // The raw archive walks members by their header size; a PAX size would make
            // this reader and `tar` see different archives.
            b"size" => bail!("PAX size records are not used by relaymove; refused"),
            key if key == SHA256_KEY.as_bytes() => {
                let text = std::str::from_utf8(value).unwrap_or_default();
                digest = Some(
                    parse_hex_digest(text)
                        .ok_or_else(|| anyhow!("malformed {SHA256_KEY} record"))?,
                );
            }
            _ => {}
        }
    }
    let (mtime, mtime_nsec) = match mtime {
        Some(t) => t,
        None => (h.mtime().map(|m| m as i64).unwrap_or(0), 0),
    };
    let meta = Meta {
        mode: h.mode().context("reading mode")? & 0o7777,
        uid: u32::try_from(uid).context("uid out of range")?,
        gid: u32::try_from(gid).context("gid out of range")?,
        user,
        group,
        mtime,
        mtime_nsec,
    };
    let link = || link.ok_or_else(|| anyhow!("link member without a target"));
    let kind = match ty {
        EntryType::Regular | EntryType::Continuous => MemberKind::File {
            digest: digest.ok_or_else(|| anyhow!("file member without a {SHA256_KEY} record"))?,
        },
        EntryType::Symlink => MemberKind::Symlink { target: link()? },
        EntryType::Link => MemberKind::HardLink { target: link()? },
        EntryType::Fifo => MemberKind::Fifo,
        other => bail!("unexpected member type {other:?}"),
    };
    Ok(Member { path, kind, meta })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    fn meta(uid: u32) -> Meta {
        Meta {
            mode: 0o4750,
            uid,
            gid: 7,
            user: Some("u".into()),
            group: None,
            mtime: -5,
            mtime_nsec: 42,
        }
    }

    #[test]
    fn members_round_trip_with_long_paths_big_ids_and_the_trailer() {
        let long = [b'p'; 300];
        let target = [b't'; 200];
        let mut w = StreamWriter::new(Vec::new());
        w.file(&long, &meta(0o7777777 + 5), 3, &[9; 32], &b"abc"[..])
            .unwrap();
        w.symlink(b"s", &meta(1), &target).unwrap();
        w.hardlink(b"h", &meta(1), &long).unwrap();
        w.fifo(b"f", &meta(1)).unwrap();
        let trailer = Trailer {
            members: 4,
            vanished: vec!["00ff".into()],
        };
        let bytes = w.finish(trailer.clone()).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut members = MemberReader::new(&mut archive, MAX_PAX_HEADER).unwrap();
        let mut got = Vec::new();
        while let Some((m, mut entry)) = members.next_member().unwrap() {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            got.push((m.path, m.kind, m.meta, data));
        }
        assert_eq!(members.trailer(), Some(trailer));
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].0, long);
        assert_eq!(got[0].1, MemberKind::File { digest: [9; 32] });
        assert_eq!(got[0].2, meta(0o7777777 + 5));
        assert_eq!(got[0].3, b"abc");
        assert_eq!(
            got[1].1,
            MemberKind::Symlink {
                target: target.to_vec()
            }
        );
        assert_eq!(
            got[2].1,
            MemberKind::HardLink {
                target: long.to_vec()
            }
        );
        assert_eq!(
            (got[3].0.as_slice(), &got[3].1),
            (&b"f"[..], &MemberKind::Fifo)
        );
    }

    /// Counts the bytes read through it.
    struct Counted<R> {
        inner: R,
        read: Rc<Cell<u64>>,
    }

    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_their_body_is_read() {
        for (ty, expect) in [
            (EntryType::XHeader, "PAX header of 1073741824 bytes"),
            (EntryType::XGlobalHeader, "PAX header of 1073741824 bytes"),
            (EntryType::GNULongName, "GNU long-name header"),
            (EntryType::GNULongLink, "GNU long-name header"),
        ] {
            let mut h = Header::new_ustar();
            h.set_entry_type(ty);
            h.set_path("x").unwrap();
            h.set_size(1 << 30);
            h.set_cksum();
            // The claimed GiB is really there, but never materialised by the test itself.
            let read = Rc::new(Cell::new(0));
            let input = Counted {
                inner: io::Cursor::new(h.as_bytes().to_vec()).chain(io::repeat(0).take(1 << 30)),
                read: read.clone(),
            };
            let mut archive = tar::Archive::new(input);
            let mut members = MemberReader::new(&mut archive, 1 << 20).unwrap();
            let Err(err) = members.next_member() else {
                panic!("{ty:?} accepted");
            };
            assert!(format!("{err:#}").contains(expect), "{ty:?}: {err:#}");
            assert!(read.get() <= 64 << 10, "{ty:?}: {} bytes read", read.get());
        }
    }

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
