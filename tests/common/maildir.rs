//! A seeded generator of chatmail-like mailbox trees, for tests and the benchmark.
//!
//! Layout as a chatmail relay keeps it (`/home/vmail/mail/<domain>/<addr>/`): a `password`
//! file whose mtime is the last login, `metadata.json`, `maildirsize`, `dovecot-uidlist`,
//! `dovecot.index*`, `subscriptions`, Maildir `cur/ new/ tmp/`, a `.DeltaChat` folder holding
//! hard-linked copies of some messages (Dovecot copies by hard link). Message sizes are skewed
//! like real mail: mostly a few KB, a tail of attachments up to several MB.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// splitmix64: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: f64) -> bool {
        (self.below(1_000_000) as f64) < percent * 10_000.0
    }
}

const WORDS: &[&str] = &[
    "relay",
    "mail",
    "message",
    "the",
    "and",
    "of",
    "to",
    "chat",
    "secure",
    "group",
    "hello",
    "meeting",
    "tomorrow",
    "please",
    "find",
    "attached",
    "thanks",
    "regards",
    "delta",
    "key",
    "autocrypt",
    "server",
    "migration",
    "weekend",
    "photo",
    "we",
    "you",
    "it",
    "is",
    "a",
];

fn message_size(rng: &mut Rng) -> u64 {
    let r = rng.below(1000);
    if r < 5 {
        rng.range(512 << 10, 3 << 20)
    } else if r < 35 {
        rng.range(64 << 10, 256 << 10)
    } else if r < 235 {
        rng.range(8 << 10, 64 << 10)
    } else {
        rng.range(300, 8 << 10)
    }
}

fn base64_line(rng: &mut Rng, out: &mut Vec<u8>) {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for _ in 0..76 {
        out.push(A[rng.below(64) as usize]);
    }
    out.extend_from_slice(b"\r\n");
}

/// A message of about `size` bytes: headers, a text part, and for larger ones a base64
/// "attachment" (random, so it compresses like real attachments do: barely).
pub fn message(rng: &mut Rng, id: u64, size: u64) -> Vec<u8> {
    let mut m = format!(
        "Return-Path: <u{a}@example.org>\r\nDelivered-To: u{b}@example.org\r\nReceived: from relay.example.net by mail.example.org with ESMTPS id {id:x}\r\nMessage-ID: <{id}.{r}@example.net>\r\nFrom: <u{a}@example.net>\r\nTo: <u{b}@example.org>\r\nSubject: message {id}\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nAutocrypt: addr=u{a}@example.net; keydata=mQENBF{r:x}\r\n\r\n",
        a = rng.below(5000),
        b = rng.below(5000),
        r = rng.next()
    )
    .into_bytes();
    let text_target = if size > 16 << 10 { 2048 } else { size as usize };
    while m.len() < text_target {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize];
        m.extend_from_slice(w.as_bytes());
        m.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    while (m.len() as u64) < size {
        base64_line(rng, &mut m);
    }
    m.truncate(size.max(200) as usize);
    m
}

pub struct Generated {
    pub accounts: Vec<PathBuf>,
    pub files: u64,
    pub bytes: u64,
}

fn write(path: &Path, data: &[u8], mtime: i64) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    drop(f);
    let t = nix::sys::time::TimeSpec::new(mtime, (mtime % 1000) * 1_000_003 % 1_000_000_000);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

const NOW: i64 = 1_795_000_000;

fn message_name(rng: &mut Rng, id: u64, size: u64, flags: Option<&str>) -> String {
    let t = NOW - rng.below(20 * 86400) as i64;
    let base = format!(
        "{t}.M{}P{}.mail,S={size},W={}",
        rng.below(999_999),
        id,
        size + size / 40
    );
    match flags {
        Some(f) => format!("{base}:2,{f}"),
        None => base,
    }
}

/// Builds a tree of about `messages` message files under `root/example.org/`.
pub fn generate(root: &Path, seed: u64, messages: u64) -> Generated {
    let mut rng = Rng::new(seed);
    let domain = root.join("example.org");
    fs::create_dir_all(&domain).unwrap();
    let mut g = Generated {
        accounts: Vec::new(),
        files: 0,
        bytes: 0,
    };
    let mut left = messages;
    let mut id = 0u64;
    let mut n = 0;
    while left > 0 {
        // Skewed mailbox sizes: many small, a few heavy users.
        let count =
            (1 + rng.below(30) + if rng.chance(10.0) { rng.below(400) } else { 0 }).min(left);
        left -= count;
        let addr = domain.join(format!("u{n:05}{}@example.org", rng.below(1000)));
        n += 1;
        for d in [
            "cur",
            "new",
            "tmp",
            ".DeltaChat/cur",
            ".DeltaChat/new",
            ".DeltaChat/tmp",
        ] {
            fs::create_dir_all(addr.join(d)).unwrap();
        }
        let last_login = NOW - rng.below(80 * 86400) as i64;
        let hash = format!(
            "{{SHA512-CRYPT}}$6${:016x}${:064x}\n",
            rng.next(),
            rng.next() as u128 * rng.next() as u128
        );
        write(&addr.join("password"), hash.as_bytes(), last_login);
        write(
            &addr.join("metadata.json"),
            format!(
                "{{\"devicetoken\": {{\"{:x}\": {}}}}}",
                rng.next(),
                last_login
            )
            .as_bytes(),
            last_login,
        );
        write(
            &addr.join("subscriptions"),
            b"V\t2\n\nDeltaChat\n",
            last_login,
        );
        let mut uidlist = format!(
            "3 V{} N{} G{:032x}\n",
            NOW - 86400 * 100,
            count + 1,
            rng.next()
        );
        let mut quota = 0u64;
        for uid in 1..=count {
            let size = message_size(&mut rng);
            let body = message(&mut rng, id, size);
            let in_new = rng.chance(10.0);
            let name = if in_new {
                message_name(&mut rng, id, size, None)
            } else {
                let flags = ["", "S", "S", "FS", "RS"][rng.below(5) as usize];
                message_name(&mut rng, id, size, Some(flags))
            };
            let path = addr.join(if in_new { "new" } else { "cur" }).join(&name);
            write(&path, &body, NOW - rng.below(20 * 86400) as i64);
            uidlist.push_str(&format!(
                "{uid} :{}\n",
                name.split(":2,").next().unwrap_or(&name)
            ));
            g.files += 1;
            g.bytes += body.len() as u64;
            quota += body.len() as u64;
            if !in_new && rng.chance(3.0) {
                fs::hard_link(&path, addr.join(".DeltaChat/cur").join(&name)).unwrap();
            }
            id += 1;
        }
        write(&addr.join("dovecot-uidlist"), uidlist.as_bytes(), NOW);
        write(
            &addr.join("maildirsize"),
            format!("0S\n{quota} {count}\n").as_bytes(),
            NOW,
        );
        for (f, size) in [
            ("dovecot.index", 1024),
            ("dovecot.index.log", 4096 + count * 64),
            ("dovecot.index.cache", count * 200),
        ] {
            let data: Vec<u8> = (0..size).map(|_| rng.below(256) as u8).collect();
            write(&addr.join(f), &data, NOW);
            g.bytes += size;
        }
        g.files += 6;
        g.accounts.push(addr);
    }
    g
}

/// What `mutate` did, for checks and for the benchmark's byte accounting.
#[derive(Default, Debug)]
pub struct Mutation {
    pub new_messages: u64,
    pub new_bytes: u64,
    pub renamed: u64,
    pub deleted: u64,
}

/// A day of mail: `new_pct`% new messages, `rename_pct`% flag changes and new→cur moves,
/// `delete_pct`% expunges (percentages of existing messages).
pub fn mutate(root: &Path, seed: u64, new_pct: f64, rename_pct: f64, delete_pct: f64) -> Mutation {
    let mut rng = Rng::new(seed.wrapping_mul(31) + 7);
    let mut messages: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_type().is_file()
                && e.path()
                    .parent()
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n == "cur" || n == "new")
        })
        .map(|e| e.into_path())
        .collect();
    let total = messages.len() as f64;
    let mut m = Mutation::default();
    let want_deletes = (total * delete_pct / 100.0) as u64;
    let want_renames = (total * rename_pct / 100.0) as u64;
    let want_new = (total * new_pct / 100.0) as u64;
    for _ in 0..want_deletes {
        if messages.is_empty() {
            break;
        }
        let i = rng.below(messages.len() as u64) as usize;
        let path = messages.swap_remove(i);
        fs::remove_file(&path).unwrap();
        m.deleted += 1;
    }
    for _ in 0..want_renames {
        if messages.is_empty() {
            break;
        }
        let i = rng.below(messages.len() as u64) as usize;
        let path = messages.swap_remove(i);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let dir = path.parent().unwrap();
        let target = if dir.ends_with("new") {
            dir.parent()
                .unwrap()
                .join("cur")
                .join(format!("{name}:2,S"))
        } else {
            dir.join(format!("{name}T"))
        };
        fs::rename(&path, &target).unwrap();
        m.renamed += 1;
    }
    let accounts: Vec<PathBuf> = messages
        .iter()
        .filter_map(|p| p.parent().and_then(|d| d.parent()).map(|a| a.to_path_buf()))
        .collect();
    for k in 0..want_new {
        let account = &accounts[rng.below(accounts.len() as u64) as usize];
        let size = message_size(&mut rng);
        let id = 1_000_000_000 + seed * 1_000_000 + k;
        let body = message(&mut rng, id, size);
        let name = message_name(&mut rng, id, size, None);
        write(&account.join("new").join(name), &body, NOW + 3600);
        m.new_messages += 1;
        m.new_bytes += body.len() as u64;
    }
    m
}
