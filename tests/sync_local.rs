//! `relaymove sync` between local trees: every kind of entry and metadata, then mutations
//! (adds, deletes, in-place edits, Maildir renames, type changes, a planted symlink), then a
//! no-change pass. DEST is compared with SRC entry by entry after every pass.

mod common;

use common::{assert_mirror, lchown, p, relaymove, set_mtime, snapshot, sync_json};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

fn write(root: &Path, rel: &[u8], data: &[u8]) {
    let path = p(root, rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, data).unwrap();
}

fn chmod(root: &Path, rel: &[u8], mode: u32) {
    fs::set_permissions(p(root, rel), fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every case the mirror must preserve.
fn build_everything(src: &Path) {
    write(src, b"plain.txt", b"hello\n");
    write(src, b"empty", b"");
    write(src, b"big.bin", &vec![7u8; 3 << 20]);
    fs::create_dir_all(p(src, b"empty-dir")).unwrap();
    fs::create_dir_all(p(src, b"sticky")).unwrap();
    chmod(src, b"sticky", 0o1777);
    write(src, b"setuid", b"#!/bin/sh\n");
    chmod(src, b"setuid", 0o4755);
    write(src, b"setgid", b"x");
    chmod(src, b"setgid", 0o2750);
    write(src, b"group-writable", b"umask must not mask this");
    chmod(src, b"group-writable", 0o666);
    write(src, b"no-permissions", b"still copied");
    chmod(src, b"no-permissions", 0o000);
    write(src, b"secret", b"dkim private key");
    chmod(src, b"secret", 0o600);
    // Names are bytes.
    write(src, b"with space", b"a");
    write(src, b"new\nline", b"b");
    write(src, b"bad-utf8-\xff\xfe", b"c");
    write(src, b"-leading-dash", b"d");
    write(src, &[b'n'; 255], b"255-byte name");
    let deep: Vec<u8> = (0..12)
        .flat_map(|i| format!("directory-level-{i:02}/").into_bytes())
        .collect();
    let mut long = deep.clone();
    long.extend_from_slice(b"file-at-the-end-of-a-path-far-longer-than-100-bytes");
    write(src, &long, b"deep");
    // Symlinks: relative, absolute, dangling, to a directory (never followed).
    symlink("plain.txt", p(src, b"link-rel")).unwrap();
    symlink("/etc/hostname", p(src, b"link-abs")).unwrap();
    symlink("does/not/exist", p(src, b"link-dangling")).unwrap();
    symlink("empty-dir", p(src, b"link-dir")).unwrap();
    let long_target: String = "t".repeat(150);
    symlink(&long_target, p(src, b"link-long-target")).unwrap();
    // Hard links, one group across directories, one within.
    write(src, b"cur/msg:2,S", b"a message with two names");
    fs::create_dir_all(p(src, b".DeltaChat/cur")).unwrap();
    fs::hard_link(p(src, b"cur/msg:2,S"), p(src, b".DeltaChat/cur/msg:2,S")).unwrap();
    write(src, b"h1", b"three names");
    fs::hard_link(p(src, b"h1"), p(src, b"h2")).unwrap();
    fs::hard_link(p(src, b"h1"), p(src, b"cur/h3")).unwrap();
    // A fifo and a socket (the socket is skipped and reported).
    nix::unistd::mkfifo(
        &p(src, b"fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(p(src, b"sock")).unwrap();
    // Owners: a named system user, a uid with no name on this host.
    lchown(&p(src, b"secret"), 1, 1); // daemon:daemon on Debian
    lchown(&p(src, b"plain.txt"), 54321, 54322);
    lchown(&p(src, b"link-rel"), 1, 1);
    // mtimes with nanoseconds, on files, symlinks and directories (set last).
    set_mtime(&p(src, b"plain.txt"), 1_600_000_000, 123_456_789);
    set_mtime(&p(src, b"link-rel"), 1_500_000_000, 987_654_321);
    set_mtime(&p(src, b"empty-dir"), 1_400_000_000, 1);
    set_mtime(&p(src, b"cur"), 1_300_000_000, 999_999_999);
    set_mtime(src, 1_200_000_000, 5);
}

#[test]
fn mirrors_every_kind_of_entry_then_follows_changes() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    fs::create_dir(&src).unwrap();
    build_everything(&src);
    // An exact mirror, setuid-root included, is what --keep-setuid asks for.
    const KEEP: &[&str] = &["--keep-setuid"];

    let r = sync_json(&src, &dest, KEEP, &cache);
    assert_mirror(&src, &dest);
    assert_eq!(r["verified"], true);
    let cache_mode = fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(
        cache_mode & 0o077,
        0,
        "hash cache directory is open to others: {cache_mode:o}"
    );
    assert_eq!(r["skipped"][0]["path"], "sock");
    assert!(r["skipped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("socket"));
    assert_eq!(r["linked"], 3, "{r}");
    assert!(r["sent"].as_u64().unwrap() >= 14);
    // Between local trees the stream is a plain tar: the content and its headers.
    assert!(r["wire_bytes"].as_u64().unwrap() > r["bytes_sent"].as_u64().unwrap());
    // Asked for, it is compressed, and the mirror is as exact.
    let zstd_dest = dest.with_file_name("dest-zstd");
    let z = sync_json(
        &src,
        &zstd_dest,
        &["--keep-setuid", "--compress-level", "3"],
        &cache,
    );
    assert_mirror(&src, &zstd_dest);
    assert!(z["wire_bytes"].as_u64().unwrap() < z["bytes_sent"].as_u64().unwrap());
    assert_eq!(z["bytes_sent"], r["bytes_sent"]);

    // Mutate: add, delete, modify in place, Maildir moves, type changes, a planted symlink.
    write(&src, b"added", b"new file");
    fs::remove_file(p(&src, b"with space")).unwrap();
    fs::remove_dir_all(p(&src, b"directory-level-00")).unwrap();
    fs::write(p(&src, b"big.bin"), vec![8u8; 3 << 20]).unwrap(); // same size, new mtime
    fs::rename(p(&src, b"cur/msg:2,S"), p(&src, b"cur/msg:2,RS")).unwrap();
    write(
        &src,
        b"new/incoming",
        b"moved from new to cur by the client",
    );
    let _ = sync_json(&src, &dest, KEEP, &cache);
    fs::rename(p(&src, b"new/incoming"), p(&src, b"cur/incoming:2,S")).unwrap();
    fs::remove_file(p(&src, b"empty")).unwrap();
    fs::create_dir(p(&src, b"empty")).unwrap(); // file -> directory
    write(&src, b"empty/inside", b"x");
    fs::remove_dir(p(&src, b"empty-dir")).unwrap();
    write(&src, b"empty-dir", b"directory -> file");
    fs::remove_file(p(&src, b"h2")).unwrap();
    symlink("h1", p(&src, b"h2")).unwrap(); // file -> symlink
    chmod(&src, b"setgid", 0o2700); // metadata only
                                    // DEST has a symlink where SRC has a directory: it must be replaced, never followed.
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::create_dir_all(p(&src, b"maildir/cur")).unwrap();
    write(&src, b"maildir/cur/m1", b"must not land outside");
    fs::create_dir_all(p(&dest, b"")).unwrap();
    symlink(&outside, p(&dest, b"maildir")).unwrap();

    let r = sync_json(&src, &dest, KEEP, &cache);
    assert_mirror(&src, &dest);
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written through the symlink"
    );
    assert_eq!(
        r["renamed"], 1,
        "the new->cur move must be a rename, not a send: {r}"
    );

    // No change: nothing is sent, nothing on the wire.
    let r = sync_json(&src, &dest, KEEP, &cache);
    assert_eq!(
        (
            r["sent"].as_u64(),
            r["wire_bytes"].as_u64(),
            r["deleted"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    assert_mirror(&src, &dest);
}

#[test]
fn root_setuid_and_setgid_files_arrive_without_those_bits_and_a_warning_unless_kept() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    write(&src, b"suid-root", b"#!/bin/sh\n");
    chmod(&src, b"suid-root", 0o4755);
    write(&src, b"sgid-root", b"x");
    chmod(&src, b"sgid-root", 0o2750);
    write(&src, b"suid-daemon", b"y");
    lchown(&p(&src, b"suid-daemon"), 1, 1); // before chmod: chown clears setuid
    chmod(&src, b"suid-daemon", 0o4755);
    fs::create_dir(p(&src, b"sgid-dir")).unwrap();
    chmod(&src, b"sgid-dir", 0o2775);
    let mode = |rel: &[u8]| fs::metadata(p(&dest, rel)).unwrap().permissions().mode() & 0o7777;

    let r = sync_json(&src, &dest, &[], &cache);
    assert_eq!(
        [mode(b"suid-root"), mode(b"sgid-root")],
        [0o755, 0o750],
        "root's setuid/setgid bits arrived without --keep-setuid"
    );
    assert_eq!(mode(b"suid-daemon"), 0o4755, "not root's: kept");
    assert_eq!(mode(b"sgid-dir"), 0o2775, "directories keep setgid");
    let warning = r["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("2 root-owned setuid/setgid files")
            && warning.contains("sgid-root, suid-root")
            && warning.contains("--keep-setuid"),
        "{r}"
    );
    // Without the bits DEST counts as up to date: a rerun plans nothing, and warns again.
    let r = sync_json(&src, &dest, &[], &cache);
    assert_eq!(r["sent"], 0, "{r}");
    assert!(sync_json(&src, &dest, &["-v"], &cache)["warnings"][0]
        .as_str()
        .is_some_and(|w| w.contains("--keep-setuid")));

    let r = sync_json(&src, &dest, &["--keep-setuid"], &cache);
    assert_eq!([mode(b"suid-root"), mode(b"sgid-root")], [0o4755, 0o2750]);
    assert!(r["warnings"].as_array().unwrap().is_empty(), "{r}");
    assert_mirror(&src, &dest);
}

#[test]
fn flag_renames_and_moves_are_not_resent() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    let g = common::maildir::generate(&src, 7, 400);
    assert!(g.files > 400);
    let _ = sync_json(&src, &dest, &[], &cache);
    assert_mirror(&src, &dest);
    let m = common::maildir::mutate(&src, 7, 1.0, 5.0, 1.0);
    assert!(
        m.renamed >= 19 && m.deleted >= 3 && m.new_messages >= 3,
        "{m:?}"
    );
    let r = sync_json(&src, &dest, &[], &cache);
    assert_mirror(&src, &dest);
    assert_counts_add_up(&r);
    // Each count is what the day did, once: a renamed message that also has a hard-linked
    // name is placed by a link, but it is a rename, and its old name is no delete.
    let count = |k: &str| r[k].as_u64();
    assert_eq!(count("renamed"), Some(m.renamed), "{r}");
    assert_eq!(count("sent"), Some(m.new_messages), "{r}");
    assert_eq!(count("bytes_sent"), Some(m.new_bytes), "{r}");
    assert_eq!(count("deleted"), Some(m.deleted), "{r}");
    assert_eq!(
        (count("linked"), count("copied")),
        (Some(0), Some(0)),
        "{r}"
    );
}

/// A rename is done in place when it can be (the old name is deleted, the new one is free,
/// its directory stays) and through the staging directory otherwise: every case arrives.
#[test]
fn renames_into_taken_names_new_folders_and_out_of_deleted_folders_all_arrive() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    let files: [(&[u8], &[u8]); 6] = [
        (b"f/a", b"content of a"),
        (b"f/b", b"content of b, longer"),
        (b"f/x", b"x is replaced"),
        (b"g/c", b"content of c, longest yet"),
        (b"h/d", b"d, in a folder that goes"),
        (b"h/e", b"e goes with it"),
    ];
    for (i, (rel, data)) in files.iter().enumerate() {
        write(&src, rel, data);
        set_mtime(&p(&src, rel), 1_700_000_000 + i as i64, 0);
    }
    let _ = sync_json(&src, &dest, &[], &cache);
    assert_mirror(&src, &dest);

    // In place: a flag rename, and a message out of a folder that is deleted.
    fs::rename(p(&src, b"f/a"), p(&src, b"f/a:2,S")).unwrap();
    fs::rename(p(&src, b"h/d"), p(&src, b"f/d")).unwrap();
    fs::remove_dir_all(p(&src, b"h")).unwrap();
    // Staged: into a folder DEST does not have yet, onto a name DEST holds other content
    // under, and content that also stays where it was.
    fs::create_dir(p(&src, b"new")).unwrap();
    fs::rename(p(&src, b"f/b"), p(&src, b"new/b")).unwrap();
    fs::rename(p(&src, b"g/c"), p(&src, b"f/x")).unwrap();
    fs::copy(p(&src, b"f/a:2,S"), p(&src, b"f/a-copy")).unwrap();
    set_mtime(&p(&src, b"f/a-copy"), 1_700_000_000, 0);
    fs::remove_dir(p(&src, b"g")).unwrap();

    let r = sync_json(&src, &dest, &[], &cache);
    assert_mirror(&src, &dest);
    assert_counts_add_up(&r);
    let count = |k: &str| r[k].as_u64();
    assert_eq!(
        (count("renamed"), count("copied"), count("sent")),
        (Some(4), Some(1), Some(0)),
        "{r}"
    );
    let staging: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_bytes().starts_with(b".relaymove-tmp"))
        .collect();
    assert!(
        staging.is_empty(),
        "the staging directory is left: {staging:?}"
    );
}

/// The SRC entries scanned, by type, add up to the entries in each category of change.
fn assert_counts_add_up(r: &serde_json::Value) {
    let sum = |keys: &[&str]| -> u64 { keys.iter().map(|k| r[k].as_u64().unwrap()).sum() };
    let scanned = sum(&[
        "files_scanned",
        "dirs_scanned",
        "symlinks_scanned",
        "others_scanned",
    ]);
    let accounted = sum(&[
        "sent",
        "renamed",
        "copied",
        "linked",
        "dirs_created",
        "attrs_only",
        "unchanged",
    ]) + r["skipped"].as_array().unwrap().len() as u64;
    assert_eq!(scanned, accounted, "the counts do not add up: {r}");
}

#[test]
fn every_change_is_counted_once_and_verbose_json_lists_the_paths() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    write(&src, b"keep", b"unchanged");
    write(&src, b"edit", b"before");
    write(&src, b"log", b"yesterday's log");
    write(&src, b"cur/m1:2,", b"a message");
    write(&src, b"cur/shared", b"two names");
    fs::create_dir(p(&src, b"other")).unwrap();
    fs::hard_link(p(&src, b"cur/shared"), p(&src, b"other/shared")).unwrap();
    write(&src, b"gone/x", b"to be deleted");
    symlink("keep", p(&src, b"ln-old")).unwrap();
    let r = sync_json(&src, &dest, &[], &cache);
    assert_counts_add_up(&r);
    assert!(
        r.get("changes").is_none(),
        "paths are listed only with -v: {r}"
    );

    write(&src, b"edit", b"after, and longer");
    write(&src, b"added/new", b"new");
    write(&src, b"new-\xff", b"a name that is not UTF-8");
    // A rotated log: the old content moves, the old name gets new content.
    fs::rename(p(&src, b"log"), p(&src, b"log.1")).unwrap();
    write(&src, b"log", b"today's log, a longer one");
    fs::rename(p(&src, b"cur/m1:2,"), p(&src, b"cur/m1:2,S")).unwrap();
    fs::hard_link(p(&src, b"keep"), p(&src, b"keep2")).unwrap();
    fs::remove_dir_all(p(&src, b"gone")).unwrap();
    fs::remove_file(p(&src, b"ln-old")).unwrap();
    symlink("edit", p(&src, b"ln-new")).unwrap();
    chmod(&src, b"cur/shared", 0o600);

    let r = sync_json(&src, &dest, &["-v"], &cache);
    assert_mirror(&src, &dest);
    assert_counts_add_up(&r);
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(
        [
            n("files_scanned"),
            n("dirs_scanned"),
            n("symlinks_scanned"),
            n("others_scanned")
        ],
        [10, 3, 1, 0],
        "{r}"
    );
    assert_eq!(
        r["changes"],
        serde_json::json!({
            "sent": ["added/new", "edit", "ln-new", "log", {"bytes": "bmV3Lf8="}],
            "renamed": [
                {"from": "cur/m1:2,", "to": "cur/m1:2,S"},
                {"from": "log", "to": "log.1"},
            ],
            "copied": [],
            "linked": [{"from": "keep", "to": "keep2"}],
            "dirs_created": ["added"],
            // `cur` lost and gained a name, so its mtime changed; both names of the
            // hard-linked file show its new mode.
            "attrs_only": ["cur", "cur/shared", "other/shared"],
            "deleted": ["gone", "gone/x", "ln-old"],
        }),
        "{r}"
    );
    assert_eq!(n("unchanged"), 2, "keep and other/: {r}");
    assert_eq!(
        n("bytes_sent"),
        3 + 17 + 24 + 25,
        "file contents, not symlinks: {r}"
    );
}

#[test]
fn a_dry_run_says_what_it_would_send_in_binary_units_and_claims_no_stream() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    write(&src, b"a", &[1u8; 2048]);
    let _ = sync_json(&src, &dest, &[], &cache);
    write(&src, b"b", &[2u8; 3072]);
    fs::rename(p(&src, b"a"), p(&src, b"a2")).unwrap();

    let args = sync_args(&[OsStr::new("-n")], &src, &dest);
    let a: Vec<&OsStr> = args.iter().map(|x| x.as_os_str()).collect();
    let out = relaymove(&a, &cache);
    assert!(out.status.success());
    let (listing, summary) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(listing, "rename  a -> a2\nsend    b\n");
    assert!(
        summary.contains(
            ": 2 entries (2 files): would send 1 (3.00 KiB), rename 1; 0 unchanged; \
             would delete 0 from DEST; dry run, nothing was changed ["
        ),
        "{summary}"
    );
    let r = sync_json(&src, &dest, &["-n"], &cache);
    assert_eq!(
        (
            &r["dry_run"],
            &r["wire_bytes"],
            &r["sent"],
            &r["bytes_sent"]
        ),
        (
            &serde_json::json!(true),
            &serde_json::Value::Null,
            &serde_json::json!(1),
            &serde_json::json!(3072)
        ),
        "a dry run streams nothing: {r}"
    );
}

#[test]
fn checksum_mode_finds_content_changes_that_keep_size_and_mtime() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    write(&src, b"f", b"aaaa");
    set_mtime(&p(&src, b"f"), 1_000_000, 0);
    let _ = sync_json(&src, &dest, &[], &cache);
    fs::write(p(&src, b"f"), b"bbbb").unwrap();
    set_mtime(&p(&src, b"f"), 1_000_000, 0);
    let r = sync_json(&src, &dest, &[], &cache);
    assert_eq!(r["sent"], 0, "size+mtime cannot see this change");
    let r = sync_json(&src, &dest, &["--checksum"], &cache);
    assert_eq!(r["sent"], 1);
    assert_mirror(&src, &dest);
}

#[test]
fn no_delete_dry_run_and_exclude() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    write(&src, b"keep", b"1");
    write(&src, b"a/x.lock", b"lock");
    write(&src, b"a/tmp/partial", b"p");
    write(&dest, b"extra", b"only in dest");
    let r = sync_json(
        &src,
        &dest,
        &["--no-delete", "--exclude", "*.lock", "--exclude", "a/tmp"],
        &cache,
    );
    assert_eq!(r["deleted"], 0);
    assert!(p(&dest, b"extra").exists());
    assert!(!p(&dest, b"a/x.lock").exists());
    assert!(!p(&dest, b"a/tmp").exists());
    let before = snapshot(&dest);
    write(&src, b"later", b"2");
    let r = sync_json(
        &src,
        &dest,
        &["--dry-run", "--exclude", "*.lock", "--exclude", "a/tmp"],
        &cache,
    );
    assert_eq!(
        (
            r["dry_run"].as_bool(),
            r["sent"].as_u64(),
            r["deleted"].as_u64()
        ),
        (Some(true), Some(1), Some(1)),
        "{r}"
    );
    assert_eq!(before, snapshot(&dest), "--dry-run changed DEST");
}

#[test]
fn an_empty_or_missing_source_does_not_empty_dest() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    fs::create_dir(&src).unwrap();
    write(&dest, b"a", b"1");
    write(&dest, b"b/c", b"2");
    let args = |extra: &[&str], s: &Path| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec!["sync".into(), "--no-progress".into()];
        v.extend(extra.iter().map(|e| e.into()));
        v.push(s.as_os_str().to_owned());
        v.push(dest.as_os_str().to_owned());
        v
    };
    let run = |a: Vec<std::ffi::OsString>| {
        let a: Vec<&OsStr> = a.iter().map(|x| x.as_os_str()).collect();
        relaymove(&a, &cache)
    };
    let out = run(args(&[], &src));
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("refusing to delete 3 entries"), "{msg}");
    assert!(p(&dest, b"b/c").exists());
    let missing = t.path().join("no-such-dir");
    let out = run(args(&[], &missing));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert!(p(&dest, b"a").exists());
    let out = run(args(&["--allow-empty-source"], &src));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!p(&dest, b"a").exists());
}

#[test]
fn usage_errors_exit_2() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    for args in [
        vec!["sync"],
        vec!["sync", "host:relative", "/tmp/x"],
        vec!["sync", "--bogus", "a", "b"],
    ] {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = relaymove(&args, &cache);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_stream_is_a_tar_that_standard_tools_read() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    fs::create_dir(&src).unwrap();
    build_everything(&src);
    let tee = t.path().join("stream.tar.zst");
    let tee_arg = tee.to_str().unwrap();
    let _ = sync_json(&src, &dest, &["--tee-stream", tee_arg], &cache);
    let listing = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -dc '{tee_arg}' | tar tvf -"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    assert!(text.contains("plain.txt"), "{text}");
    assert!(text.contains("link-rel -> plain.txt"), "{text}");
    assert!(text.contains("h2 link to cur/h3"), "{text}");
    assert!(
        text.contains("file-at-the-end-of-a-path-far-longer-than-100-bytes"),
        "{text}"
    );
    assert!(
        text.contains("54321/54322"),
        "numeric owner without a name: {text}"
    );
}

/// A tmpfs of `size` mounted at `dir` (created), unmounted when dropped; None (with the
/// reason) when not root, as mounting needs it.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: mounting a tmpfs needs root");
            return None;
        }
        fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs on {}", dir.display());
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// `n` files of `size` random (incompressible) bytes under `dir`.
fn random_files(dir: &Path, prefix: &str, n: usize, size: usize) {
    fs::create_dir_all(dir).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (n as u64);
    for i in 0..n {
        let data: Vec<u8> = (0..size / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        fs::write(dir.join(format!("{prefix}{i:03}")), data).unwrap();
    }
}

fn sync_args(extra: &[&OsStr], src: &Path, dest: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["sync".into(), "--no-progress".into()];
    v.extend(extra.iter().map(|e| e.to_os_string()));
    v.push(src.into());
    v.push(dest.into());
    v
}

fn run_sync(args: &[std::ffi::OsString], cache: &Path) -> (Option<i32>, String) {
    let a: Vec<&OsStr> = args.iter().map(|x| x.as_os_str()).collect();
    let out = relaymove(&a, cache);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_dest_too_small_is_refused_before_anything_is_written() {
    let t = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(&t.path().join("small"), "2m") else {
        return;
    };
    let (src, cache) = (t.path().join("src"), t.path().join("cache"));
    random_files(&src, "m", 4, 1 << 20);
    let dest = t.path().join("small/mail");
    let (code, msg) = run_sync(&sync_args(&[], &src, &dest), &cache);
    assert_eq!(code, Some(1), "{msg}");
    assert!(
        msg.contains(&format!(
            "not enough space for DEST: need 4.00 MiB, 2.00 MiB free on this host:{}; nothing was changed",
            dest.display()
        )),
        "{msg}"
    );
    assert!(!dest.exists(), "DEST was created");
}

#[test]
fn a_dest_that_fills_during_the_transfer_fails_at_once_naming_the_disk() {
    // DEST's own file system has room, so the check up front passes; `a/` inside it is a
    // 1 MB file system (a mount point, as /var/vmail's subtrees can be), which the first
    // file sent overflows. 40 MB follow it in the stream.
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    let Some(_fs) = Tmpfs::mount(&dest.join("a"), "1m") else {
        return;
    };
    random_files(&src.join("a"), "big", 1, 2 << 20);
    random_files(&src.join("b"), "m", 40, 1 << 20);
    let tee = t.path().join("stream.zst");
    let args = sync_args(&[OsStr::new("--tee-stream"), tee.as_os_str()], &src, &dest);
    let (code, msg) = run_sync(&args, &cache);
    assert_eq!(code, Some(1), "{msg}");
    assert!(
        msg.contains(&format!(
            "writing {}/a/big000: No space left on device",
            dest.display()
        )),
        "{msg}"
    );
    assert!(!msg.contains("broke off"), "blames the stream: {msg}");
    assert!(msg.contains("is full"), "{msg}");
    assert!(
        !msg.contains("run the same command again"),
        "a rerun cannot succeed: {msg}"
    );
    let relayed = fs::metadata(&tee).unwrap().len();
    assert!(
        relayed < 20 << 20,
        "{relayed} bytes were relayed after DEST was full"
    );
    assert!(!p(&dest, b"a/big000").exists());
}

#[test]
fn a_file_written_during_the_sync_is_left_behind_reported_and_exits_3() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    // Over 16 MiB: the sender reads it twice, to hash and to send, like a live mbox.
    random_files(&src, "mbox", 1, 20 << 20);
    write(&src, b"a", b"a");
    sync_json(&src, &dest, &[], &cache);
    let old = fs::read(dest.join("mbox000")).unwrap();
    write(&src, b"z-new", b"arrives");
    // A writer rewrites the file in place, as a mail server appending to an mbox would,
    // for as long as the sync runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), src.join("mbox000"));
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                f.write_all_at(&n.to_le_bytes(), 0).unwrap();
                f.write_all_at(&n.to_le_bytes(), (20 << 20) - 8).unwrap();
            }
        })
    };
    let args = sync_args(&[OsStr::new("--json")], &src, &dest);
    let a: Vec<&OsStr> = args.iter().map(|x| x.as_os_str()).collect();
    let out = relaymove(&a, &cache);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{msg}");
    assert!(msg.contains("left behind"), "{msg}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report}");
    assert_eq!(skipped[0]["path"], "mbox000");
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap()
            .contains("changed on the source during the sync"),
        "{report}"
    );
    assert!(report["warnings"][0]
        .as_str()
        .unwrap()
        .contains("left behind"));
    assert_eq!(
        fs::read(dest.join("mbox000")).unwrap(),
        old,
        "DEST's old version"
    );
    assert_eq!(fs::read(dest.join("z-new")).unwrap(), b"arrives");
}

#[test]
fn a_second_sync_into_the_same_dest_is_refused_naming_the_first_and_the_first_completes() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    random_files(&src, "m", 3, 8 << 20);
    // zstd's slowest level keeps the first sync busy for seconds.
    let first = std::process::Command::new(common::bin())
        .args(sync_args(
            &[OsStr::new("--compress-level"), OsStr::new("19")],
            &src,
            &dest,
        ))
        .env("RELAYMOVE_CACHE_DIR", &cache)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The receiver creates DEST after it took the lock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !dest.exists() {
        assert!(std::time::Instant::now() < deadline, "DEST never appeared");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (code, msg) = run_sync(&sync_args(&[], &src, &dest), &cache);
    assert_eq!(code, Some(1), "{msg}");
    assert!(
        msg.contains(&format!(
            "DEST {} is in use by another relaymove (agent pid ",
            dest.display()
        )),
        "{msg}"
    );
    // The pid named is the first sync's receiving agent, a child of the first sync.
    let pid: String = msg
        .split("agent pid ")
        .nth(1)
        .unwrap_or_default()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        status.contains(&format!("PPid:\t{}\n", first.id())),
        "pid {pid} is not an agent of the first sync: {msg}"
    );
    let first_out = first.wait_with_output().unwrap();
    assert!(
        first_out.status.success(),
        "the first sync failed: {}",
        String::from_utf8_lossy(&first_out.stderr)
    );
    assert_mirror(&src, &dest);
}

#[test]
fn a_dest_not_created_yet_inside_src_is_refused_as_an_overlap() {
    let t = tempfile::tempdir().unwrap();
    let (src, cache) = (t.path().join("src"), t.path().join("cache"));
    write(&src, b"a", b"1");
    symlink(&src, t.path().join("via-link")).unwrap();
    for dest in [
        src.join("sub"),
        src.join("deeper/sub"),
        t.path().join("via-link/sub"),
    ] {
        let (code, msg) = run_sync(&sync_args(&[], &src, &dest), &cache);
        assert_eq!(code, Some(2), "{}: {msg}", dest.display());
        assert!(
            msg.contains("overlap; SRC and DEST must be separate trees"),
            "{msg}"
        );
    }
    assert_eq!(fs::read_dir(&src).unwrap().count(), 1, "SRC was written to");
}

/// The children of `parent` with an open file under `dir` (the agent working there).
fn agents_in(parent: u32, dir: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let status = fs::read_to_string(e.path().join("status")).unwrap_or_default();
        if !status.contains(&format!("PPid:\t{parent}\n")) {
            continue;
        }
        let fds = fs::read_dir(e.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten();
        if fds
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(dir))
        {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_stopped_agent_fails_the_sync_after_the_timeout_naming_host_and_phase() {
    use std::time::{Duration, Instant};
    let signal = |pid: i32, sig: i32| {
        // SAFETY: kill(2) with a pid this test found among its own grandchildren.
        unsafe { libc::kill(pid, sig) }
    };
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    // Far more than the pipes and the relay buffer hold, so the stream backs up.
    random_files(&src, "m", 8, 8 << 20);
    let args = sync_args(&[OsStr::new("--timeout"), OsStr::new("2")], &src, &dest);
    let sync = std::process::Command::new(common::bin())
        .args(args)
        .env("RELAYMOVE_CACHE_DIR", &cache)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stop the receiver as soon as it starts receiving (it holds DEST open).
    let deadline = Instant::now() + Duration::from_secs(30);
    let receiver = loop {
        if dest.exists() {
            if let [pid] = agents_in(sync.id(), &dest)[..] {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "the receiver never started");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(signal(receiver, libc::SIGSTOP), 0);
    let stopped = Instant::now();
    let out = sync.wait_with_output().unwrap();
    let waited = stopped.elapsed();
    // Never leave a stopped process behind, whatever the sync did.
    signal(receiver, libc::SIGKILL);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("the agent on this host made no progress for 2 s while receiving the stream"),
        "{msg}"
    );
    assert!(msg.contains("raise --timeout"), "{msg}");
    assert!(waited < Duration::from_secs(15), "gave up after {waited:?}");
}

#[test]
fn version_names_the_git_commit_it_was_built_from() {
    let out = std::process::Command::new(common::bin())
        .arg("--version")
        .output()
        .unwrap();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("relaymove {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn rsync_flags_get_an_explanation_instead_of_a_bare_usage_error() {
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    write(&src, b"a", b"1");
    write(&dest, b"extra", b"deleted as with --delete");
    // -a, -H and --delete are what relaymove does anyway: it runs and says so.
    let args = sync_args(&[OsStr::new("-aH"), OsStr::new("--delete")], &src, &dest);
    let (code, msg) = run_sync(&args, &cache);
    assert_eq!(code, Some(0), "{msg}");
    assert!(
        msg.contains("always mirrors like rsync -aH --delete"),
        "{msg}"
    );
    assert_mirror(&src, &dest);
    // -e would connect differently than asked if ignored: refused, pointing at the config.
    for rsh in [["-e", "ssh -p 2222"], ["--rsh", "ssh -i key"]] {
        let extra: Vec<&OsStr> = rsh.iter().map(OsStr::new).collect();
        let (code, msg) = run_sync(&sync_args(&extra, &src, &dest), &cache);
        assert_eq!(code, Some(2), "{msg}");
        assert!(
            msg.contains("ssh options go in the ssh config, see --ssh-config"),
            "{msg}"
        );
    }
}

#[test]
fn the_tee_stream_is_private_never_replaces_a_file_and_never_follows_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    write(&src, b"dkim.private", b"secret key material");
    let tee = t.path().join("stream.zst");
    let args = sync_args(&[OsStr::new("--tee-stream"), tee.as_os_str()], &src, &dest);
    let (code, msg) = run_sync(&args, &cache);
    assert_eq!(code, Some(0), "{msg}");
    // It holds every byte sent, secrets included: the owner only, from its creation.
    assert_eq!(
        fs::metadata(&tee).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // An existing file is not truncated, a symlink is not followed.
    let keep = t.path().join("keep");
    fs::write(&keep, b"someone else's file").unwrap();
    write(&src, b"more", b"changed");
    for target in [keep.clone(), t.path().join("via-link")] {
        if target.ends_with("via-link") {
            std::os::unix::fs::symlink(&keep, &target).unwrap();
        }
        let args = sync_args(
            &[OsStr::new("--tee-stream"), target.as_os_str()],
            &src,
            &dest,
        );
        let (code, msg) = run_sync(&args, &cache);
        assert_eq!(code, Some(1), "{msg}");
        assert!(msg.contains("--tee-stream"), "{msg}");
        assert_eq!(fs::read(&keep).unwrap(), b"someone else's file");
    }
}
