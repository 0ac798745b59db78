//! Walks one tree into a [`Manifest`]: every entry's type, size, mode, owner (number and name
//! on this host), mtime to the nanosecond, inode identity and symlink target, never following
//! symlinks. Hashes come from the [`HashCache`] when its stamps match, else from reading.
//!
//! A scan error on any path fails the scan: a partial SRC manifest would make the mirror
//! delete what it could not see.

use crate::sync::filter::Excludes;
use crate::sync::hash_cache::{HashCache, Stamp};
use crate::sync::manifest::{Digest, Entry, Kind, Manifest, Meta, Skipped, TEMP_PREFIX};
use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Group, Uid, User};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

#[derive(Debug, Default, Clone)]
pub struct ScanOptions {
    /// Hash every regular file (`--checksum`).
    pub checksum: bool,
    pub excludes: Vec<String>,
}

/// Resolves uids and gids to names once per id.
#[derive(Default)]
pub struct Names {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl Names {
    pub fn user(&mut self, uid: u32) -> Option<String> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    pub fn group(&mut self, gid: u32) -> Option<String> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                Group::from_gid(Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone()
    }
}

/// Metadata of an lstat result, with names looked up on this host.
pub fn meta_of(md: &fs::Metadata, names: &mut Names) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        user: names.user(md.uid()),
        group: names.group(md.gid()),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
    }
}

pub fn scan(root: &Path, opts: &ScanOptions, cache: &mut HashCache) -> Result<Manifest> {
    let excludes = Excludes::new(&opts.excludes)?;
    let mut manifest = Manifest::default();
    match fs::symlink_metadata(root) {
        Ok(_) => manifest.root_exists = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(manifest),
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
    }
    let mut names = Names::default();
    // The root is followed when it is a symlink: it names the tree, the user chose it.
    let walker = walkdir::WalkDir::new(root)
        .follow_root_links(true)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let rel = rel_path(root, e.path());
            !excludes.is_excluded(rel)
        });
    for item in walker {
        let item = match item {
            Ok(item) => item,
            Err(err) => {
                // A file deleted between readdir and lstat on a live tree is not an error.
                if err.io_error().map(|e| e.kind()) == Some(io::ErrorKind::NotFound) {
                    continue;
                }
                let at = err
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                bail!("scanning {at}: {err}");
            }
        };
        let rel = rel_path(root, item.path()).to_vec();
        let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(&rel);
        if name.starts_with(TEMP_PREFIX) {
            manifest.leftovers.push(rel);
            continue;
        }
        let md = match item.metadata() {
            Ok(md) => md,
            Err(err) if err.io_error().map(|e| e.kind()) == Some(io::ErrorKind::NotFound) => {
                continue
            }
            Err(err) => bail!("reading {}: {err}", item.path().display()),
        };
        if rel.is_empty() && !md.is_dir() {
            bail!(
                "{} is not a directory; sync mirrors the contents of a directory",
                root.display()
            );
        }
        let ft = md.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            let reason = if ft.is_socket() {
                "socket (recreated by the daemon that owns it)"
            } else {
                "device file (not mirrored)"
            };
            manifest.skipped.push(Skipped {
                path: rel,
                reason: reason.to_string(),
            });
            continue;
        };
        let target = if kind == Kind::Symlink {
            match fs::read_link(item.path()) {
                Ok(t) => Some(t.as_os_str().as_bytes().to_vec()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading link {}", item.path().display()))
                }
            }
        } else {
            None
        };
        let hash = if kind == Kind::File && opts.checksum {
            match hash_path(item.path(), &rel, &md, cache) {
                Ok(h) => Some(h),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("hashing {}", item.path().display()))
                }
            }
        } else {
            None
        };
        manifest.entries.push(Entry {
            path: rel,
            kind,
            size: if kind == Kind::File { md.size() } else { 0 },
            meta: meta_of(&md, &mut names),
            dev: md.dev(),
            ino: md.ino(),
            nlink: md.nlink(),
            target,
            hash,
        });
    }
    Ok(manifest)
}

fn rel_path<'a>(root: &Path, path: &'a Path) -> &'a [u8] {
    path.strip_prefix(root)
        .map(|p| p.as_os_str().as_bytes())
        .unwrap_or_default()
}

/// The hash of the file at `path` (relative name `rel` in the cache), from the cache when the
/// stamps of `md` match, else by reading it.
pub fn hash_path(
    path: &Path,
    rel: &[u8],
    md: &fs::Metadata,
    cache: &mut HashCache,
) -> io::Result<Digest> {
    let stamp = Stamp::of(md);
    if let Some(d) = cache.get(rel, &stamp) {
        return Ok(d);
    }
    let mut f = File::open(path)?;
    let digest = hash_reader(&mut f)?;
    // Only remember the hash if the file did not change while we read it.
    if Stamp::of(&f.metadata()?) == stamp {
        cache.put(rel, stamp, digest);
    }
    Ok(digest)
}

pub fn hash_reader(r: &mut impl Read) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}
