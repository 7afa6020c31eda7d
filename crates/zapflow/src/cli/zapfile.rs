//! Zaps as files (YAML or JSON): what `zapflow apply` reads and `zapflow
//! zaps get -o yaml` writes.
//!
//! ```yaml
//! name: New comment
//! trigger:
//!   type: webhook
//!   require_signature: false
//! actions:
//!   - type: email
//!     config:
//!       to: "{{ trigger.comment.email }}"
//!       subject: "Thanks, {{ trigger.comment.author }}"
//!       body: "You wrote: {{ trigger.comment.text }}"
//!     retry:
//!       max_attempts: 3
//!       initial_delay: 2s
//! ```
//!
//! A scheduled zap has a schedule instead of a webhook:
//!
//! ```yaml
//! trigger:
//!   type: schedule
//!   cron: "0 9 * * MON-FRI"      # or `every: 30s`
//!   time_zone: Europe/Berlin
//!   missed_ticks: run_latest      # or skip (the default)
//! ```
//!
//! A file names its zap; the id, status and times belong to the server.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zapflow_core::schedule::MissedTicks;
use zapflow_proto::json::{json_to_struct, struct_to_json};
use zapflow_proto::v1 as pb;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZapFile {
    pub name: String,
    #[serde(default)]
    pub trigger: Trigger,
    pub actions: Vec<ActionFile>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    #[serde(rename = "type", default)]
    pub kind: TriggerKind,
    /// Webhook: deliveries must carry a Standard Webhooks signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_signature: Option<bool>,
    /// Schedule: a cron expression (five fields, or six with seconds first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Schedule: a fixed interval instead, such as `30s` or `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// Schedule: the IANA time zone the cron expression is read in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Schedule: what happens to ticks missed while nothing ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_ticks: Option<MissedTicks>,
}

/// The triggers there are: a webhook, or a schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    #[default]
    Webhook,
    Schedule,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionFile {
    #[serde(rename = "type")]
    pub action_type: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub config: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryFile>,
}

/// A retry policy; durations as `500ms`, `2s`, `10m`, `1h`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
}

/// A zap read from `path`.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub zap: ZapFile,
    pub path: PathBuf,
}

/// Every zap in `paths`: files, or directories whose `.yaml`, `.yml` and
/// `.json` files are read in name order. A YAML file may hold several zaps
/// as documents separated by `---`. Names must not repeat.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<Loaded>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| {
                    matches!(
                        path.extension().and_then(|ext| ext.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    let mut loaded: Vec<Loaded> = Vec::new();
    for path in files {
        for zap in read(&path)? {
            if let Some(other) = loaded.iter().find(|other| other.zap.name == zap.name) {
                bail!(
                    "{} and {} both name the zap {:?}; a name stands for one zap",
                    other.path.display(),
                    path.display(),
                    zap.name
                );
            }
            loaded.push(Loaded {
                zap,
                path: path.clone(),
            });
        }
    }
    Ok(loaded)
}

/// The zaps of one file.
fn read(path: &Path) -> anyhow::Result<Vec<ZapFile>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let zaps = if path.extension().and_then(|ext| ext.to_str()) == Some("json") {
        vec![serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))?]
    } else {
        serde_norway::Deserializer::from_str(&text)
            .map(ZapFile::deserialize)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("in {}", path.display()))?
    };
    for zap in &zaps {
        zap.check()
            .with_context(|| format!("in {}, zap {:?}", path.display(), zap.name))?;
    }
    Ok(zaps)
}

impl ZapFile {
    /// What the server would refuse for sure, said with the file's words.
    fn check(&self) -> anyhow::Result<()> {
        if self.name.trim().is_empty() {
            bail!("name: must not be empty");
        }
        if self.name.trim() != self.name {
            bail!("name: no spaces at either end");
        }
        self.trigger.check()?;
        for (index, action) in self.actions.iter().enumerate() {
            if let Some(retry) = &action.retry {
                for (field, text) in [
                    ("initial_delay", &retry.initial_delay),
                    ("max_delay", &retry.max_delay),
                ] {
                    if let Some(text) = text {
                        parse_duration(text)
                            .with_context(|| format!("actions[{index}].retry.{field}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The zap's actions as the contract has them.
    pub fn actions_proto(&self) -> Vec<pb::Action> {
        self.actions
            .iter()
            .map(|action| pb::Action {
                r#type: action.action_type.clone(),
                config: Some(json_to_struct(&action.config)),
                retry: action.retry.as_ref().map(|retry| pb::RetryPolicy {
                    max_attempts: retry.max_attempts.unwrap_or_default(),
                    initial_delay: retry.initial_delay.as_deref().and_then(duration_proto),
                    multiplier: retry.multiplier.unwrap_or_default(),
                    max_delay: retry.max_delay.as_deref().and_then(duration_proto),
                }),
            })
            .collect()
    }

    /// The file a server's zap reads back as.
    pub fn from_proto(zap: &pb::Zap) -> Self {
        Self {
            name: zap.name.clone(),
            trigger: Trigger::from_proto(zap),
            actions: zap
                .actions
                .iter()
                .map(|action| ActionFile {
                    action_type: action.r#type.clone(),
                    config: action
                        .config
                        .as_ref()
                        .map(|config| whole_numbers(struct_to_json(config)))
                        .unwrap_or_default(),
                    retry: action.retry.as_ref().map(|retry| RetryFile {
                        max_attempts: (retry.max_attempts != 0).then_some(retry.max_attempts),
                        initial_delay: retry.initial_delay.as_ref().map(format_duration),
                        multiplier: (retry.multiplier != 0.0).then_some(retry.multiplier),
                        max_delay: retry.max_delay.as_ref().map(format_duration),
                    }),
                })
                .collect(),
        }
    }

    /// This file as the server would keep it: what to compare with the
    /// server's zap (`2m` and `120s` are one delay, `5` and `5.0` one number).
    pub fn normalized(&self) -> Self {
        Self::from_proto(&pb::Zap {
            name: self.name.clone(),
            actions: self.actions_proto(),
            signature_required: self.trigger.signature_required(),
            trigger: Some(self.trigger.to_proto()),
            ..Default::default()
        })
    }
}

impl Trigger {
    /// What the server would refuse for sure.
    fn check(&self) -> anyhow::Result<()> {
        match self.kind {
            TriggerKind::Webhook => {
                for (field, set) in [
                    ("cron", self.cron.is_some()),
                    ("every", self.every.is_some()),
                    ("time_zone", self.time_zone.is_some()),
                    ("missed_ticks", self.missed_ticks.is_some()),
                ] {
                    if set {
                        bail!("trigger.{field}: only a schedule trigger (type: schedule) has one");
                    }
                }
            }
            TriggerKind::Schedule => {
                if self.require_signature == Some(true) {
                    bail!(
                        "trigger.require_signature: only a webhook trigger takes signatures; a scheduled zap has no webhook"
                    );
                }
                match (&self.cron, &self.every) {
                    (Some(_), Some(_)) => bail!("trigger: give either cron or every, not both"),
                    (None, None) => bail!(
                        "trigger: a schedule needs cron (e.g. \"*/5 * * * *\") or every (e.g. 30s)"
                    ),
                    (None, Some(every)) => {
                        parse_duration(every).context("trigger.every")?;
                    }
                    (Some(_), None) => {}
                }
            }
        }
        Ok(())
    }

    /// Whether deliveries must be signed.
    pub fn signature_required(&self) -> bool {
        self.kind == TriggerKind::Webhook && self.require_signature == Some(true)
    }

    /// The trigger as the contract has it.
    pub fn to_proto(&self) -> pb::Trigger {
        use pb::schedule_trigger::Every;
        let kind = match self.kind {
            TriggerKind::Webhook => pb::trigger::Kind::Webhook(pb::WebhookTrigger {}),
            TriggerKind::Schedule => pb::trigger::Kind::Schedule(pb::ScheduleTrigger {
                every: match (&self.cron, &self.every) {
                    (Some(cron), _) => Some(Every::Cron(cron.trim().to_owned())),
                    (None, Some(every)) => duration_proto(every).map(Every::Interval),
                    (None, None) => None,
                },
                time_zone: self.time_zone.clone().unwrap_or_default(),
                missed_ticks: match self.missed_ticks.unwrap_or_default() {
                    MissedTicks::Skip => pb::MissedTicks::Skip,
                    MissedTicks::RunLatest => pb::MissedTicks::RunLatest,
                } as i32,
            }),
        };
        pb::Trigger { kind: Some(kind) }
    }

    /// The trigger of a server's zap, as a file has it.
    fn from_proto(zap: &pb::Zap) -> Self {
        use pb::schedule_trigger::Every;
        let schedule = match zap
            .trigger
            .as_ref()
            .and_then(|trigger| trigger.kind.as_ref())
        {
            Some(pb::trigger::Kind::Schedule(schedule)) => schedule,
            _ => {
                return Self {
                    kind: TriggerKind::Webhook,
                    require_signature: Some(zap.signature_required),
                    ..Self::default()
                };
            }
        };
        Self {
            kind: TriggerKind::Schedule,
            require_signature: None,
            cron: match &schedule.every {
                Some(Every::Cron(cron)) => Some(cron.clone()),
                _ => None,
            },
            every: match &schedule.every {
                Some(Every::Interval(interval)) => Some(format_duration(interval)),
                _ => None,
            },
            time_zone: Some(schedule.time_zone.clone()).filter(|zone| !zone.is_empty()),
            missed_ticks: Some(match schedule.missed_ticks() {
                pb::MissedTicks::RunLatest => MissedTicks::RunLatest,
                pb::MissedTicks::Skip | pb::MissedTicks::Unspecified => MissedTicks::Skip,
            }),
        }
    }
}

/// Numbers cross the contract as doubles: those without a fraction read
/// back as integers, as a person wrote them.
fn whole_numbers(map: Map<String, Value>) -> Map<String, Value> {
    fn whole(value: Value) -> Value {
        match value {
            Value::Number(number) => match number.as_f64() {
                Some(float) if float.fract() == 0.0 && float.abs() < 9_007_199_254_740_992.0 => {
                    Value::from(float as i64)
                }
                _ => Value::Number(number),
            },
            Value::Array(items) => Value::Array(items.into_iter().map(whole).collect()),
            Value::Object(map) => Value::Object(whole_numbers(map)),
            other => other,
        }
    }
    map.into_iter()
        .map(|(key, value)| (key, whole(value)))
        .collect()
}

/// `500ms`, `2s`, `1m30s`, `10m`, `1h`, `2d`.
pub fn parse_duration(text: &str) -> anyhow::Result<std::time::Duration> {
    zapflow_core::duration::parse(text).map_err(anyhow::Error::msg)
}

fn duration_proto(text: &str) -> Option<prost_types::Duration> {
    let duration = parse_duration(text).ok()?;
    Some(prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    })
}

/// The shortest text [`parse_duration`] reads back as `duration`.
fn format_duration(duration: &prost_types::Duration) -> String {
    let millis = duration.seconds.max(0) as u64 * 1000 + duration.nanos.max(0) as u64 / 1_000_000;
    if millis == 0 {
        return "0s".into();
    }
    let mut text = String::new();
    let mut rest = millis;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        if rest >= size {
            text.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_and_write_alike() {
        for (text, millis) in [
            ("500ms", 500),
            ("2s", 2000),
            ("1m30s", 90_000),
            ("10m", 600_000),
            ("1h", 3_600_000),
        ] {
            assert_eq!(parse_duration(text).unwrap().as_millis(), millis);
            let proto = duration_proto(text).unwrap();
            assert_eq!(format_duration(&proto), text);
        }
        assert_eq!(format_duration(&duration_proto("120s").unwrap()), "2m");
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_file_compares_as_the_server_keeps_it() {
        let file: ZapFile = serde_norway::from_str(
            "name: n\nactions:\n  - type: http\n    config: {url: 'https://example.com', timeout_seconds: 5}\n    retry: {initial_delay: 120s}\n",
        )
        .unwrap();
        let normalized = file.normalized();
        assert_eq!(
            normalized.actions[0].config["timeout_seconds"],
            Value::from(5)
        );
        assert_eq!(
            normalized.actions[0]
                .retry
                .as_ref()
                .unwrap()
                .initial_delay
                .as_deref(),
            Some("2m")
        );
        assert_eq!(normalized.normalized(), normalized);
    }

    #[test]
    fn a_schedule_reads_and_compares_as_the_server_keeps_it() {
        let file: ZapFile = serde_norway::from_str(
            "name: n\ntrigger:\n  type: schedule\n  every: 60s\n  time_zone: Europe/Berlin\nactions: []\n",
        )
        .unwrap();
        file.check().unwrap();
        let normalized = file.normalized();
        assert_eq!(normalized.trigger.every.as_deref(), Some("1m"));
        assert_eq!(normalized.trigger.missed_ticks, Some(MissedTicks::Skip));
        assert_eq!(normalized.trigger.require_signature, None);
        assert_eq!(normalized.normalized(), normalized);
        let yaml = serde_norway::to_string(&normalized).unwrap();
        assert!(
            yaml.contains(
                "trigger:\n  type: schedule\n  every: 1m\n  time_zone: Europe/Berlin\n  missed_ticks: skip\n"
            ),
            "{yaml}"
        );

        let cron: ZapFile = serde_norway::from_str(
            "name: n\ntrigger: {type: schedule, cron: '*/5 * * * *', missed_ticks: run_latest}\nactions: []\n",
        )
        .unwrap();
        let proto = cron.trigger.to_proto();
        let Some(pb::trigger::Kind::Schedule(schedule)) = proto.kind else {
            panic!("{proto:?}")
        };
        assert_eq!(
            schedule.every,
            Some(pb::schedule_trigger::Every::Cron("*/5 * * * *".into()))
        );
        assert_eq!(schedule.missed_ticks(), pb::MissedTicks::RunLatest);
        assert_eq!(cron.normalized().trigger, cron.trigger);

        // A webhook file reads back as before.
        let webhook: ZapFile = serde_norway::from_str("name: n\nactions: []\n").unwrap();
        let yaml = serde_norway::to_string(&webhook.normalized()).unwrap();
        assert!(
            yaml.contains("trigger:\n  type: webhook\n  require_signature: false\n"),
            "{yaml}"
        );
    }

    #[test]
    fn a_schedule_takes_only_its_own_fields() {
        for (yaml, complaint) in [
            (
                "{type: schedule, every: 1m, require_signature: true}",
                "require_signature",
            ),
            ("{type: schedule}", "cron"),
            ("{type: schedule, cron: '* * * * *', every: 1m}", "not both"),
            ("{type: schedule, every: soon}", "trigger.every"),
            ("{type: webhook, cron: '* * * * *'}", "trigger.cron"),
        ] {
            let file: ZapFile =
                serde_norway::from_str(&format!("name: n\ntrigger: {yaml}\nactions: []\n"))
                    .unwrap();
            let error = format!("{:#}", file.check().unwrap_err());
            assert!(error.contains(complaint), "{yaml}: {error}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = serde_norway::from_str::<ZapFile>("name: n\nactions: []\nschedule: daily\n")
            .unwrap_err();
        assert!(error.to_string().contains("schedule"), "{error}");
    }
}
