//! The migration's journal: JSON Lines beside the config (`relaymove.toml.journal`), one
//! record per event, appended and fsynced before the step it announces goes on, so that a
//! controller killed at any instant leaves a journal that says how far it got.
//!
//! One migration per config at a time: the journal is flocked while a `migrate` or
//! `rollback` runs. A torn last line (the controller died mid-write) is ignored.

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What identifies the setup a journal belongs to; resuming with another one is refused.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub domain: String,
    pub profile: String,
    pub old: String,
    pub new: String,
    pub old_addresses: Vec<String>,
    pub new_addresses: Vec<String>,
    /// SHA-256 of each host's ed25519 host key as the host has it.
    pub old_host_key: String,
    pub new_host_key: String,
}

impl Fingerprint {
    /// What changed from `self` to `now`, one line per field.
    pub fn changes(&self, now: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what}: {a} → {b}"));
            }
        };
        check("domain", self.domain.clone(), now.domain.clone());
        check("profile", self.profile.clone(), now.profile.clone());
        check("old host", self.old.clone(), now.old.clone());
        check("new host", self.new.clone(), now.new.clone());
        check(
            "old addresses",
            self.old_addresses.join(","),
            now.old_addresses.join(","),
        );
        check(
            "new addresses",
            self.new_addresses.join(","),
            now.new_addresses.join(","),
        );
        check(
            "old host key",
            self.old_host_key.clone(),
            now.old_host_key.clone(),
        );
        check(
            "new host key",
            self.new_host_key.clone(),
            now.new_host_key.clone(),
        );
        out
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The first record of a migration (and the first after a finished rollback).
    Setup { at: u64, fingerprint: Fingerprint },
    /// A step began; `plan` holds what it observed before changing anything.
    Started {
        at: u64,
        step: String,
        plan: serde_json::Value,
    },
    /// A step finished and its checks passed; `facts` is what later steps and rollback use.
    Done {
        at: u64,
        step: String,
        facts: serde_json::Value,
    },
    Failed {
        at: u64,
        step: String,
        error: String,
    },
    /// Service is back on old; a later `migrate` starts from the beginning.
    RolledBack { at: u64 },
}

impl Record {
    pub fn step(&self) -> Option<&str> {
        match self {
            Record::Started { step, .. }
            | Record::Done { step, .. }
            | Record::Failed { step, .. } => Some(step),
            _ => None,
        }
    }
}

/// The journal, opened for reading and appending and locked for this process.
pub struct Journal {
    path: PathBuf,
    file: Flock<File>,
    records: Vec<Record>,
}

impl Journal {
    /// Opens (creating, 0600) and locks the journal; refuses when another process holds it.
    pub fn open(path: &Path) -> Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("opening the journal {}", path.display()))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err(_) => bail!(
                "another relaymove is running this migration ({} is locked)\nhint: wait for it to end; `relaymove status` shows where it stands",
                path.display()
            ),
        };
        let records = read(path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            records,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record since the last rollback finished: the current migration.
    pub fn current(&self) -> &[Record] {
        current(&self.records)
    }

    pub fn append(&mut self, record: Record) -> Result<()> {
        let mut line = serde_json::to_vec(&record).context("encoding a journal record")?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("writing the journal {}", self.path.display()))?;
        self.records.push(record);
        Ok(())
    }
}

/// Reads a journal without locking it (for `status`); a missing file is an empty journal.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(r) => records.push(r),
            // Only the last line can be torn by a crash; anything else is damage.
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => bail!(
                "{} line {}: {e}\nhint: the journal is damaged; move it aside to start the migration over",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(records)
}

/// The records after the last finished rollback.
pub fn current(records: &[Record]) -> &[Record] {
    let start = records
        .iter()
        .rposition(|r| matches!(r, Record::RolledBack { .. }))
        .map(|i| i + 1)
        .unwrap_or(0);
    &records[start..]
}

/// Where each step stands in `records`.
#[derive(Debug, Clone, PartialEq)]
pub enum StepState {
    Pending,
    /// Started, not finished: interrupted, or running now.
    Running {
        since: u64,
    },
    Done {
        at: u64,
        facts: serde_json::Value,
    },
    Failed {
        at: u64,
        error: String,
    },
}

pub fn state_of(records: &[Record], step: &str) -> StepState {
    let mut state = StepState::Pending;
    for r in records.iter().filter(|r| r.step() == Some(step)) {
        state = match r {
            Record::Started { at, .. } => StepState::Running { since: *at },
            Record::Done { at, facts, .. } => StepState::Done {
                at: *at,
                facts: facts.clone(),
            },
            Record::Failed { at, error, .. } => StepState::Failed {
                at: *at,
                error: error.clone(),
            },
            _ => state,
        };
    }
    state
}

/// The plan recorded by the first start of `step`: what the hosts showed before the step
/// changed anything (a re-run after a crash must not record the half-changed state).
pub fn first_plan<'a>(records: &'a [Record], step: &str) -> Option<&'a serde_json::Value> {
    records.iter().find_map(|r| match r {
        Record::Started { step: s, plan, .. } if s == step => Some(plan),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_ignored_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(Record::Started {
            at: 1,
            step: "presync".into(),
            plan: serde_json::json!({"trees": 3}),
        })
        .unwrap();
        j.append(Record::Done {
            at: 2,
            step: "presync".into(),
            facts: serde_json::Value::Null,
        })
        .unwrap();
        let err = Journal::open(&path).err().unwrap().to_string();
        assert!(err.contains("another relaymove"), "{err}");
        drop(j);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"type\":\"started\",\"at\":3,\"st")
            .unwrap();
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.current().len(), 2);
        assert!(matches!(
            state_of(j.current(), "presync"),
            StepState::Done { at: 2, .. }
        ));
        assert_eq!(state_of(j.current(), "final_sync"), StepState::Pending);
    }

    #[test]
    fn a_changed_setup_is_named_field_by_field() {
        let before = Fingerprint {
            domain: "mail.example.org".into(),
            profile: "chatmail".into(),
            old: "old".into(),
            new: "new".into(),
            old_addresses: vec!["198.51.100.10".into()],
            new_addresses: vec!["198.51.100.20".into()],
            old_host_key: "aa".into(),
            new_host_key: "bb".into(),
        };
        let mut now = before.clone();
        assert!(before.changes(&now).is_empty());
        now.new_addresses = vec!["198.51.100.21".into()];
        now.new_host_key = "cc".into();
        assert_eq!(
            before.changes(&now),
            vec![
                "new addresses: 198.51.100.20 → 198.51.100.21",
                "new host key: bb → cc"
            ]
        );
    }

    #[test]
    fn a_finished_rollback_starts_a_new_migration() {
        let records = vec![
            Record::Started {
                at: 1,
                step: "freeze_old".into(),
                plan: serde_json::json!({"first": true}),
            },
            Record::Started {
                at: 2,
                step: "freeze_old".into(),
                plan: serde_json::json!({"first": false}),
            },
            Record::RolledBack { at: 3 },
        ];
        assert_eq!(
            first_plan(&records, "freeze_old"),
            Some(&serde_json::json!({"first": true}))
        );
        assert!(current(&records).is_empty());
    }
}
