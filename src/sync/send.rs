//! The sending side: reads the entries the plan asks for from SRC and writes the stream.
//! SRC may be live (the first copy runs while mail flows): an entry that vanished or changed
//! type since the scan is reported in the trailer, not treated as an error; a file is sent
//! with its metadata and content as they are when it is read.

use crate::sync::hash_cache::{hex, HashCache, Stamp};
use crate::sync::manifest::Kind;
use crate::sync::plan::SendItem;
use crate::sync::scan::{hash_reader, meta_of, Names};
use crate::sync::stream::{StreamWriter, Trailer};
use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Files up to this size are read once into memory (hash, then send from the buffer);
/// larger ones are read twice, once to hash and once to send.
const BUFFERED_MAX: u64 = 16 << 20;

#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    /// zstd level; negative levels trade ratio for speed on fast links.
    pub level: i32,
    pub threads: u32,
}

pub fn send(
    root: &Path,
    items: &[SendItem],
    out: impl Write,
    opts: SendOptions,
    cache: &mut HashCache,
) -> Result<()> {
    let mut encoder =
        zstd::stream::write::Encoder::new(out, opts.level).context("starting zstd")?;
    if opts.threads > 1 {
        encoder
            .multithread(opts.threads)
            .context("starting zstd workers")?;
    }
    encoder.include_checksum(true)?;
    let mut stream = StreamWriter::new(encoder);
    let mut names = Names::default();
    let mut vanished = Vec::new();
    // Hard-link groups: the member actually sent as a file, in case the planned one vanished.
    let mut sent_as: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut buf = Vec::new();
    for item in items {
        // The controller is trusted, but a sender never reads outside its tree either.
        crate::sync::beneath::validate(&item.path).context("refusing a send request")?;
        let full = root.join(OsStr::from_bytes(&item.path));
        let sent = match send_one(
            &mut stream,
            &full,
            item,
            &mut names,
            cache,
            &mut sent_as,
            &mut buf,
        ) {
            Ok(sent) => sent,
            Err(e) => {
                let gone = e.downcast_ref::<io::Error>().map(|e| e.kind())
                    == Some(io::ErrorKind::NotFound);
                if !gone {
                    return Err(e.context(format!("sending {}", full.display())));
                }
                false
            }
        };
        if !sent {
            vanished.push(hex(&item.path));
        }
    }
    let encoder = stream
        .finish(Trailer {
            members: 0,
            vanished,
        })
        .context("finishing the stream")?;
    let mut out = encoder.finish().context("finishing zstd")?;
    out.flush()?;
    Ok(())
}

/// Sends one entry; `Ok(false)` when it is gone or changed type.
fn send_one<W: Write>(
    stream: &mut StreamWriter<W>,
    full: &Path,
    item: &SendItem,
    names: &mut Names,
    cache: &mut HashCache,
    sent_as: &mut HashMap<Vec<u8>, Vec<u8>>,
    buf: &mut Vec<u8>,
) -> Result<bool> {
    match item.kind {
        Kind::File => {}
        Kind::Symlink => {
            let md = fs::symlink_metadata(full)?;
            if !md.file_type().is_symlink() {
                return Ok(false);
            }
            let target = fs::read_link(full)?;
            stream.symlink(
                &item.path,
                &meta_of(&md, names),
                target.as_os_str().as_bytes(),
            )?;
            return Ok(true);
        }
        Kind::Fifo => {
            let md = fs::symlink_metadata(full)?;
            if !md.file_type().is_fifo() {
                return Ok(false);
            }
            stream.fifo(&item.path, &meta_of(&md, names))?;
            return Ok(true);
        }
        Kind::Dir => return Ok(false),
    }
    if let Some(primary) = &item.link_to {
        if let Some(actual) = sent_as.get(primary) {
            let md = fs::symlink_metadata(full)?;
            if md.is_file() {
                stream.hardlink(&item.path, &meta_of(&md, names), actual)?;
                return Ok(true);
            }
            return Ok(false);
        }
    }
    // O_NOFOLLOW: a file replaced by a symlink since the scan is not followed.
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(full)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let md = file.metadata()?;
    if !md.is_file() {
        return Ok(false);
    }
    let meta = meta_of(&md, names);
    let size = md.len();
    let cached = cache.get(&item.path, &Stamp::of(&md));
    if size <= BUFFERED_MAX {
        buf.clear();
        (&mut file).take(size).read_to_end(buf)?;
        // A file that shrank is sent as read; one that grew, up to the size it had.
        let digest = match cached {
            Some(d) if buf.len() as u64 == size => d,
            _ => Sha256::digest(&buf[..]).into(),
        };
        stream.file(&item.path, &meta, buf.len() as u64, &digest, &buf[..])?;
    } else {
        let digest = match cached {
            Some(d) => d,
            None => {
                let d = hash_reader(&mut (&mut file).take(size))?;
                file.seek(io::SeekFrom::Start(0))?;
                d
            }
        };
        // If the file shrinks while it is sent, pad: the receiver's hash check rejects it.
        let data = (&mut file).take(size).chain(io::repeat(0)).take(size);
        stream.file(&item.path, &meta, size, &digest, data)?;
    }
    let key = item.link_to.clone().unwrap_or_else(|| item.path.clone());
    sent_as.entry(key).or_insert_with(|| item.path.clone());
    Ok(true)
}
