//! `relaymove generate`: the man pages and shell completions packaging ships, written from the
//! clap tree. `man -l` is not installed everywhere, so the roff text itself is checked.

use std::fs;
use std::path::Path;
use std::process::Command;

fn generate(what: &str, dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_relaymove"))
        .args(["generate", what])
        .arg(dir)
        .output()
        .expect("running relaymove");
    assert!(
        out.status.success(),
        "generate {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn man_pages_name_every_subcommand_and_option() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man"); // created by generate
    generate("man", &dir);
    for cmd in [
        "plan",
        "migrate",
        "status",
        "rollback",
        "sync",
        "dns",
        "dns-cutover",
        "init",
        "cleanup",
    ] {
        let page = read(&dir.join(format!("relaymove-{cmd}.1")));
        assert!(page.starts_with(".ie"), "relaymove-{cmd}.1 is not roff");
    }
    let top = read(&dir.join("relaymove.1"));
    assert!(top.contains(".TH relaymove 1"), "{top}");
    assert!(top.contains("relaymove\\-sync(1)"), "{top}");
    // roff escapes '-' as '\-'.
    let sync = read(&dir.join("relaymove-sync.1"));
    for opt in [
        "\\-\\-exclude",
        "\\-\\-dry\\-run",
        "\\-\\-keep\\-setuid",
        "\\-\\-tee\\-stream",
    ] {
        assert!(sync.contains(opt), "relaymove-sync.1 lacks {opt}");
    }
    let migrate = read(&dir.join("relaymove-migrate.1"));
    assert!(migrate.contains("\\-\\-until"), "{migrate}");
    // Hidden subcommands are not for people: no pages.
    for hidden in ["agent", "generate"] {
        assert!(!dir.join(format!("relaymove-{hidden}.1")).exists());
        assert!(!top.contains(&format!("relaymove\\-{hidden}")), "{top}");
    }
}

#[test]
fn completions_for_bash_zsh_fish() {
    let tmp = tempfile::tempdir().unwrap();
    generate("completions", tmp.path());
    let bash = tmp.path().join("relaymove.bash");
    let script = read(&bash);
    assert!(script.contains("migrate") && script.contains("sync"));
    assert!(!script.contains(" agent ") && !script.contains(" generate "));
    assert!(read(&tmp.path().join("_relaymove")).starts_with("#compdef relaymove"));
    assert!(read(&tmp.path().join("relaymove.fish")).contains("__fish_relaymove"));

    let syntax = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
    assert!(syntax.success(), "bash -n {}", bash.display());
    // Completion as bash runs it on <TAB>: `relaymove sy` and `relaymove sync --exc`.
    let complete = |words: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source \"$1\"; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                 _relaymove relaymove \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
                 echo \"${{COMPREPLY[@]}}\""
            ))
            .arg("bash")
            .arg(&bash)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(complete("relaymove sy"), "sync");
    assert_eq!(complete("relaymove sync --exc"), "--exclude");
}

fn relaymove(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_relaymove"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running relaymove")
}

#[test]
fn init_writes_the_documented_template_privately_and_never_over_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = relaymove(&["init"], tmp.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = tmp.path().join("relaymove.toml");
    assert_eq!(
        read(&file),
        read(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/relaymove.toml"
        )))
    );
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    fs::write(&file, "mine").unwrap();
    let out = relaymove(&["init"], tmp.path());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("relaymove.toml exists; nothing was written") && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(read(&file), "mine");
    // A symlink there is not followed, nor replaced.
    let link = tmp.path().join("link.toml");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    assert_eq!(
        relaymove(&["init", "-o", "link.toml"], tmp.path())
            .status
            .code(),
        Some(1)
    );
    assert_eq!(read(&file), "mine");

    let out = relaymove(&["init", "--force", "-o", "relaymove.toml"], tmp.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(read(&file).starts_with("# relaymove.toml"));
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");

    // Both hosts or none; targets are checked before anything connects.
    assert_eq!(
        relaymove(&["init", "--old", "root@old"], tmp.path())
            .status
            .code(),
        Some(2)
    );
    let out = relaymove(
        &["init", "-o", "x.toml", "--old", "old:/x", "--new", "new"],
        tmp.path(),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
