//! `--exclude GLOB`: which relative paths a sync leaves alone on both sides.
//!
//! A pattern without `/` matches a name at any depth (`*.lock`, `tmp`); a pattern with `/`
//! matches the whole relative path (`*/tmp/*`, `/dovecot.index.cache` for the root only).
//! An excluded directory is skipped with everything under it. Excluded paths are neither sent
//! nor deleted.

use anyhow::{Context, Result};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[derive(Debug, Default)]
pub struct Excludes {
    names: Option<GlobSet>,
    paths: Option<GlobSet>,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        let (mut any_name, mut any_path) = (false, false);
        for pattern in patterns {
            let trimmed = pattern.trim_start_matches('/').trim_end_matches('/');
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .with_context(|| format!("invalid --exclude pattern {pattern:?}"))?;
            if pattern.trim_end_matches('/').contains('/') {
                paths.add(glob);
                any_path = true;
            } else {
                names.add(glob);
                any_name = true;
            }
        }
        Ok(Excludes {
            names: if any_name { Some(names.build()?) } else { None },
            paths: if any_path { Some(paths.build()?) } else { None },
        })
    }

    /// True when `rel` (relative path, raw bytes) is excluded.
    pub fn is_excluded(&self, rel: &[u8]) -> bool {
        if rel.is_empty() {
            return false;
        }
        if let Some(names) = &self.names {
            let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(rel);
            if names.is_match(Path::new(OsStr::from_bytes(name))) {
                return true;
            }
        }
        if let Some(paths) = &self.paths {
            if paths.is_match(Path::new(OsStr::from_bytes(rel))) {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_patterns_match_at_any_depth_and_path_patterns_whole_paths() {
        let ex = Excludes::new(&["*.lock".into(), "a/tmp".into(), "/top".into()]).unwrap();
        assert!(ex.is_excluded(b"x.lock"));
        assert!(ex.is_excluded(b"d/e/x.lock"));
        assert!(!ex.is_excluded(b"x.locked"));
        assert!(ex.is_excluded(b"a/tmp"));
        assert!(!ex.is_excluded(b"b/a/tmp"));
        assert!(ex.is_excluded(b"top"));
        assert!(!ex.is_excluded(b"d/top"));
        assert!(!ex.is_excluded(b""));
    }

    #[test]
    fn star_does_not_cross_directories_in_path_patterns() {
        let ex = Excludes::new(&["*/tmp".into()]).unwrap();
        assert!(ex.is_excluded(b"u/tmp"));
        assert!(!ex.is_excluded(b"d/u/tmp"));
    }

    #[test]
    fn invalid_pattern_is_an_error_naming_it() {
        let err = Excludes::new(&["a[".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("a["));
    }
}
