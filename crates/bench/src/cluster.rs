//! A deployment as processes of the `zapflow` binary: one-off commands
//! (migrate, create-user), then `zapflow all` (embedded, PostgreSQL-only) or
//! one process per role (distributed).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use zapflow_testkit::free_address;

/// The deployments zapflow runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Deployment {
    /// `zapflow all` on an SQLite file, nothing else.
    Embedded,
    /// `zapflow all` on PostgreSQL, no broker.
    Postgres,
    /// PostgreSQL and Kafka, one process per role.
    Distributed,
}

impl Deployment {
    /// The processes to start, in start order: the API first, since the
    /// gateway forwards to it.
    pub fn roles(self) -> &'static [&'static str] {
        match self {
            Self::Embedded | Self::Postgres => &["all"],
            Self::Distributed => &["api", "gateway", "processor", "worker"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Postgres => "postgres",
            Self::Distributed => "distributed",
        }
    }
}

/// How long the roles get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a role gets to drain after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Linux reports process CPU time in ticks of USER_HZ, 100 on every
/// architecture it runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// What every process of the deployment is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub binary: PathBuf,
    pub deployment: Deployment,
    /// PostgreSQL, for the postgres and distributed deployments.
    pub database_url: Option<String>,
    pub kafka_brokers: String,
    pub smtp_url: String,
    pub events_topic: String,
    pub dead_letter_topic: String,
    pub consumer_group: String,
    /// Logs of every process, and the roles' data directory.
    pub work_dir: PathBuf,
}

/// Memory and CPU of one process, read from `/proc`.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// How a role ended after SIGTERM.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub role: &'static str,
    pub took: Duration,
    /// `None` when it had to be killed.
    pub status: Option<ExitStatus>,
}

struct RoleProcess {
    role: &'static str,
    child: Child,
    log: PathBuf,
}

/// The running roles; any still running when this is dropped are killed.
pub struct Cluster {
    pub api_key: String,
    pub grpc_address: SocketAddr,
    pub http_address: SocketAddr,
    roles: Vec<RoleProcess>,
}

impl Cluster {
    /// Migrates, creates the `bench` user, starts every role and waits until
    /// the API reports SERVING and the gateway answers `/healthz`.
    pub async fn start(settings: &Settings) -> Result<Self> {
        let grpc_address = free_address();
        let http_address = free_address();
        let env = Environment {
            settings: settings.clone(),
            grpc_address,
            ingest_address: free_address(),
            http_address,
        };

        env.run_once(&["migrate"])
            .await
            .context("zapflow migrate")?;
        let stdout = env
            .run_once(&["create-user", "bench"])
            .await
            .context("zapflow create-user")?;
        let api_key = stdout
            .lines()
            .map(str::trim)
            .rfind(|line| !line.is_empty())
            .context("zapflow create-user printed no API key")?
            .to_owned();

        let mut cluster = Self {
            api_key,
            grpc_address,
            http_address,
            roles: Vec::new(),
        };
        for &role in settings.deployment.roles() {
            let log = settings.work_dir.join(format!("{role}.log"));
            let child = env
                .command(&[role], &log)?
                .spawn()
                .with_context(|| format!("starting zapflow {role}"))?;
            cluster.roles.push(RoleProcess { role, child, log });
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        cluster.wait_for_api(deadline).await?;
        cluster.wait_for_gateway(deadline).await?;
        cluster.check_alive()?;
        Ok(cluster)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_address)
    }

    /// Fails, with the end of its log, if a role has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for process in &mut self.roles {
            if let Some(status) = process.child.try_wait()? {
                bail!(
                    "zapflow {} exited ({status}); the end of {}:\n{}",
                    process.role,
                    process.log.display(),
                    log_tail(&process.log, 20)
                );
            }
        }
        Ok(())
    }

    /// Memory and CPU of each role process, in start order.
    pub fn usage(&self) -> Vec<(&'static str, Usage)> {
        self.roles
            .iter()
            .map(|process| (process.role, usage(&process.child.id().to_string())))
            .collect()
    }

    /// Sends SIGTERM to every role, then waits for each to drain; one that
    /// takes longer than `STOP_TIMEOUT` is killed.
    pub async fn stop(mut self) -> Vec<Stopped> {
        let asked = Instant::now();
        for process in &self.roles {
            terminate(process.child.id());
        }
        let deadline = asked + STOP_TIMEOUT;
        let mut ended: Vec<Option<(Duration, Option<ExitStatus>)>> = vec![None; self.roles.len()];
        while ended.iter().any(Option::is_none) {
            let overdue = Instant::now() >= deadline;
            for (process, end) in self.roles.iter_mut().zip(&mut ended) {
                if end.is_some() {
                    continue;
                }
                match process.child.try_wait() {
                    Ok(Some(status)) => *end = Some((asked.elapsed(), Some(status))),
                    Ok(None) if !overdue => {}
                    Ok(None) | Err(_) => {
                        let _ = process.child.kill();
                        let _ = process.child.wait();
                        *end = Some((asked.elapsed(), None));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stopped = self
            .roles
            .iter()
            .zip(ended)
            .filter_map(|(process, end)| {
                let (took, status) = end?;
                Some(Stopped {
                    role: process.role,
                    took,
                    status,
                })
            })
            .collect();
        self.roles.clear();
        stopped
    }

    async fn wait_for_api(&mut self, deadline: Instant) -> Result<()> {
        let url = self.grpc_url();
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            self.check_alive()?;
            match health(&url).await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(status) => last = format!("health is {status:?}"),
                Err(error) => last = format!("{error:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the API at {url} did not report SERVING within {READY_TIMEOUT:?} ({last})")
    }

    async fn wait_for_gateway(&mut self, deadline: Instant) -> Result<()> {
        let url = format!("http://{}/healthz", self.http_address);
        let client = reqwest::Client::builder().no_proxy().build()?;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            self.check_alive()?;
            match client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => last = format!("status {}", response.status()),
                Err(error) => last = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the gateway at {url} did not answer within {READY_TIMEOUT:?} ({last})")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for process in &mut self.roles {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

/// The configuration every process gets, as `ZAPFLOW_*` variables.
struct Environment {
    settings: Settings,
    grpc_address: SocketAddr,
    ingest_address: SocketAddr,
    http_address: SocketAddr,
}

impl Environment {
    /// `zapflow <args>` with only this deployment's configuration (inherited
    /// `ZAPFLOW_*` variables are dropped), output appended to `log`.
    fn command(&self, args: &[&str], log: &Path) -> Result<Command> {
        let settings = &self.settings;
        let mut command = Command::new(&settings.binary);
        command.args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ZAPFLOW_") {
                command.env_remove(name);
            }
        }
        if let Some(database_url) = &settings.database_url {
            command.env("ZAPFLOW_DATABASE_URL", database_url);
        }
        if settings.deployment == Deployment::Distributed {
            command
                .env("ZAPFLOW_KAFKA_BROKERS", &settings.kafka_brokers)
                .env("ZAPFLOW_EVENTS_TOPIC", &settings.events_topic)
                .env("ZAPFLOW_DEAD_LETTER_TOPIC", &settings.dead_letter_topic)
                .env("ZAPFLOW_CONSUMER_GROUP", &settings.consumer_group);
        }
        command
            .env("ZAPFLOW_GRPC_LISTEN", self.grpc_address.to_string())
            .env("ZAPFLOW_ADMIN_LISTEN", "127.0.0.1:0")
            .env("ZAPFLOW_HTTP_LISTEN", self.http_address.to_string())
            .env("ZAPFLOW_INGEST_LISTEN", self.ingest_address.to_string())
            .env(
                "ZAPFLOW_INGEST_URL",
                format!("http://{}", self.ingest_address),
            )
            .env(
                "ZAPFLOW_PUBLIC_URL",
                format!("http://{}", self.http_address),
            )
            .env("ZAPFLOW_SMTP_URL", &settings.smtp_url)
            // The gateway's abuse limits would cap the load at their rate
            // rather than at what the deployment can take.
            .env("ZAPFLOW_ZAP_RATE_LIMIT", "0")
            .env("ZAPFLOW_IP_RATE_LIMIT", "0")
            .env("ZAPFLOW_DATA_DIR", settings.work_dir.join("data"));
        let log_file = || {
            File::options()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("opening {}", log.display()))
        };
        command
            .stdin(Stdio::null())
            .stdout(log_file()?)
            .stderr(log_file()?);
        Ok(command)
    }

    /// Runs a one-off command to its end and returns what it printed on
    /// stdout (its log goes to `commands.log`).
    async fn run_once(&self, args: &[&str]) -> Result<String> {
        let log = self.settings.work_dir.join("commands.log");
        let mut command = self.command(args, &log)?;
        command.stdout(Stdio::piped());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await?
            .with_context(|| format!("running {}", self.settings.binary.display()))?;
        if !output.status.success() {
            bail!(
                "exited with {}; the end of {}:\n{}",
                output.status,
                log.display(),
                log_tail(&log, 20)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

async fn health(url: &str) -> Result<ServingStatus> {
    let channel = Channel::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        client.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .context("health check timed out")??;
    Ok(reply.into_inner().status())
}

/// SIGTERM through kill(1): the workspace forbids the `unsafe` a direct
/// `kill(2)` call needs.
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `/proc/<pid>` figures; `pid` may be `self`.
pub fn usage(pid: &str) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
    };
    // Fields 14 and 15: user and system time, all threads.
    let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, fields) = parse_stat(&stat)?;
            let ticks: u64 =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / TICKS_PER_SECOND)
        });
    Usage {
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        cpu_seconds,
    }
}

/// A `/proc/<pid>/stat` line's command name and the fields after it, the
/// first of which is field 3 (the state). The name may hold spaces and
/// parentheses, so it ends at the last closing parenthesis.
fn parse_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    let (command, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
    Some((command, rest.split_whitespace().collect()))
}

/// CPU time used so far outside the roles: by the database server, the
/// broker and the whole machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuClock {
    /// Every `postgres` process, with the backends that have exited.
    pub postgres_seconds: Option<f64>,
    /// Every `tansu` process.
    pub broker_seconds: Option<f64>,
    /// Every process of the machine, from `/proc/stat`.
    pub machine_seconds: Option<f64>,
    /// Time the hypervisor gave the machine's CPUs to other guests (steal):
    /// on a shared host, the figures measured meanwhile drop with it.
    pub stolen_seconds: Option<f64>,
}

impl CpuClock {
    pub fn read() -> Self {
        let machine = machine_cpu_seconds();
        Self {
            postgres_seconds: cpu_seconds_of("postgres"),
            broker_seconds: cpu_seconds_of("tansu"),
            machine_seconds: machine.map(|machine| machine.busy),
            stolen_seconds: machine.map(|machine| machine.stolen),
        }
    }

    /// The CPU time used between `start` and this reading.
    pub fn since(self, start: Self) -> Self {
        let spent = |end: Option<f64>, start: Option<f64>| Some(end? - start?);
        Self {
            postgres_seconds: spent(self.postgres_seconds, start.postgres_seconds),
            broker_seconds: spent(self.broker_seconds, start.broker_seconds),
            machine_seconds: spent(self.machine_seconds, start.machine_seconds),
            stolen_seconds: spent(self.stolen_seconds, start.stolen_seconds),
        }
    }
}

/// User and system time of every process whose command name is `name`,
/// with that of their children waited for: a PostgreSQL backend's time
/// moves to the postmaster when the backend exits. `None` when no process
/// has that name.
fn cpu_seconds_of(name: &str) -> Option<f64> {
    let mut ticks = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((command, fields)) = parse_stat(&stat) else {
            continue;
        };
        if command != name {
            continue;
        }
        // Fields 14 to 17: utime, stime, cutime, cstime.
        let used: u64 = fields
            .get(11..15)
            .into_iter()
            .flatten()
            .filter_map(|field| field.parse::<u64>().ok())
            .sum();
        *ticks.get_or_insert(0) += used;
    }
    ticks.map(|ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// Time all CPUs of the machine spent, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy)]
struct MachineTime {
    /// Running this machine's work: user, nice, system, irq and softirq.
    busy: f64,
    /// Waiting for the hypervisor, which ran another guest (steal).
    stolen: f64,
}

fn machine_cpu_seconds() -> Option<MachineTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .filter_map(|&index| fields.get(index))
        .sum();
    let stolen = fields.get(7).copied().unwrap_or(0);
    Some(MachineTime {
        busy: busy as f64 / TICKS_PER_SECOND,
        stolen: stolen as f64 / TICKS_PER_SECOND,
    })
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_per_command_name_and_for_the_machine() {
        let name = std::fs::read_to_string("/proc/self/comm").unwrap();
        let name = name.trim();
        let start = CpuClock::read();
        let own_at_start = cpu_seconds_of(name).expect("this process is found by its name");
        // Busy until this process's CPU time and the machine's move on:
        // both count in ticks, and the machine's total may lag the
        // process's own.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut own, mut machine) = (own_at_start, 0.0);
        while (own <= own_at_start || machine <= 0.0) && Instant::now() < deadline {
            for spin in 0..100_000u64 {
                std::hint::black_box(spin);
            }
            own = cpu_seconds_of(name).unwrap();
            let spent = CpuClock::read().since(start);
            machine = spent.machine_seconds.expect("/proc/stat is read");
        }
        let stolen = CpuClock::read().since(start).stolen_seconds;
        assert!(stolen.is_some_and(|stolen| stolen >= 0.0), "{stolen:?}");
        assert!(own > own_at_start, "{own_at_start} s, then {own} s");
        assert!(machine > 0.0, "{machine}");
        assert_eq!(cpu_seconds_of("no process is called this"), None);
    }
}
