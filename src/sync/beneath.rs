//! File operations confined to one tree. Every path is resolved from the tree's root one
//! component at a time with `O_NOFOLLOW`, so nothing is ever read or written through a
//! symlink inside the tree, and `..`, absolute paths and empty components are refused before
//! any system call. Only the root itself may be a symlink (the user named it).
//!
//! The receiver writes DEST through a [`Tree`]; the sender and the hash requests read SRC
//! (or DEST) through one too, because a live tree can change between the scan and the read:
//! a directory owned by a local user may be swapped for a symlink to anywhere. The read
//! methods report such a path as gone (`Ok(None)`) instead of following it.

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::sync::manifest::display_path;

/// Checks that `rel` is a relative path of normal components.
pub fn validate(rel: &[u8]) -> Result<()> {
    if rel.is_empty() {
        bail!("empty path");
    }
    if rel.contains(&0) {
        bail!("path {} contains a NUL byte", display_path(rel));
    }
    if rel[0] == b'/' {
        bail!("absolute path {} refused", display_path(rel));
    }
    for comp in rel.split(|&b| b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            bail!(
                "path {} has a `{}` component; refused",
                display_path(rel),
                String::from_utf8_lossy(comp)
            );
        }
    }
    Ok(())
}

/// Splits a validated relative path into its parent directory and final name.
pub fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (b"", rel),
    }
}

pub struct Tree {
    root_path: PathBuf,
    root: Rc<OwnedFd>,
    dirs: HashMap<Vec<u8>, Rc<OwnedFd>>,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Errors that mean "this path is not what the scan saw" when reading a live tree: gone, or
/// a directory on the way replaced by a file (ENOTDIR) or by a symlink (ELOOP).
fn changed(e: Errno) -> bool {
    matches!(e, Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP)
}

fn is_type(st: &FileStat, ty: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == ty
}

impl Tree {
    /// Opens the tree at `root`, creating it (and its parents) when missing. A new root is
    /// 0700 whatever the umask, until the end of a run gives it SRC root's owner and mode: a
    /// run that fails midway must not leave what it wrote readable through a 0755 root.
    pub fn open(root: &Path) -> Result<Tree> {
        let create = || std::fs::DirBuilder::new().mode(0o700).create(root);
        let created = match create() {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = root.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                match create() {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                    Err(e) => {
                        return Err(e).with_context(|| format!("creating {}", root.display()))
                    }
                }
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", root.display())),
        };
        let tree = Tree::open_existing(root)?;
        if created {
            nix::sys::stat::fchmod(tree.root_fd(), Mode::from_bits_truncate(0o700))
                .with_context(|| format!("setting the mode of {}", root.display()))?;
        }
        Ok(tree)
    }

    /// Opens the existing tree at `root`, for reading.
    pub fn open_existing(root: &Path) -> Result<Tree> {
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", root.display()))?;
        Ok(Tree {
            root_path: root.to_path_buf(),
            root: Rc::new(fd),
            dirs: HashMap::new(),
        })
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The full path of `rel`, for messages.
    pub fn show(&self, rel: &[u8]) -> String {
        self.root_path
            .join(OsStr::from_bytes(rel))
            .display()
            .to_string()
    }

    /// Opens directory `rel` (empty = root) without following any symlink on the way.
    pub fn dir(&mut self, rel: &[u8]) -> Result<Rc<OwnedFd>> {
        if !rel.is_empty() {
            validate(rel)?;
        }
        match self.walk(rel) {
            Ok(fd) => Ok(fd),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => bail!(
                "{} is not a directory (a symlink or file is in the way); refusing to write through it",
                self.show(rel)
            ),
            Err(e) => Err(e).with_context(|| format!("opening {}", self.show(rel))),
        }
    }

    /// `dir` for a validated `rel`, one `O_NOFOLLOW` component at a time from cached handles.
    fn walk(&mut self, rel: &[u8]) -> nix::Result<Rc<OwnedFd>> {
        if rel.is_empty() {
            return Ok(self.root.clone());
        }
        if let Some(fd) = self.dirs.get(rel) {
            return Ok(fd.clone());
        }
        let (parent, name) = split(rel);
        let parent_fd = self.walk(parent)?;
        let fd = Rc::new(openat(
            parent_fd.as_fd(),
            OsStr::from_bytes(name),
            DIR_FLAGS,
            Mode::empty(),
        )?);
        if self.dirs.len() > 4096 {
            self.dirs.clear();
        }
        self.dirs.insert(rel.to_vec(), fd.clone());
        Ok(fd)
    }

    /// The parent directory of `rel` and its final name.
    pub fn parent<'a>(&mut self, rel: &'a [u8]) -> Result<(Rc<OwnedFd>, &'a OsStr)> {
        validate(rel)?;
        let (parent, name) = split(rel);
        Ok((self.dir(parent)?, OsStr::from_bytes(name)))
    }

    /// For reading a live tree: the parent directory of `rel` and its final name, or `None`
    /// when a directory on the way is gone or is no longer a directory.
    pub fn parent_if_present<'a>(
        &mut self,
        rel: &'a [u8],
    ) -> Result<Option<(Rc<OwnedFd>, &'a OsStr)>> {
        validate(rel)?;
        let (parent, name) = split(rel);
        match self.walk(parent) {
            Ok(fd) => Ok(Some((fd, OsStr::from_bytes(name)))),
            Err(e) if changed(e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("opening {}", self.show(parent))),
        }
    }

    /// For reading a live tree: the `lstat` of `rel` with its parent and name, or `None`
    /// when it is gone or not of type `ty` (an `S_IF*` value).
    pub fn stat_if<'a>(
        &mut self,
        rel: &'a [u8],
        ty: SFlag,
    ) -> Result<Option<(Rc<OwnedFd>, &'a OsStr, FileStat)>> {
        let Some((dir, name)) = self.parent_if_present(rel)? else {
            return Ok(None);
        };
        match fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_type(&st, ty) => Ok(Some((dir, name, st))),
            Ok(_) => Ok(None),
            Err(e) if changed(e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.show(rel))),
        }
    }

    /// For reading a live tree: regular file `rel` opened for reading, or `None` when it is
    /// gone or is no longer a regular file. `O_NONBLOCK` so that a FIFO or device put in its
    /// place cannot hang the reader before `fstat` shows what it is.
    pub fn open_file(&mut self, rel: &[u8]) -> Result<Option<File>> {
        let Some((dir, name)) = self.parent_if_present(rel)? else {
            return Ok(None);
        };
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd = match openat(dir.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // ENXIO: a socket is in its place.
            Err(e) if changed(e) || e == Errno::ENXIO => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.show(rel))),
        };
        let st = fstat(&fd).with_context(|| format!("reading {}", self.show(rel)))?;
        Ok(is_type(&st, SFlag::S_IFREG).then(|| File::from(fd)))
    }

    /// Forgets cached directory handles (after deletes and type changes).
    pub fn forget(&mut self) {
        self.dirs.clear();
    }

    /// Removes `rel` and, if it is a directory, everything under it. Missing is fine.
    pub fn remove(&mut self, rel: &[u8]) -> Result<()> {
        let (parent, name) = self.parent(rel)?;
        let was_dir = remove_at(parent.as_fd(), name)
            .with_context(|| format!("removing {}", self.show(rel)))?;
        // Only a directory's removal can leave a cached handle pointing at a deleted
        // directory. Forgetting them all after every file reopened each directory on the way
        // of the next path (a delta's 2773 unlinks: most of its delete phase).
        if was_dir {
            self.forget();
        }
        Ok(())
    }

    /// Creates directory `rel` (mode 0700 until its metadata is applied). An existing
    /// directory is fine; anything else in the way is an error.
    pub fn mkdir(&mut self, rel: &[u8]) -> Result<()> {
        let (parent, name) = self.parent(rel)?;
        match nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => {
                let st = fstatat(
                    parent.as_fd(),
                    name,
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
                if is_type(&st, SFlag::S_IFDIR) {
                    Ok(())
                } else {
                    bail!("{} exists and is not a directory", self.show(rel))
                }
            }
            Err(e) => Err(e).with_context(|| format!("creating directory {}", self.show(rel))),
        }
    }
}

/// Removes `name` in `dir`, recursing into directories without following symlinks; true
/// when what it removed was a directory.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(false),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = match openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let mut listing = nix::dir::Dir::from_fd(sub.try_clone()?)?;
    let names: Vec<Vec<u8>> = listing
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    for child in names {
        remove_at(sub.as_fd(), OsStr::from_bytes(&child))?;
    }
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_escapes() {
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"a/../b",
            b"a//b",
            b"./a",
            b"a/",
            b"",
            b"a\0b",
        ] {
            assert!(validate(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        for good in [
            &b"a"[..],
            b"a/b",
            b"..a",
            b"a..",
            b"-x",
            b"\xff\xfe",
            b"a b\nc",
        ] {
            assert!(validate(good).is_ok());
        }
    }

    #[test]
    fn dir_refuses_a_symlink_on_the_way() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("link")).unwrap();
        let mut tree = Tree::open(t.path()).unwrap();
        let err = tree.dir(b"link").unwrap_err();
        assert!(format!("{err:#}").contains("refusing to write through it"));
        assert!(tree.mkdir(b"link/sub").is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn a_new_root_is_private_and_an_existing_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let new = t.path().join("parent/new");
        Tree::open(&new).unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        Tree::open(&new).unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn remove_does_not_follow_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("d/link")).unwrap();
        let mut tree = Tree::open(t.path()).unwrap();
        tree.remove(b"d").unwrap();
        assert!(!t.path().join("d").exists());
        assert!(outside.path().join("keep").exists());
    }
}
