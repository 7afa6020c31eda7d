//! The flow steps: `filter` ends a run early unless a condition holds, and
//! `delay` holds a run before its next step. Neither has an effect outside
//! zapflow: running one is working out what the run does next.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Value, json};

use crate::action::{Action, ActionError, Completed, Next, StepRef};
use crate::field::{ActionField, ActionType, FieldError, Fields, Template, template, text};

/// The longest a delay may hold a run.
pub const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

const CONDITION: ActionField = ActionField {
    name: "condition",
    description: "A minijinja expression over trigger, headers, query, steps and run, such as \
                  `trigger.amount > 100 and trigger.country in [\"DE\", \"FR\"]`. The run goes \
                  on while it is true.",
    required: true,
    templated: false,
};

/// A filter's configuration.
pub(crate) struct Filter {
    condition: String,
}

impl Action for Filter {
    const TYPE: ActionType = ActionType {
        name: "filter",
        description: "Ends the run unless `condition` holds: the run succeeds there, with the \
                      reason recorded, and its later steps are skipped. A condition that does \
                      not evaluate (say, it names a field the payload lacks: use `is defined` \
                      or `| default(...)`) fails the step.",
        fields: &[CONDITION],
        flow: true,
    };

    type Runner = ();

    fn parse(fields: &Fields<'_>) -> Result<Self, FieldError> {
        Ok(Self {
            condition: fields.required(&CONDITION, text(expression))?,
        })
    }

    async fn execute(
        self,
        _: &(),
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        self.decide(context, step)
    }

    async fn preview(
        self,
        _: &(),
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        self.decide(context, step)
    }
}

impl Filter {
    fn decide(&self, context: &Value, step: StepRef) -> Result<Completed, ActionError> {
        let passed = zapflow_core::template::evaluate(&self.condition, context)
            .map_err(|error| FieldError::new(CONDITION.name, error.to_string()))?;
        Ok(Completed {
            output: json!({ "passed": passed }),
            next: match passed {
                true => Next::Continue,
                false => Next::Stop(format!("stopped by filter at step {}", step.stage)),
            },
        })
    }
}

fn expression(source: &str) -> Result<String, String> {
    zapflow_core::template::check_expression(source)
        .map_err(|error| format!("invalid condition: {error}"))?;
    Ok(source.to_owned())
}

const FOR: ActionField = ActionField {
    name: "for",
    description: "How long to wait: `90s`, `15m`, `2h`, `1d`, `1h30m` (at most 30 days). Give \
                  `for` or `until`.",
    required: false,
    templated: false,
};
const UNTIL: ActionField = ActionField {
    name: "until",
    description: "When to go on: RFC 3339 (`2026-12-24T18:00:00+01:00`), or `YYYY-MM-DD \
                  HH:MM[:SS]` in `time_zone`; at most 30 days ahead, and a time past goes on \
                  at once.",
    required: false,
    templated: true,
};
const TIME_ZONE: ActionField = ActionField {
    name: "time_zone",
    description: "The IANA time zone `until` is read in when it has no offset (default UTC).",
    required: false,
    templated: false,
};

/// A delay's configuration: a wait, or a time to wait until.
pub(crate) enum Delay {
    For(Duration),
    Until { at: Template, zone: Tz },
}

impl Action for Delay {
    const TYPE: ActionType = ActionType {
        name: "delay",
        description: "Holds the run, then goes on with the next step: `for` a while or `until` a \
                      time, at most 30 days. A waiting run holds no worker and survives \
                      restarts; GetRun shows when it resumes. A delay cannot be a zap's last \
                      step.",
        fields: &[FOR, UNTIL, TIME_ZONE],
        flow: true,
    };

    type Runner = ();

    fn parse(fields: &Fields<'_>) -> Result<Self, FieldError> {
        let wait = fields.optional(&FOR, text(wait))?;
        let until = fields.optional(&UNTIL, template(literal_time))?;
        let zone = fields
            .optional(&TIME_ZONE, text(time_zone))?
            .unwrap_or(Tz::UTC);
        match (wait, until) {
            (Some(wait), None) => Ok(Self::For(wait)),
            (None, Some(at)) => Ok(Self::Until { at, zone }),
            _ => Err(FieldError::new(FOR.name, "give either `for` or `until`")),
        }
    }

    async fn execute(self, _: &(), context: &Value, _: StepRef) -> Result<Completed, ActionError> {
        self.resume_time(context, Utc::now())
    }

    async fn preview(self, _: &(), context: &Value, _: StepRef) -> Result<Completed, ActionError> {
        self.resume_time(context, Utc::now())
    }
}

impl Delay {
    /// When the run goes on, seen at `now`.
    fn resume_time(&self, context: &Value, now: DateTime<Utc>) -> Result<Completed, ActionError> {
        let at = match self {
            Self::For(wait) => now + *wait,
            Self::Until { at, zone } => {
                let at = at.render_as(context, |text| timestamp(text, *zone))?;
                if at - now > chrono::Duration::from_std(MAX_DELAY).expect("30 days fit") {
                    return Err(FieldError::new(
                        UNTIL.name,
                        format!("{} is more than 30 days ahead", at.to_rfc3339()),
                    )
                    .into());
                }
                at.max(now)
            }
        };
        Ok(Completed {
            output: json!({ "resume_time": at.to_rfc3339() }),
            next: Next::ResumeAt(at),
        })
    }
}

fn wait(text: &str) -> Result<Duration, String> {
    let wait = zapflow_core::duration::parse(text)?;
    match wait <= MAX_DELAY {
        true => Ok(wait),
        false => Err(format!("{text:?} is longer than 30 days")),
    }
}

/// The check of an `until` without template syntax (its zone comes later).
fn literal_time(text: &str) -> Result<(), String> {
    timestamp(text, Tz::UTC).map(drop)
}

fn time_zone(text: &str) -> Result<Tz, String> {
    Tz::from_str(text.trim())
        .map_err(|_| format!("unknown time zone {text:?}; use an IANA name such as Europe/Berlin"))
}

/// Reads a point in time: RFC 3339, or a local date and time in `zone`.
fn timestamp(text: &str, zone: Tz) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let local = [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
    .ok_or_else(|| format!("{text:?} is not a time; write RFC 3339 or YYYY-MM-DD HH:MM[:SS]"))?;
    // A time repeated when clocks go back is its first occurrence; one
    // skipped when they go forward does not exist.
    zone.from_local_datetime(&local)
        .earliest()
        .map(|at| at.with_timezone(&Utc))
        .ok_or_else(|| format!("{text} does not exist in {zone} (the clocks skip it)"))
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;

    fn config(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn step() -> StepRef {
        StepRef {
            run_id: uuid::Uuid::nil(),
            stage: 2,
        }
    }

    #[test]
    fn a_filter_stops_the_run_unless_its_condition_holds() {
        let filter = || {
            Filter::from_config(&config(json!({
                "condition": "trigger.amount > 100 and trigger.country in [\"DE\", \"FR\"]"
            })))
            .unwrap()
        };
        let passes = json!({"trigger": {"amount": 150, "country": "FR"}});
        assert_eq!(
            filter().decide(&passes, step()).unwrap().next,
            Next::Continue
        );
        let stops = json!({"trigger": {"amount": 150, "country": "US"}});
        assert_eq!(
            filter().decide(&stops, step()).unwrap(),
            Completed {
                output: json!({"passed": false}),
                next: Next::Stop("stopped by filter at step 2".into()),
            }
        );
        let error = filter()
            .decide(&json!({"trigger": {}}), step())
            .unwrap_err();
        assert!(matches!(error, ActionError::Permanent(_)), "{error:?}");
    }

    #[test]
    fn a_filter_condition_must_parse() {
        let error = Filter::from_config(&config(json!({"condition": "trigger.a >"}))).err();
        assert_eq!(error.unwrap().field, "condition");
    }

    #[test]
    fn a_delay_waits_for_a_while_or_until_a_time() {
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        let resume = |value: Value, context: Value| {
            Delay::from_config(&config(value))
                .unwrap()
                .resume_time(&context, now)
        };
        let wait = resume(json!({"for": "1h30m"}), json!({})).unwrap();
        assert_eq!(
            wait.next,
            Next::ResumeAt(now + chrono::Duration::minutes(90))
        );
        // Berlin is UTC+1 in winter, UTC+2 after the last Sunday of March.
        let until = json!({"until": "{{ trigger.at }}", "time_zone": "Europe/Berlin"});
        let summer = resume(
            until.clone(),
            json!({"trigger": {"at": "2026-03-29 12:00"}}),
        );
        let expected = Utc.with_ymd_and_hms(2026, 3, 29, 10, 0, 0).unwrap();
        assert_eq!(summer.unwrap().next, Next::ResumeAt(expected));
        let offset = resume(
            until.clone(),
            json!({"trigger": {"at": "2026-03-02T00:00:00Z"}}),
        );
        let expected = Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap();
        assert_eq!(offset.unwrap().next, Next::ResumeAt(expected));
        let past = resume(
            until.clone(),
            json!({"trigger": {"at": "2020-01-01 00:00"}}),
        );
        assert_eq!(past.unwrap().next, Next::ResumeAt(now));
        for at in ["2026-05-01 00:00", "2026-03-29 02:30", "soon"] {
            let refused = resume(until.clone(), json!({"trigger": {"at": at}}));
            assert!(refused.is_err(), "{at}");
        }
    }

    #[test]
    fn a_delay_is_checked_when_saved() {
        let refusals = [
            (json!({}), "for"),
            (json!({"for": "1s", "until": "2026-01-01 00:00"}), "for"),
            (json!({"for": "31d"}), "for"),
            (json!({"for": "soon"}), "for"),
            (json!({"until": "{{ x", "time_zone": "UTC"}), "until"),
            (
                json!({"until": "2026-01-01 00:00", "time_zone": "Mars/Base"}),
                "time_zone",
            ),
        ];
        for (value, field) in refusals {
            let error = Delay::from_config(&config(value.clone())).err();
            assert_eq!(
                error.map(|error| error.field),
                Some(field.to_owned()),
                "{value}"
            );
        }
    }
}
