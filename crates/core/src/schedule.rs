//! Schedule triggers: when a scheduled zap's ticks fall, and which of the
//! ticks due when the scheduler claims them start runs.
//!
//! A schedule is a cron expression read in an IANA time zone, or a fixed
//! interval. Daylight saving time goes as cron users expect: a wall clock
//! time a spring-forward skips does not tick, and one a fall-back repeats
//! ticks once, at its first occurrence.
//!
//! A tick is on time when claimed within its grace: half the time to the
//! tick after it, at most [`MAX_GRACE`]. Ticks claimed later were missed
//! (no process ran, or the zap was paused); [`MissedTicks`] says what
//! becomes of them.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, LocalResult, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};

/// The longest grace a tick gets.
pub const MAX_GRACE: Duration = Duration::from_secs(5);
/// The shortest interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest interval.
pub const MAX_INTERVAL: Duration = Duration::from_secs(366 * 86_400);
/// Ticks counted one by one when claiming; past them (a very long downtime
/// or pause) the count jumps to the latest due tick.
const MAX_ENUMERATED: u64 = 10_000;
/// Cron matches passed over (skipped or repeated wall clock times) before
/// giving up on a next tick.
const MAX_SKIPPED: usize = 10_000;

/// What starts a zap's runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// A delivery to the zap's webhook URL.
    Webhook,
    /// The ticks of a schedule.
    Schedule(Schedule),
}

impl Trigger {
    pub fn schedule(&self) -> Option<&Schedule> {
        match self {
            Self::Webhook => None,
            Self::Schedule(schedule) => Some(schedule),
        }
    }
}

/// A schedule as stored (JSON) and as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    #[serde(flatten)]
    pub every: Every,
    /// The IANA zone a cron expression is read in; empty for UTC. Kept,
    /// and ignored, with an interval.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub time_zone: String,
    #[serde(default)]
    pub missed_ticks: MissedTicks,
}

/// How often a schedule ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Every {
    /// Five fields (minute hour day-of-month month day-of-week), or six
    /// with seconds first.
    Cron(String),
    /// A fixed interval in milliseconds, counted from when the schedule
    /// was set.
    IntervalMs(u64),
}

/// What happens to ticks that passed without a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedTicks {
    /// Run none of them.
    #[default]
    Skip,
    /// Run once, for the latest of them.
    RunLatest,
}

impl MissedTicks {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunLatest => "run_latest",
        }
    }
}

/// A schedule refused, naming its field (`cron`, `interval`, `time_zone`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

impl ScheduleError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl Schedule {
    /// A cron schedule, checked.
    pub fn cron(
        expression: &str,
        time_zone: &str,
        missed_ticks: MissedTicks,
    ) -> Result<Self, ScheduleError> {
        Self {
            every: Every::Cron(expression.trim().to_owned()),
            time_zone: time_zone.to_owned(),
            missed_ticks,
        }
        .checked()
    }

    /// An interval schedule, checked.
    pub fn interval(
        interval: Duration,
        time_zone: &str,
        missed_ticks: MissedTicks,
    ) -> Result<Self, ScheduleError> {
        if interval < MIN_INTERVAL {
            return Err(ScheduleError::new("interval", "at least 1s"));
        }
        if interval > MAX_INTERVAL {
            return Err(ScheduleError::new("interval", "at most 366 days"));
        }
        Self {
            every: Every::IntervalMs(interval.as_millis() as u64),
            time_zone: time_zone.to_owned(),
            missed_ticks,
        }
        .checked()
    }

    /// This schedule if its ticks can be computed, with the reason if not.
    fn checked(self) -> Result<Self, ScheduleError> {
        let ticks = self.ticks()?;
        if ticks.next(Utc::now()).is_none() {
            return Err(ScheduleError::new(
                "cron",
                format!("{:?} never matches a time", self.expression()),
            ));
        }
        Ok(self)
    }

    fn expression(&self) -> &str {
        match &self.every {
            Every::Cron(expression) => expression,
            Every::IntervalMs(_) => "",
        }
    }

    /// The zone cron expressions are read in.
    fn zone(&self) -> Result<Tz, ScheduleError> {
        if self.time_zone.is_empty() {
            return Ok(Tz::UTC);
        }
        Tz::from_str(&self.time_zone).map_err(|_| {
            ScheduleError::new(
                "time_zone",
                format!(
                    "unknown time zone {:?}; use an IANA name such as Europe/Berlin or UTC",
                    self.time_zone
                ),
            )
        })
    }

    /// The schedule's ticks.
    pub fn ticks(&self) -> Result<Ticks, ScheduleError> {
        let zone = self.zone()?;
        match &self.every {
            Every::Cron(expression) => {
                let cron = CronParser::builder()
                    .seconds(Seconds::Optional)
                    .year(Year::Disallowed)
                    .build()
                    .parse(expression)
                    .map_err(|error| {
                        ScheduleError::new(
                            "cron",
                            format!(
                                "{expression:?} does not parse ({error}); write five fields \
                                 (minute hour day-of-month month day-of-week) or six with \
                                 seconds first, e.g. \"*/5 * * * *\""
                            ),
                        )
                    })?;
                Ok(Ticks::Cron {
                    cron: Box::new(cron),
                    zone,
                })
            }
            Every::IntervalMs(millis) => {
                let interval = TimeDelta::milliseconds(*millis as i64);
                if interval < TimeDelta::from_std(MIN_INTERVAL).unwrap_or(TimeDelta::MAX) {
                    return Err(ScheduleError::new("interval", "at least 1s"));
                }
                Ok(Ticks::Interval(interval))
            }
        }
    }
}

/// A schedule ready to compute ticks.
#[derive(Debug, Clone)]
pub enum Ticks {
    Cron { cron: Box<Cron>, zone: Tz },
    Interval(TimeDelta),
}

/// The ticks due at a claim: those to run now and where the schedule
/// goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickPlan {
    /// The ticks to start a run for, oldest first.
    pub run: Vec<DateTime<Utc>>,
    /// How many due ticks were missed (a lower bound after a very long gap).
    pub missed: u64,
    /// The first tick after the claim; none when the schedule has no more.
    pub next: Option<DateTime<Utc>>,
}

impl Ticks {
    /// The tick after `time`. For an interval, `time` is a tick (or the
    /// moment the schedule was set).
    pub fn next(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Interval(interval) => time.checked_add_signed(*interval),
            Self::Cron { cron, zone } => {
                let mut from = time.with_timezone(zone);
                for _ in 0..MAX_SKIPPED {
                    let found = cron.find_next_occurrence(&from, false).ok()?;
                    if runs_at(cron, zone, &found) {
                        return found.with_timezone(&Utc).with_nanosecond(0);
                    }
                    from = found;
                }
                None
            }
        }
    }

    /// The first tick of a schedule set at `now`: for an interval, one
    /// interval later.
    pub fn first(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Times are kept to the microsecond.
        let now = now.with_nanosecond(now.nanosecond() / 1000 * 1000)?;
        self.next(now)
    }

    /// The latest tick at or before `now`, counting from the tick `from`
    /// (not before it).
    fn latest(&self, from: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Interval(interval) => {
                let steps = (now - from).num_microseconds()? / interval.num_microseconds()?;
                from.checked_add_signed(*interval * i32::try_from(steps).ok()?)
            }
            Self::Cron { cron, zone } => {
                let mut to = now.with_timezone(zone);
                let mut inclusive = true;
                for _ in 0..MAX_SKIPPED {
                    let found = cron.find_previous_occurrence(&to, inclusive).ok()?;
                    if found.with_timezone(&Utc) < from {
                        return None;
                    }
                    if runs_at(cron, zone, &found) {
                        return Some(found.with_timezone(&Utc));
                    }
                    (to, inclusive) = (found, false);
                }
                None
            }
        }
    }

    /// What a claim at `now` does with the ticks from `next_tick` on:
    /// each due tick within its grace runs (at most one can be); the
    /// others were missed, and `policy` says whether the latest of them
    /// runs too.
    pub fn plan(
        &self,
        next_tick: DateTime<Utc>,
        now: DateTime<Utc>,
        policy: MissedTicks,
    ) -> TickPlan {
        // The latest two due ticks, each with the tick after it.
        let mut latest: Vec<(DateTime<Utc>, Option<DateTime<Utc>>)> = Vec::with_capacity(2);
        let mut due = 0u64;
        let mut tick = Some(next_tick);
        while let Some(mut current) = tick.filter(|tick| *tick <= now) {
            if due == MAX_ENUMERATED {
                // Skip to the latest due tick: the ones between are missed.
                let Some(last) = self.latest(current, now).filter(|last| *last > current) else {
                    tick = self.next(now);
                    break;
                };
                latest.clear();
                if let Some(before) = self.latest(current, last - TimeDelta::microseconds(1)) {
                    latest.push((before, Some(last)));
                }
                due += 1;
                current = last;
            }
            let following = self.next(current);
            if latest.len() == 2 {
                latest.remove(0);
            }
            latest.push((current, following));
            due += 1;
            tick = following;
        }
        let mut plan = TickPlan {
            run: Vec::new(),
            missed: due,
            next: tick,
        };
        let Some(&(last, after_last)) = latest.last() else {
            return plan;
        };
        let on_time = now <= last + grace(last, after_last);
        let latest_missed = match on_time {
            true => {
                plan.missed -= 1;
                latest.len().checked_sub(2).map(|index| latest[index].0)
            }
            false => Some(last),
        };
        if policy == MissedTicks::RunLatest
            && let Some(missed) = latest_missed
        {
            plan.run.push(missed);
        }
        if on_time {
            plan.run.push(last);
        }
        plan
    }
}

/// How late a tick may be claimed and still count as on time.
fn grace(tick: DateTime<Utc>, next: Option<DateTime<Utc>>) -> TimeDelta {
    let max = TimeDelta::from_std(MAX_GRACE).unwrap_or_default();
    match next {
        Some(next) => ((next - tick) / 2).min(max),
        None => max,
    }
}

/// Whether a cron match really ticks: its wall clock time must be what the
/// expression names (not a time carried past a spring-forward gap), and a
/// wall clock time repeated by a fall-back ticks at its first occurrence
/// only.
fn runs_at(cron: &Cron, zone: &Tz, found: &DateTime<Tz>) -> bool {
    if !cron.is_time_matching(found).unwrap_or(false) {
        return false;
    }
    match zone.from_local_datetime(&found.naive_local()) {
        LocalResult::Ambiguous(earlier, _) => earlier == *found,
        LocalResult::Single(_) => true,
        LocalResult::None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn ticks_from(schedule: &Schedule, from: &str, count: usize) -> Vec<String> {
        let ticks = schedule.ticks().unwrap();
        let mut time = utc(from);
        (0..count)
            .map(|_| {
                time = ticks.next(time).unwrap();
                time.to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn five_and_six_fields_parse_and_others_do_not() {
        let ticks = |expression| {
            ticks_from(
                &Schedule::cron(expression, "", MissedTicks::Skip).unwrap(),
                "2025-01-01T00:00:00Z",
                2,
            )
        };
        assert_eq!(
            ticks("*/5 * * * *"),
            ["2025-01-01T00:05:00+00:00", "2025-01-01T00:10:00+00:00"]
        );
        assert_eq!(
            ticks("*/10 * * * * *"),
            ["2025-01-01T00:00:10+00:00", "2025-01-01T00:00:20+00:00"]
        );
        assert_eq!(
            ticks("@hourly"),
            ["2025-01-01T01:00:00+00:00", "2025-01-01T02:00:00+00:00"]
        );
        assert_eq!(
            ticks("0 9 * * MON-FRI"),
            ["2025-01-01T09:00:00+00:00", "2025-01-02T09:00:00+00:00"]
        );
        for bad in ["61 * * * *", "* * *", "0 0 1 1 * 2030", "", "every day"] {
            let error = Schedule::cron(bad, "", MissedTicks::Skip).unwrap_err();
            assert_eq!(error.field, "cron", "{bad}: {error}");
        }
        let never = Schedule::cron("0 0 30 2 *", "", MissedTicks::Skip).unwrap_err();
        assert!(never.message.contains("never"), "{never}");
    }

    #[test]
    fn zones_and_intervals_are_checked() {
        let error = Schedule::cron("* * * * *", "Mars/Olympus", MissedTicks::Skip).unwrap_err();
        assert_eq!(error.field, "time_zone");
        assert!(error.message.contains("Mars/Olympus"), "{error}");
        let error =
            Schedule::interval(Duration::from_millis(999), "", MissedTicks::Skip).unwrap_err();
        assert_eq!(
            (error.field, error.message.as_str()),
            ("interval", "at least 1s")
        );
        let ok = Schedule::interval(Duration::from_secs(1), "Europe/Berlin", MissedTicks::Skip);
        assert_eq!(ok.unwrap().every, Every::IntervalMs(1000));
    }

    #[test]
    fn a_cron_reads_in_its_zone() {
        let schedule = Schedule::cron("0 9 * * *", "Europe/Berlin", MissedTicks::Skip).unwrap();
        assert_eq!(
            ticks_from(&schedule, "2025-01-01T12:00:00Z", 1),
            ["2025-01-02T08:00:00+00:00"]
        );
        assert_eq!(
            ticks_from(&schedule, "2025-07-01T12:00:00Z", 1),
            ["2025-07-02T07:00:00+00:00"]
        );
    }

    #[test]
    fn a_time_skipped_by_spring_forward_does_not_tick() {
        // Berlin skips 02:00-03:00 on 2025-03-30.
        let schedule = Schedule::cron("30 2 * * *", "Europe/Berlin", MissedTicks::Skip).unwrap();
        assert_eq!(
            ticks_from(&schedule, "2025-03-29T00:00:00Z", 2),
            ["2025-03-29T01:30:00+00:00", "2025-03-31T00:30:00+00:00"]
        );
        let half_hourly =
            Schedule::cron("*/30 * * * *", "Europe/Berlin", MissedTicks::Skip).unwrap();
        assert_eq!(
            ticks_from(&half_hourly, "2025-03-30T00:15:00Z", 2),
            // 01:30 CET, then 03:00 CEST.
            ["2025-03-30T00:30:00+00:00", "2025-03-30T01:00:00+00:00"]
        );
    }

    #[test]
    fn a_time_repeated_by_fall_back_ticks_once() {
        // Berlin repeats 02:00-03:00 on 2025-10-26 (CEST, then CET).
        let schedule = Schedule::cron("30 2 * * *", "Europe/Berlin", MissedTicks::Skip).unwrap();
        assert_eq!(
            ticks_from(&schedule, "2025-10-25T12:00:00Z", 2),
            ["2025-10-26T00:30:00+00:00", "2025-10-27T01:30:00+00:00"]
        );
        let half_hourly =
            Schedule::cron("*/30 * * * *", "Europe/Berlin", MissedTicks::Skip).unwrap();
        assert_eq!(
            ticks_from(&half_hourly, "2025-10-25T23:45:00Z", 4),
            [
                "2025-10-26T00:00:00+00:00", // 02:00 CEST
                "2025-10-26T00:30:00+00:00", // 02:30 CEST
                "2025-10-26T02:00:00+00:00", // 03:00 CET: 02:00 and 02:30 CET were
                "2025-10-26T02:30:00+00:00", // ticked already, as CEST
            ]
        );
    }

    #[test]
    fn a_schedule_is_stored_as_json() {
        let schedule =
            Schedule::cron("0 * * * *", "Europe/Berlin", MissedTicks::RunLatest).unwrap();
        let json = serde_json::to_value(&schedule).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cron": "0 * * * *", "time_zone": "Europe/Berlin", "missed_ticks": "run_latest"})
        );
        assert_eq!(serde_json::from_value::<Schedule>(json).unwrap(), schedule);
        let interval = Schedule::interval(Duration::from_secs(30), "", MissedTicks::Skip).unwrap();
        let json = serde_json::to_value(&interval).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"interval_ms": 30000, "missed_ticks": "skip"})
        );
        assert_eq!(serde_json::from_value::<Schedule>(json).unwrap(), interval);
    }

    fn every_second() -> Ticks {
        Schedule::interval(Duration::from_secs(1), "", MissedTicks::Skip)
            .unwrap()
            .ticks()
            .unwrap()
    }

    #[test]
    fn a_tick_claimed_in_its_grace_runs() {
        let ticks = every_second();
        let tick = utc("2025-01-01T00:00:10Z");
        let plan = ticks.plan(tick, utc("2025-01-01T00:00:10.4Z"), MissedTicks::Skip);
        assert_eq!(
            plan,
            TickPlan {
                run: vec![tick],
                missed: 0,
                next: Some(utc("2025-01-01T00:00:11Z")),
            }
        );
        let early = ticks.plan(tick, utc("2025-01-01T00:00:09.9Z"), MissedTicks::Skip);
        assert_eq!((early.run.len(), early.next), (0, Some(tick)));
    }

    #[test]
    fn missed_ticks_follow_the_policy() {
        let ticks = every_second();
        let from = utc("2025-01-01T00:00:10Z");
        // Down from 10 s to 15.2 s: 10..14 missed, 15 on time.
        let now = utc("2025-01-01T00:00:15.2Z");
        let skip = ticks.plan(from, now, MissedTicks::Skip);
        assert_eq!(skip.run, [utc("2025-01-01T00:00:15Z")]);
        assert_eq!(skip.missed, 5);
        assert_eq!(skip.next, Some(utc("2025-01-01T00:00:16Z")));
        let latest = ticks.plan(from, now, MissedTicks::RunLatest);
        assert_eq!(
            latest.run,
            [utc("2025-01-01T00:00:14Z"), utc("2025-01-01T00:00:15Z")]
        );
        // At 15.7 s even tick 15 is past its grace (0.5 s).
        let late = utc("2025-01-01T00:00:15.7Z");
        assert!(ticks.plan(from, late, MissedTicks::Skip).run.is_empty());
        assert_eq!(
            ticks.plan(from, late, MissedTicks::RunLatest).run,
            [utc("2025-01-01T00:00:15Z")]
        );
        // The grace is at most 5 s.
        let hourly = Schedule::cron("0 * * * *", "", MissedTicks::Skip)
            .unwrap()
            .ticks()
            .unwrap();
        let tick = utc("2025-01-01T01:00:00Z");
        assert_eq!(
            hourly
                .plan(tick, utc("2025-01-01T01:00:04.9Z"), MissedTicks::Skip)
                .run,
            [tick]
        );
        assert!(
            hourly
                .plan(tick, utc("2025-01-01T01:00:05.1Z"), MissedTicks::Skip)
                .run
                .is_empty()
        );
    }

    #[test]
    fn a_long_gap_jumps_to_the_latest_tick() {
        let ticks = every_second();
        let from = utc("2025-01-01T00:00:00Z");
        let now = utc("2025-01-08T00:00:00.2Z");
        let plan = ticks.plan(from, now, MissedTicks::RunLatest);
        assert_eq!(
            plan.run,
            [utc("2025-01-07T23:59:59Z"), utc("2025-01-08T00:00:00Z")]
        );
        assert_eq!(plan.next, Some(utc("2025-01-08T00:00:01Z")));
        let cron = Schedule::cron("* * * * * *", "Europe/Berlin", MissedTicks::Skip)
            .unwrap()
            .ticks()
            .unwrap();
        let plan = cron.plan(from, now, MissedTicks::Skip);
        assert_eq!(plan.run, [utc("2025-01-08T00:00:00Z")]);
        assert_eq!(plan.next, Some(utc("2025-01-08T00:00:01Z")));
    }
}
