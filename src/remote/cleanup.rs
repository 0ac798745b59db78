//! `relaymove cleanup HOST`, the part that runs on HOST: a shell script that removes what
//! relaymove leaves there, and the parsing of what it reports. It runs as the SSH login user
//! and touches only that user's places, found by the rules the agent itself uses:
//!
//! | what | root | another user |
//! |---|---|---|
//! | agents, interrupted uploads (`remote::agent`) | `/var/lib/relaymove/bin/relaymove-<sha256>`, `.upload.XXXXXX` | `~/.local/lib/relaymove/bin/…` |
//! | hash caches and their temporary files (`sync::hash_cache`) | `/var/lib/relaymove/cache/<hash>.hashes`, `<hash>.tmp<pid>` | `$XDG_CACHE_HOME/relaymove` or `~/.cache/relaymove` (`RELAYMOVE_CACHE_DIR` first) |
//! | tree locks (`remote::serve`) | `/run/relaymove/tree-<hash>.lock` | `$XDG_RUNTIME_DIR/relaymove` or `~/.local/lib/relaymove/locks` |
//! | the migration lock (`migrate`) | `/run/relaymove-migrate.lock` | (root only) |
//! | direct transfers' one-time keys and sockets (`remote::direct`) | `/run/relaymove/direct/<token>`, `.pub`, `.known_hosts`, `.sock` | the lock directory's `direct/` |
//! | their authorized key lines (`remote::direct`) | lines of `~/.ssh/authorized_keys` ending in `relaymove-direct-<token>` | the same |
//!
//! The contract:
//! - Only regular files whose names have exactly these shapes are removed, and then the
//!   directories above that are relaymove's own (agent dir, `bin`, cache dir, lock dir) when
//!   nothing else is left in them. Anything else (another name, a symlink, a directory) is
//!   left and counted; a symlink is never followed, and `rm` of a name removes that name only.
//! - A directory that is a symlink, owned by another user or writable by group or others is
//!   not searched at all: the whole cleanup is refused (exit 96) and names it. Another user
//!   could have planted names there.
//! - Nothing is removed while relaymove works on the host (exit 75): an agent process runs
//!   from the agent directory, or a lock file is held (`/proc/locks`). A lock file is
//!   removed while the script itself holds it (`flock -n`), so one taken meanwhile is never
//!   removed; the agent re-checks that the path still names the file it locked.
//! - Temporary files of an interrupted sync live inside its DEST (`.relaymove-tmp…`); no
//!   other place knows them, and the next sync into that DEST removes them.
//!
//! Its output is one line per finding, fields separated by tabs, the path last:
//! `remove KIND BYTES PATH`, `rmdir PATH`, `keep COUNT DIR`, `foreign PATH` (named like
//! ours, not a regular file), `running PID EXE`, `busy PID PATH`, `unsafe WHY PATH`.
//! With `list` as its argument it reports the same and changes nothing.

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

/// The cleanup script; `$1` is `list` or `remove`.
pub const SCRIPT: &str = concat!(
    crate::remote::agent::agent_dir!(),
    r#"set -u
mode=$1
me=$(id -u)
# The hash caches, as sync::hash_cache::cache_dir_for picks them.
custom_cache=
if [ -n "${RELAYMOVE_CACHE_DIR:-}" ]; then c=$RELAYMOVE_CACHE_DIR; custom_cache=1
elif [ "$me" = 0 ]; then c=/var/lib/relaymove/cache
elif [ -n "${XDG_CACHE_HOME:-}" ]; then c=$XDG_CACHE_HOME/relaymove
else c=$HOME/.cache/relaymove; fi
# The tree locks, as remote::serve::lock_dir_for picks them.
if [ "$me" = 0 ]; then l=/run/relaymove
elif [ -n "${XDG_RUNTIME_DIR:-}" ]; then l=$XDG_RUNTIME_DIR/relaymove
else l=$HOME/.local/lib/relaymove/locks; fi
# /run holds root's migration lock (and is not ours: never removed, nothing else in it read).
run=
[ "$me" = 0 ] && run=/run

hex() { case $1 in ''|*[!0-9a-f]*) return 1;; esac; [ ${#1} = "$2" ]; }
# kind DIR NAME: which of our files NAME in DIR would be, if any.
kind() {
  case $1 in
  "$d/bin") case $2 in
    relaymove-*) hex "${2#relaymove-}" 64 && echo agent;;
    .upload.??????) echo upload;;
    esac;;
  "$c") case $2 in
    *.hashes) hex "${2%.hashes}" 32 && echo cache;;
    *.tmp*) t=${2##*.tmp}; case $t in ''|*[!0-9]*) ;; *) hex "${2%.tmp*}" 32 && echo cache-temp;; esac;;
    esac;;
  "$l") case $2 in tree-*.lock) v=${2#tree-}; hex "${v%.lock}" 32 && echo lock;; esac;;
  "$l/direct") case $2 in
    *.sock) hex "${2%.sock}" 32 && echo direct-socket;;
    *.pub|*.known_hosts) hex "${2%.*}" 32 && echo direct-key;;
    *) hex "$2" 32 && echo direct-key;;
    esac;;
  /run) [ "$2" = relaymove-migrate.lock ] && echo lock;;
  esac
  return 0
}
exists() { [ -e "$1" ] || [ -L "$1" ]; }
file() { [ -f "$1" ] && [ ! -L "$1" ]; }
# ours_file DIR PATH: PATH is of the type our file of that name is (a socket for a socket).
ours_file() {
  if [ "$(kind "$1" "${2##*/}")" = direct-socket ]; then [ -S "$2" ] && [ ! -L "$2" ]; else file "$2"; fi
}
realdir() { [ -d "$1" ] && [ ! -L "$1" ]; }
# ours_dir PATH: a directory of ours, removed once empty.
ours_dir() {
  [ "$1" = "$d" ] || [ "$1" = "$d/bin" ] || [ "$1" = "$l" ] || [ "$1" = "$l/direct" ] && return 0
  [ "$1" = "$c" ] && [ -z "$custom_cache" ]
}
# left DIR [all]: how many entries stay in DIR after the cleanup: of our directories, those
# that do not empty (with `all`: every one, so that only the strangers are counted).
# Globs, not a listing: names are never split or re-read.
left() {
  n=0
  for e in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    exists "$e" || continue
    if [ -n "$(kind "$1" "${e##*/}")" ] && ours_file "$1" "$e"; then continue; fi
    if realdir "$e" && ours_dir "$e" && { [ $# = 2 ] || [ "$(left "$e")" = 0 ]; }; then continue; fi
    n=$((n + 1))
  done
  echo $n
}

# 1. Checks; nothing changes before they all pass.
bad=0
for x in "$d" "$d/bin" "$c" "$l" "$l/direct"; do
  exists "$x" || continue
  why=
  if [ -L "$x" ]; then why="is a symlink"
  elif [ ! -d "$x" ]; then why="is not a directory"
  elif [ "$(stat -c %u -- "$x")" != "$me" ]; then why="is owned by uid $(stat -c %u -- "$x"), not by uid $me who runs the cleanup"
  else case $(stat -c %A -- "$x") in ?????w*|????????w*) why="is writable by group or others";; esac
  fi
  [ -n "$why" ] && { printf 'unsafe\t%s\t%s\n' "$why" "$x"; bad=1; }
done
[ $bad = 1 ] && exit 96
locks=$(cat /proc/locks 2>/dev/null || true)
# holder FILE: the pid holding a lock on FILE, from /proc/locks (MAJ:MIN:INODE, in hex).
holder() {
  id=$(stat -c '%D %i' -- "$1") || return 0
  dev=$((0x${id% *}))
  key=$(printf '%02x:%02x:%s' $(( (dev >> 8) & 0xfff )) $(( (dev & 0xff) | ((dev >> 12) & 0xfff00) )) "${id#* }")
  printf '%s\n' "$locks" | while read -r n a b c pid at rest; do
    [ "$a" != "->" ] && [ "$at" = "$key" ] && { echo "$pid"; break; }
  done
}
for p in /proc/[0-9]*; do
  e=$(readlink "$p/exe" 2>/dev/null) || continue
  case $e in "$d"/bin/relaymove-*) printf 'running\t%s\t%s\n' "${p#/proc/}" "$e"; bad=1;; esac
done
# A migration under way (migrate::postfix keeps Postfix's original configuration here until
# its finish or rollback): nothing of relaymove's may go before it ends.
[ -f "$d/migrate/postfix/main.cf" ] && { printf 'migrating\t%s\n' "$d/migrate/postfix"; bad=1; }
for x in "$l" $run; do
  realdir "$x" || continue
  for e in "$x"/* "$x"/.[!.]*; do
    [ "$(kind "$x" "${e##*/}")" = lock ] && file "$e" || continue
    pid=$(holder "$e")
    [ -n "$pid" ] && { printf 'busy\t%s\t%s\n' "$pid" "$e"; bad=1; }
  done
done
[ $bad = 1 ] && exit 75

# 2. Our files, locks first: each removed while this script holds it.
for pass in lock other; do
  for x in "$d/bin" "$c" "$l" "$l/direct" $run; do
    realdir "$x" || continue
    for e in "$x"/* "$x"/.[!.]* "$x"/..?*; do
      exists "$e" || continue
      k=$(kind "$x" "${e##*/}")
      [ -n "$k" ] || continue
      if ! ours_file "$x" "$e"; then
        [ $pass = lock ] && printf 'foreign\t%s\n' "$e"
        continue
      fi
      case $pass$k in locklock) ;; lock*|otherlock) continue;; esac
      size=$(stat -c %s -- "$e") || continue
      [ "$k" = direct-socket ] && size=0
      if [ "$mode" = remove ]; then
        if [ "$k" = lock ]; then
          { flock -n 9 || { printf 'busy\t%s\t%s\n' "$(cat -- "$e")" "$e"; exit 75; }; rm -f -- "$e"; } 9<"$e" || continue
        else
          rm -f -- "$e" || exit 1
        fi
      fi
      printf 'remove\t%s\t%s\t%s\n' "$k" "$size" "$e"
    done
  done
done

# The key lines of direct transfers, from the login user's authorized_keys: the file is
# rewritten without them (owner and mode kept) and renamed into place.
ak=${HOME:-/nonexistent}/.ssh/authorized_keys
pattern=' relaymove-direct-[0-9a-f]{32}$'
if file "$ak" && grep -Eq -- "$pattern" "$ak"; then
  size=$(grep -E -- "$pattern" "$ak" | wc -c)
  if [ "$mode" = remove ]; then
    # Under the lock on ~/.ssh that agents take to add or remove their line, so neither
    # rewrite loses the other's.
    { flock -w 30 8 || exit 1
      t=$(mktemp "$ak.relaymove.XXXXXX") || exit 1
      grep -Ev -- "$pattern" "$ak" > "$t"
      chown --reference="$ak" -- "$t" && chmod --reference="$ak" -- "$t" && mv -f -- "$t" "$ak" || { rm -f -- "$t"; exit 1; }
    } 8<"${ak%/*}"
  fi
  printf 'remove\tauthorized-key\t%s\t%s\n' "$size" "$ak"
fi

# 3. Our directories, innermost first, once nothing else is in them.
for x in "$d/bin" "$c" "$l/direct" "$l" "$d"; do
  realdir "$x" && ours_dir "$x" || continue
  if [ "$(left "$x")" = 0 ]; then
    [ "$mode" = remove ] && { rmdir -- "$x" || exit 1; }
    printf 'rmdir\t%s\n' "$x"
  else
    n=$(left "$x" all)
    [ "$n" = 0 ] || printf 'keep\t%s\t%s\n' "$n" "$x"
  fi
done
exit 0
"#
);

/// The script's exit status when relaymove works on the host.
pub const BUSY: i32 = 75;
/// The script's exit status when a directory is not safe to search.
pub const UNSAFE: i32 = 96;

/// One finding of the script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Finding {
    /// A file of ours, removed (or to be removed with `list`).
    Remove {
        kind: String,
        bytes: u64,
        path: String,
    },
    /// A directory of ours, empty now (or once the files are removed), removed.
    Rmdir { path: String },
    /// A directory of ours that stays: it holds `count` entries that are not relaymove's.
    Keep { count: u64, path: String },
    /// Named like one of our files, but not a regular file (a symlink, a directory).
    Foreign { path: String },
    /// An agent process runs from the agent directory.
    Running { pid: String, exe: String },
    /// A lock file held by a live process.
    Busy { pid: String, path: String },
    /// A directory the script refused to search.
    Unsafe { why: String, path: String },
    /// A migration keeps Postfix's original configuration here: it is under way.
    Migrating { path: String },
}

/// Reads the script's output: one finding per line.
pub fn parse(output: &str) -> Result<Vec<Finding>> {
    output
        .lines()
        .map(|line| {
            let bad = || anyhow!("bug: unexpected line from the cleanup script: {line:?}");
            let (tag, rest) = line.split_once('\t').ok_or_else(bad)?;
            let two = || rest.split_once('\t').ok_or_else(bad);
            Ok(match tag {
                "remove" => {
                    let (kind, rest) = two()?;
                    let (bytes, path) = rest.split_once('\t').ok_or_else(bad)?;
                    Finding::Remove {
                        kind: kind.to_string(),
                        bytes: bytes.parse().map_err(|_| bad())?,
                        path: path.to_string(),
                    }
                }
                "rmdir" => Finding::Rmdir {
                    path: rest.to_string(),
                },
                "keep" => {
                    let (count, path) = two()?;
                    Finding::Keep {
                        count: count.parse().map_err(|_| bad())?,
                        path: path.to_string(),
                    }
                }
                "foreign" => Finding::Foreign {
                    path: rest.to_string(),
                },
                "running" => {
                    let (pid, exe) = two()?;
                    Finding::Running {
                        pid: pid.to_string(),
                        exe: exe.to_string(),
                    }
                }
                "busy" => {
                    let (pid, path) = two()?;
                    Finding::Busy {
                        pid: pid.to_string(),
                        path: path.to_string(),
                    }
                }
                "migrating" => Finding::Migrating {
                    path: rest.to_string(),
                },
                "unsafe" => {
                    let (why, path) = two()?;
                    Finding::Unsafe {
                        why: why.to_string(),
                        path: path.to_string(),
                    }
                }
                _ => return Err(bad()),
            })
        })
        .collect()
}

/// Why the script refused, as one message naming the host, each cause and the fix.
pub fn refusal(host: &str, status: i32, findings: &[Finding]) -> Result<()> {
    let mut causes = Vec::new();
    for f in findings {
        match f {
            Finding::Running { pid, exe } => {
                causes.push(format!("a relaymove agent runs (pid {pid}, {exe})"))
            }
            Finding::Busy { pid, path } => causes.push(format!(
                "{path} is held by pid {pid}{}",
                if path.ends_with("relaymove-migrate.lock") {
                    " (a migration runs)"
                } else {
                    " (a sync writes into a DEST)"
                }
            )),
            Finding::Migrating { path } => causes.push(format!(
                "a migration is under way (Postfix's configuration from before it is kept in {path}; `relaymove migrate` finishes it, `relaymove rollback` undoes it)"
            )),
            Finding::Unsafe { why, path } => causes.push(format!(
                "{path} {why}, so another user could have planted names in it"
            )),
            _ => {}
        }
    }
    let hint = match status {
        BUSY => format!("wait for it to finish, or end it (`kill PID` on {host}), then run `relaymove cleanup` again"),
        UNSAFE => "look at it and remove it by hand if it is not needed (relaymove only ever makes these directories mode 700, owned by the user it runs as)".to_string(),
        _ => return Ok(()),
    };
    if causes.is_empty() {
        bail!("bug: the cleanup script on {host} exited {status} without saying why");
    }
    bail!(
        "{} on {host}: {}; nothing was removed\nhint: {hint}",
        if status == BUSY {
            "relaymove is at work"
        } else {
            "refusing to clean up"
        },
        causes.join("; ")
    )
}

#[cfg(test)]
mod tests {
    //! The script runs with `sh` on this host as a user other than root (root's places are
    //! this machine's real /var/lib/relaymove and /run/relaymove): HOME and the XDG
    //! directories are temporary. `tests/sync_ssh.rs` runs it as root, over SSH, in a mount
    //! namespace of its own.
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    const NOBODY: u32 = 65534;

    struct Home {
        dir: tempfile::TempDir,
        as_nobody: bool,
    }

    impl Home {
        fn new() -> Home {
            let dir = tempfile::tempdir().unwrap();
            let as_nobody = nix::unistd::geteuid().is_root();
            let home = Home { dir, as_nobody };
            home.own(home.dir.path());
            home
        }

        fn own(&self, path: &Path) {
            if self.as_nobody {
                std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        /// The environment the script sees: HOME, and the XDG directories when `xdg`.
        fn env(&self, xdg: bool) -> Vec<(&'static str, OsString)> {
            let mut env = vec![("HOME", self.dir.path().into())];
            if xdg {
                env.push(("XDG_CACHE_HOME", self.path("xdg-cache").into()));
                env.push(("XDG_RUNTIME_DIR", self.path("xdg-run").into()));
            }
            env
        }

        /// Creates `rel` and its parents as the script's user, directories mode 700.
        fn file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
            let path = self.path(rel);
            self.dir_all(path.parent().unwrap());
            std::fs::write(&path, bytes).unwrap();
            self.own(&path);
            path
        }

        fn dir_all(&self, dir: &Path) {
            let mut missing = Vec::new();
            let mut at = dir;
            while !at.exists() {
                missing.push(at.to_path_buf());
                at = at.parent().unwrap();
            }
            for d in missing.iter().rev() {
                std::fs::create_dir(d).unwrap();
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
                self.own(d);
            }
        }

        fn run(&self, mode: &str, xdg: bool) -> (i32, Vec<Finding>, String) {
            let mut cmd = crate::remote::test_shell(self.as_nobody);
            cmd.args(["-c", SCRIPT, "relaymove", mode])
                .env_remove("XDG_CACHE_HOME")
                .env_remove("XDG_RUNTIME_DIR")
                .env_remove("RELAYMOVE_CACHE_DIR")
                .envs(self.env(xdg));
            let out = cmd.output().expect("running sh");
            let stdout = String::from_utf8(out.stdout).unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let findings = parse(&stdout).unwrap_or_else(|e| panic!("{e:#}\n{stderr}"));
            (out.status.code().unwrap_or(-1), findings, stderr)
        }

        /// The places the agent's own code picks for this home's user.
        fn places(&self, xdg: bool) -> (PathBuf, PathBuf) {
            let env = self.env(xdg);
            let get = |key: &str| env.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            (
                crate::sync::hash_cache::cache_dir_for(false, get).unwrap(),
                crate::remote::serve::lock_dir_for(false, get).unwrap(),
            )
        }
    }

    fn removed(findings: &[Finding]) -> Vec<(String, String)> {
        let mut v: Vec<_> = findings
            .iter()
            .filter_map(|f| match f {
                Finding::Remove { kind, path, .. } => Some((kind.clone(), path.clone())),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    const AGENT: &str =
        "relaymove-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const HASH: &str = "0123456789abcdef0123456789abcdef";

    /// Plants one file of every kind where the agent's code puts them; returns them by kind.
    fn plant_ours(home: &Home, xdg: bool) -> Vec<(String, String)> {
        let (cache, locks) = home.places(xdg);
        let rel = |p: PathBuf| {
            p.strip_prefix(home.dir.path())
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        };
        let (cache, locks) = (rel(cache), rel(locks));
        let mut v = vec![
            ("agent", format!(".local/lib/relaymove/bin/{AGENT}")),
            (
                "upload",
                ".local/lib/relaymove/bin/.upload.Ab12Cd".to_string(),
            ),
            ("cache", format!("{cache}/{HASH}.hashes")),
            ("cache-temp", format!("{cache}/{HASH}.tmp4242")),
            ("lock", format!("{locks}/tree-{HASH}.lock")),
            ("direct-key", format!("{locks}/direct/{HASH}")),
            ("direct-key", format!("{locks}/direct/{HASH}.pub")),
            ("direct-key", format!("{locks}/direct/{HASH}.known_hosts")),
        ]
        .into_iter()
        .map(|(k, rel)| {
            let path = home.file(&rel, b"12345");
            (k.to_string(), path.to_str().unwrap().to_string())
        })
        .collect::<Vec<_>>();
        let socket = home.path(&format!("{locks}/direct/{HASH}.sock"));
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        home.own(&socket);
        v.push(("direct-socket".into(), socket.to_str().unwrap().into()));
        // A killed transfer's key line among the user's own.
        let keys = home.file(
            ".ssh/authorized_keys",
            format!("ssh-ed25519 MINE me\nrestrict ssh-ed25519 AAAA relaymove-direct-{HASH}\n")
                .as_bytes(),
        );
        v.push(("authorized-key".into(), keys.to_str().unwrap().into()));
        v.sort();
        v
    }

    #[test]
    fn it_finds_and_removes_what_the_agent_leaves_then_has_nothing_to_do() {
        for xdg in [false, true] {
            let home = Home::new();
            let ours = plant_ours(&home, xdg);
            let (status, listed, err) = home.run("list", xdg);
            assert_eq!(status, 0, "{err}");
            assert_eq!(removed(&listed), ours, "xdg {xdg}");
            for (_, path) in &ours {
                assert!(Path::new(path).exists(), "list removed {path}");
            }
            let (status, found, err) = home.run("remove", xdg);
            assert_eq!(status, 0, "{err}");
            assert_eq!(found, listed, "remove reports what list said");
            assert!(found.contains(&Finding::Remove {
                kind: "agent".into(),
                bytes: 5,
                path: home
                    .path(&format!(".local/lib/relaymove/bin/{AGENT}"))
                    .to_str()
                    .unwrap()
                    .into()
            }));
            assert!(
                !home.path(".local/lib/relaymove").exists(),
                "agent dir left"
            );
            let (cache, locks) = home.places(xdg);
            assert!(!cache.exists() && !locks.exists(), "xdg {xdg}");
            assert_eq!(
                std::fs::read(home.path(".ssh/authorized_keys")).unwrap(),
                b"ssh-ed25519 MINE me\n",
                "the user's own key line stays"
            );
            assert_eq!(home.run("remove", xdg), (0, vec![], String::new()));
        }
    }

    #[test]
    fn key_lines_are_removed_under_the_agents_lock_on_the_ssh_directory() {
        let home = Home::new();
        let keys = home.file(
            ".ssh/authorized_keys",
            format!("ssh-ed25519 MINE me\nrestrict ssh-ed25519 AAAA relaymove-direct-{HASH}\n")
                .as_bytes(),
        );
        // What an agent adding or removing its line holds (remote::direct).
        let dir = std::fs::File::open(home.path(".ssh")).unwrap();
        let held = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive).unwrap();
        std::thread::scope(|s| {
            let cleanup = s.spawn(|| home.run("remove", false));
            std::thread::sleep(std::time::Duration::from_millis(700));
            assert!(
                std::fs::read_to_string(&keys)
                    .unwrap()
                    .contains("relaymove-direct-"),
                "cleanup rewrote authorized_keys while an agent held the lock"
            );
            drop(held);
            let (status, _, err) = cleanup.join().unwrap();
            assert_eq!(status, 0, "{err}");
        });
        assert_eq!(std::fs::read(&keys).unwrap(), b"ssh-ed25519 MINE me\n");
    }

    #[test]
    fn what_is_not_ours_stays_and_symlinks_are_not_followed() {
        let home = Home::new();
        let ours = plant_ours(&home, false);
        let victim = home.file("victim", b"keep me");
        let notes = home.file(".local/lib/relaymove/bin/notes", b"mine");
        let cache = home.path(".cache/relaymove");
        let planted = cache.join("fedcba9876543210fedcba9876543210.hashes");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        home.own(&planted);
        let (status, found, err) = home.run("remove", false);
        assert_eq!(status, 0, "{err}");
        assert_eq!(removed(&found), ours);
        assert!(found.contains(&Finding::Foreign {
            path: planted.to_str().unwrap().into()
        }));
        assert!(found.contains(&Finding::Keep {
            count: 1,
            path: home
                .path(".local/lib/relaymove/bin")
                .to_str()
                .unwrap()
                .into()
        }));
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(notes.exists() && planted.symlink_metadata().is_ok());
        assert!(!home.path(".local/lib/relaymove/locks").exists());
    }

    #[test]
    fn a_symlinked_or_shared_directory_is_not_searched_and_nothing_is_removed() {
        let home = Home::new();
        let ours = plant_ours(&home, false);
        let elsewhere = home.path("elsewhere");
        home.dir_all(&elsewhere);
        let bait = home.file(&format!("elsewhere/{HASH}.hashes"), b"x");
        let cache = home.path(".cache/relaymove");
        std::fs::remove_dir_all(&cache).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &cache).unwrap();
        home.own(&cache);
        let (status, found, err) = home.run("remove", false);
        assert_eq!(status, UNSAFE, "{err}");
        assert_eq!(
            found,
            [Finding::Unsafe {
                why: "is a symlink".into(),
                path: cache.to_str().unwrap().into()
            }]
        );
        assert!(bait.exists());
        for (_, path) in &ours {
            if !path.contains("/.cache/") {
                assert!(Path::new(path).exists(), "{path} removed");
            }
        }
        let msg = format!("{:#}", refusal("old", status, &found).unwrap_err());
        assert!(
            msg.contains("is a symlink") && msg.contains("nothing was removed"),
            "{msg}"
        );

        let home = Home::new();
        plant_ours(&home, false);
        let bin = home.path(".local/lib/relaymove/bin");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (status, found, _) = home.run("remove", false);
        assert_eq!(status, UNSAFE);
        assert!(matches!(&found[..], [Finding::Unsafe { why, .. }] if why.contains("writable")));
        assert!(bin.join(AGENT).exists());
    }

    #[test]
    fn a_migration_under_way_refuses_the_cleanup() {
        let home = Home::new();
        let ours = plant_ours(&home, false);
        let kept = home.file(
            ".local/lib/relaymove/migrate/postfix/main.cf",
            b"myhostname = x\n",
        );
        let (status, found, err) = home.run("remove", false);
        assert_eq!(status, BUSY, "{err}");
        let dir = kept.parent().unwrap().to_str().unwrap().to_string();
        assert_eq!(found, [Finding::Migrating { path: dir }]);
        for (_, path) in &ours {
            assert!(Path::new(path).exists(), "{path} removed");
        }
        let msg = format!("{:#}", refusal("root@old", BUSY, &found).unwrap_err());
        assert!(msg.contains("a migration is under way"), "{msg}");
    }

    #[test]
    fn a_held_lock_refuses_the_cleanup_and_names_its_holder() {
        let home = Home::new();
        let ours = plant_ours(&home, false);
        let lock = ours.iter().find(|(k, _)| k == "lock").unwrap().1.clone();
        let file = std::fs::File::open(&lock).unwrap();
        let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        for mode in ["list", "remove"] {
            let (status, found, err) = home.run(mode, false);
            assert_eq!(status, BUSY, "{err}");
            assert_eq!(
                found,
                [Finding::Busy {
                    pid: std::process::id().to_string(),
                    path: lock.clone()
                }]
            );
        }
        for (_, path) in &ours {
            assert!(Path::new(path).exists(), "{path} removed");
        }
        let msg = format!(
            "{:#}",
            refusal("root@old", BUSY, &found_busy(&lock)).unwrap_err()
        );
        assert!(
            msg.contains("held by pid") && msg.contains("kill PID` on root@old"),
            "{msg}"
        );
        drop(held);
        assert_eq!(home.run("remove", false).0, 0);
        assert!(!Path::new(&lock).exists());
    }

    fn found_busy(path: &str) -> Vec<Finding> {
        vec![Finding::Busy {
            pid: "7".into(),
            path: path.into(),
        }]
    }

    #[test]
    fn unexpected_output_is_an_error_naming_the_line() {
        assert_eq!(
            parse("remove\tagent\t10\t/a\tb\nrmdir\t/x\n").unwrap(),
            [
                Finding::Remove {
                    kind: "agent".into(),
                    bytes: 10,
                    path: "/a\tb".into()
                },
                Finding::Rmdir { path: "/x".into() }
            ]
        );
        let err = format!("{:#}", parse("remove\tagent\tten\t/a").unwrap_err());
        assert!(err.contains("ten"), "{err}");
        assert!(parse("hello").is_err());
    }
}
