//! Zaps, runs and steps as the rest of the system sees them.

use serde::{Deserialize, Serialize};

/// One configured action of a zap: its type and its (templated) fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    #[serde(rename = "type")]
    pub action_type: String,
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Overrides of the worker's retry policy for this action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryOverride>,
}

/// The parts of a retry policy an action sets itself; the rest comes from
/// the worker's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u64>,
}

/// One attempt at a step, as recorded when it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// From 1.
    pub number: u32,
    pub outcome: AttemptOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The stored spelling.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownStatus;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    other => Err(UnknownStatus(other.to_owned())),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// A status string in the database that this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

string_enum!(
    /// How an attempt at a step ended (`retrying`: a transient failure).
    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    AttemptOutcome {
        Succeeded => "succeeded",
        Retrying => "retrying",
        Failed => "failed",
    }
);

string_enum!(
    /// Whether a zap's webhook accepts deliveries.
    ZapStatus { Active => "active", Paused => "paused" }
);

string_enum!(
    /// Where a run is in its life.
    RunStatus {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
    }
);

string_enum!(
    /// Where one step of a run is in its life.
    StepStatus {
        Pending => "pending",
        Running => "running",
        Retrying => "retrying",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
    }
);

impl RunStatus {
    /// Whether the run will not change any more on its own.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}
