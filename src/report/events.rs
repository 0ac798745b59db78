//! Events of a migration (and its plan, status and rollback), rendered for people on stderr
//! or as JSON Lines on stdout, each object tagged by `type`. Steps hand events here and never
//! print themselves.

use crate::report::finding::{Finding, Level};
use serde::Serialize;
use std::io::Write;

#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A step begins; `n` of `of` in the registry.
    StepStarted {
        step: &'a str,
        title: &'a str,
        n: usize,
        of: usize,
    },
    /// A step recorded done whose result still holds on the hosts.
    StepSkipped {
        step: &'a str,
        reason: &'a str,
    },
    StepDone {
        step: &'a str,
        elapsed_s: f64,
        summary: &'a str,
    },
    StepFailed {
        step: &'a str,
        error: &'a str,
    },
    /// Something a step did or saw, worth a line.
    Note {
        step: &'a str,
        message: &'a str,
    },
    Finding {
        step: &'a str,
        #[serde(flatten)]
        finding: &'a Finding,
    },
    /// The run stopped at a safe point; `hint` says how to go on.
    Stopped {
        after: &'a str,
        hint: &'a str,
    },
}

#[derive(Clone, Copy)]
pub struct Reporter {
    json: bool,
}

impl Reporter {
    pub fn new(json: bool) -> Reporter {
        Reporter { json }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    pub fn emit(&self, event: Event<'_>) {
        if self.json {
            let mut out = std::io::stdout().lock();
            if serde_json::to_writer(&mut out, &event).is_ok() {
                let _ = out.write_all(b"\n");
                let _ = out.flush();
            }
            return;
        }
        let line = match event {
            Event::StepStarted { step, title, n, of } => {
                format!("\n== [{n}/{of}] {step}: {title}")
            }
            Event::StepSkipped { reason, .. } => format!("   done already: {reason}"),
            Event::StepDone {
                elapsed_s, summary, ..
            } => format!("   done in {elapsed_s:.1}s: {summary}"),
            Event::StepFailed { step, error } => format!("   FAILED {step}: {error}"),
            Event::Note { message, .. } => format!("   {message}"),
            Event::Finding { finding, .. } => {
                let mut s = format!(
                    "   {}  {}: {}",
                    finding.level.tag(),
                    finding.check,
                    finding.detail
                );
                if finding.level != Level::Ok {
                    if let Some(fix) = &finding.fix {
                        s.push_str(&format!("\n         fix: {fix}"));
                    }
                }
                s
            }
            Event::Stopped { after, hint } => {
                format!("\nrelaymove: stopped after {after}\nhint: {hint}")
            }
        };
        eprintln!("{line}");
    }

    pub fn note(&self, step: &str, message: &str) {
        self.emit(Event::Note { step, message });
    }
}
