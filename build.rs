//! Puts the git commit into `relaymove --version` (RELAYMOVE_COMMIT): which build runs on a
//! host matters when agents and controllers meet. "unknown" outside a git checkout (a
//! tarball) or without git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // HEAD changes on checkout, the branch's ref on commit. `--git-path` finds both in a
    // worktree too, where `.git` is a file, not a directory.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    if let Some(r) = branch.and_then(|b| git(&["rev-parse", "--git-path", &b])) {
        println!("cargo:rerun-if-changed={r}");
    }
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RELAYMOVE_COMMIT={commit}");
}
