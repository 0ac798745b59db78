//! Writes a seeded chatmail-like mailbox tree (for `bench/sync` and manual tests).
//!
//! `gen-maildir generate DIR MESSAGES [SEED]` or `gen-maildir mutate DIR [SEED]`
//! (1% new messages, 5% flag renames and new→cur moves, 1% deletes). Prints JSON.

#[path = "../tests/common/maildir.rs"]
mod maildir;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: gen-maildir generate DIR MESSAGES [SEED] | gen-maildir mutate DIR [SEED]";
    match args.get(1).map(String::as_str) {
        Some("generate") if args.len() >= 4 => {
            let messages: u64 = args[3].parse().expect("MESSAGES must be a number");
            let seed: u64 = args
                .get(4)
                .map(|s| s.parse().expect("SEED must be a number"))
                .unwrap_or(1);
            let g = maildir::generate(std::path::Path::new(&args[2]), seed, messages);
            println!(
                "{{\"files\": {}, \"bytes\": {}, \"accounts\": {}}}",
                g.files,
                g.bytes,
                g.accounts.len()
            );
        }
        Some("mutate") if args.len() >= 3 => {
            let seed: u64 = args
                .get(3)
                .map(|s| s.parse().expect("SEED must be a number"))
                .unwrap_or(1);
            let m = maildir::mutate(std::path::Path::new(&args[2]), seed, 1.0, 5.0, 1.0);
            println!(
                "{{\"new_messages\": {}, \"new_bytes\": {}, \"renamed\": {}, \"deleted\": {}}}",
                m.new_messages, m.new_bytes, m.renamed, m.deleted
            );
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
