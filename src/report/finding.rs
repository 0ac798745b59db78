//! A finding of a check: what was checked, how it stands, and what to do when it is not ok.
//! Checks collect every finding instead of stopping at the first.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    /// Four columns, for lists.
    pub fn tag(self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub detail: String,
    /// What to do when not ok.
    pub fix: Option<String>,
}

impl Finding {
    pub fn new(check: &str, level: Level, detail: String, fix: Option<String>) -> Finding {
        Finding {
            check: check.to_string(),
            level,
            detail,
            fix,
        }
    }

    pub fn ok(check: &str, detail: String) -> Finding {
        Finding::new(check, Level::Ok, detail, None)
    }

    pub fn warn(check: &str, detail: String, fix: &str) -> Finding {
        Finding::new(check, Level::Warn, detail, Some(fix.to_string()))
    }

    pub fn fail(check: &str, detail: String, fix: &str) -> Finding {
        Finding::new(check, Level::Fail, detail, Some(fix.to_string()))
    }
}
