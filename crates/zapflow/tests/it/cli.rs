//! The command line as people use it: the real `zapflow` binary as the
//! client of a real server.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::process::Command;
use zapflow_testkit::{Stack, StackOptions, eventually, unique};

use crate::support::{Deployment, WAIT, new_user, stack_of};

on_outbox_deployments!(
    apply_creates_then_leaves_alone_then_updates_then_prunes,
    a_zap_read_as_yaml_applies_unchanged,
    send_signs_what_a_signed_zap_accepts,
    runs_are_listed_shown_and_replayed,
);

/// The `zapflow` binary, run in a directory of its own with only the
/// environment given here.
pub struct Cli {
    pub dir: PathBuf,
    env: Vec<(String, String)>,
}

/// How a command ended.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cli {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("zapflow-cli"));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            env: vec![
                (
                    "XDG_CONFIG_HOME".into(),
                    dir.join("config").display().to_string(),
                ),
                ("NO_COLOR".into(), "1".into()),
                ("RUST_BACKTRACE".into(), "0".into()),
            ],
            dir,
        }
    }

    /// A client of `stack` with `key`.
    pub fn of(stack: &Stack, key: &str) -> Self {
        Self::new()
            .with("ZAPFLOW_SERVER", &stack.grpc_url())
            .with("ZAPFLOW_API_KEY", key)
    }

    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_zapflow"));
        command
            .args(args)
            .current_dir(&self.dir)
            .env_clear()
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    pub async fn run(&self, args: &[&str]) -> Ran {
        let output = self.command(args).output().await.expect("running zapflow");
        Ran {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed; returns what it printed.
    pub async fn ok(&self, args: &[&str]) -> String {
        let ran = self.run(args).await;
        assert_eq!(ran.code, 0, "zapflow {args:?} failed: {ran:?}");
        ran.stdout
    }

    pub async fn json(&self, args: &[&str]) -> Value {
        let stdout = self.ok(args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

pub fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn email_zap(name: &str, subject: &str) -> String {
    format!(
        "name: {name}\nactions:\n  - type: email\n    config:\n      to: \"{{{{ trigger.to }}}}\"\n      subject: {subject}\n      body: hello\n"
    )
}

/// The lines of an apply's output, less the webhook URLs and secrets.
fn changes(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|line| !line.starts_with("  "))
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

async fn apply_creates_then_leaves_alone_then_updates_then_prunes(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let cli = Cli::of(&stack, &new_user(&stack, "ada").await);
    cli.write("zaps/orders.yaml", &email_zap("Orders", "order"));
    cli.write(
        "zaps/invoices.json",
        r#"{"name": "Invoices", "actions": [{"type": "email", "config": {"to": "{{ trigger.to }}", "subject": "invoice", "body": "hi"}}]}"#,
    );
    let dir = cli.dir.join("zaps");

    let plan = cli.ok(&["apply", "-f", path(&dir), "--dry-run"]).await;
    assert_eq!(
        changes(&plan),
        ["would create Invoices", "would create Orders"]
    );
    let listed = cli.json(&["zaps", "list", "-o", "json"]).await;
    assert_eq!(listed, Value::Array(vec![]), "a dry run changes nothing");

    let first = cli.ok(&["apply", "-f", path(&dir)]).await;
    assert_eq!(changes(&first), ["created Invoices", "created Orders"]);
    assert_eq!(
        first
            .matches(&format!(
                "webhook URL     {}/hooks/catch/",
                stack.http_url()
            ))
            .count(),
        2,
        "each new zap's URL, once: {first}"
    );

    let again = cli.ok(&["apply", "-f", path(&dir)]).await;
    assert_eq!(changes(&again), ["unchanged Invoices", "unchanged Orders"]);
    assert!(!again.contains("hooks/catch"), "{again}");

    cli.write("zaps/orders.yaml", &email_zap("Orders", "order received"));
    let edited = cli.ok(&["apply", "-f", path(&dir)]).await;
    assert_eq!(changes(&edited), ["unchanged Invoices", "updated Orders"]);
    let orders = cli.json(&["zaps", "get", "Orders", "-o", "json"]).await;
    assert_eq!(orders["actions"][0]["config"]["subject"], "order received");

    std::fs::remove_file(cli.dir.join("zaps/invoices.json")).unwrap();
    let plan = cli
        .ok(&["apply", "-f", path(&dir), "--prune", "--dry-run"])
        .await;
    assert_eq!(
        changes(&plan),
        ["unchanged Orders", "would delete Invoices"]
    );
    let pruned = cli.ok(&["apply", "-f", path(&dir), "--prune"]).await;
    assert_eq!(changes(&pruned), ["unchanged Orders", "deleted Invoices"]);
    let listed = cli.json(&["zaps", "list", "-o", "json"]).await;
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|zap| zap["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Orders"]);

    // A file the format refuses changes nothing and says where.
    cli.write("bad/typo.yaml", "name: Typo\nactoins: []\n");
    let bad = cli.run(&["apply", "-f", path(&cli.dir.join("bad"))]).await;
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(
        bad.stderr.contains("typo.yaml") && bad.stderr.contains("actoins"),
        "{bad:?}"
    );
    stack.stop().await;
}

async fn a_zap_read_as_yaml_applies_unchanged(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let cli = Cli::of(&stack, &new_user(&stack, "ada").await);
    let file = cli.write(
        "notify.yaml",
        "name: Notify\n\
         trigger:\n  type: webhook\n  require_signature: true\n\
         actions:\n\
         \x20 - type: http\n\
         \x20   config:\n\
         \x20     method: POST\n\
         \x20     url: https://example.com/hook\n\
         \x20     timeout_seconds: 5\n\
         \x20     headers: {x-team: ops}\n\
         \x20   retry: {max_attempts: 3, initial_delay: 120s, multiplier: 1.5, max_delay: 1h}\n\
         \x20 - type: email\n\
         \x20   config: {to: ops@example.com, subject: \"{{ steps[0].status }}\", body: done}\n",
    );
    let created = cli.ok(&["apply", "-f", path(&file)]).await;
    assert_eq!(changes(&created), ["created Notify"]);
    assert!(created.contains("signing secret  whsec_"), "{created}");

    let yaml = cli.ok(&["zaps", "get", "Notify", "-o", "yaml"]).await;
    assert!(yaml.contains("initial_delay: 2m"), "{yaml}");
    assert!(yaml.contains("timeout_seconds: 5\n"), "{yaml}");
    let round_trip = cli.write("round-trip.yaml", &yaml);
    let again = cli.ok(&["apply", "-f", path(&round_trip)]).await;
    assert_eq!(changes(&again), ["unchanged Notify"]);
    assert_eq!(cli.ok(&["zaps", "get", "Notify", "-o", "yaml"]).await, yaml);

    // JSON reads back the same way.
    let json = cli.ok(&["zaps", "get", "Notify", "-o", "json"]).await;
    let json_file = cli.write("round-trip.json", &json);
    let again = cli.ok(&["apply", "-f", path(&json_file)]).await;
    assert_eq!(changes(&again), ["unchanged Notify"]);
    stack.stop().await;
}

async fn send_signs_what_a_signed_zap_accepts(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let cli = Cli::of(&stack, &new_user(&stack, "ada").await);
    let file = cli.write(
        "signed.yaml",
        &email_zap("Signed", "hi").replace(
            "actions:",
            "trigger:\n  type: webhook\n  require_signature: true\nactions:",
        ),
    );
    let created = cli.ok(&["apply", "-f", path(&file)]).await;
    let field = |label: &str| {
        created
            .lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label} in {created}"))
            .trim()
            .to_owned()
    };
    let (url, secret) = (field("webhook URL"), field("signing secret"));
    let payload = cli.write("payload.json", r#"{"to": "grace@example.com"}"#);
    let data = format!("@{}", path(&payload));

    let unsigned = cli.run(&["send", &url, "--data", &data]).await;
    assert_eq!(unsigned.code, 1, "{unsigned:?}");
    assert!(unsigned.stderr.contains("401"), "{unsigned:?}");
    let wrong = cli
        .run(&[
            "send",
            &url,
            "--data",
            &data,
            "--secret",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ])
        .await;
    assert_eq!(wrong.code, 1, "{wrong:?}");

    let answer: Value = serde_json::from_str(
        &cli.ok(&["send", &url, "--data", &data, "--secret", &secret])
            .await,
    )
    .unwrap();
    let run_id = answer["run_id"].as_str().expect("a run id").to_owned();
    let run = eventually("the signed delivery's run to succeed", WAIT, || async {
        let run = cli.json(&["runs", "get", &run_id, "-o", "json"]).await;
        (run["status"] == "succeeded").then_some(run)
    })
    .await;
    assert_eq!(run["zap_name"], "Signed");
    assert_eq!(run["steps"][0]["status"], "succeeded");
    stack.stop().await;
}

async fn runs_are_listed_shown_and_replayed(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let cli = Cli::of(&stack, &new_user(&stack, "ada").await);
    let created = cli
        .ok(&[
            "apply",
            "-f",
            path(&cli.write("mail.yaml", &email_zap("Mail", "hi"))),
        ])
        .await;
    let url = webhook_url(&created);
    let good = cli
        .json(&["send", &url, "--data", r#"{"to": "a@example.com"}"#])
        .await;
    // No `to`: the template fails the step for good.
    let bad = cli.json(&["send", &url, "--data", "{}"]).await;
    let (good, bad) = (
        good["run_id"].as_str().unwrap(),
        bad["run_id"].as_str().unwrap(),
    );
    eventually("both runs to finish", WAIT, || async {
        let page = cli
            .json(&["runs", "list", "--zap", "Mail", "-o", "json"])
            .await;
        let finished = page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|run| run["finish_time"].is_string())
            .count();
        (finished == 2).then_some(())
    })
    .await;

    let failed = cli
        .json(&[
            "runs", "list", "--status", "failed", "--since", "10m", "-o", "json",
        ])
        .await;
    let ids: Vec<&str> = failed["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [bad]);
    let table = cli.ok(&["runs", "list"]).await;
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{table}"
    );
    assert!(table.contains(good) && table.contains(bad), "{table}");

    let shown = cli.ok(&["runs", "get", bad]).await;
    assert!(shown.contains("trigger.to"), "the step's error: {shown}");
    let paged = cli.run(&["runs", "list", "--limit", "1"]).await;
    assert!(paged.stderr.contains("--page-token"), "{paged:?}");

    let replayed = cli
        .ok(&[
            "runs", "replay", "--zap", "Mail", "--failed", "--since", "1h",
        ])
        .await;
    assert_eq!(
        replayed.lines().count(),
        1,
        "one failed run, one replay: {replayed}"
    );
    let missing = cli
        .run(&["runs", "get", "01900000-0000-7000-8000-000000000000"])
        .await;
    assert_eq!(missing.code, 5, "{missing:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_say_what_to_do_and_exit_non_zero() {
    // Nothing listens on a port just released.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let cli = Cli::new()
        .with("ZAPFLOW_SERVER", &format!("http://{closed}"))
        .with("ZAPFLOW_API_KEY", "zf_nothing");
    let unreachable = cli.run(&["zaps", "list"]).await;
    assert_eq!(unreachable.code, 3, "{unreachable:?}");
    assert!(
        unreachable
            .stderr
            .contains(&format!("cannot reach zapflow at http://{closed}"))
            && unreachable.stderr.contains("Start it with `zapflow`"),
        "{unreachable:?}"
    );

    let stack = stack_of(Deployment::Embedded, StackOptions::default()).await;
    let wrong = Cli::of(&stack, "zf_not-a-key");
    let refused = wrong.run(&["runs", "list"]).await;
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("refused the API key from --api-key / ZAPFLOW_API_KEY")
            && refused.stderr.contains("zapflow login"),
        "{refused:?}"
    );

    // No key given: the data directory's admin key, named when refused.
    let local = Cli::new().with("ZAPFLOW_SERVER", &stack.grpc_url());
    let none = local.run(&["zaps", "list"]).await;
    assert_eq!(none.code, 4, "{none:?}");
    assert!(none.stderr.contains("no API key"), "{none:?}");
    local.write("data/admin-api-key", "zf_stale\n");
    let stale = local.run(&["zaps", "list"]).await;
    assert_eq!(stale.code, 4, "{stale:?}");
    assert!(stale.stderr.contains("data/admin-api-key"), "{stale:?}");

    // `login` checks the key, keeps it (mode 0600), and later commands use it.
    let key = new_user(&stack, "ada").await;
    let login = local.run(&["login", "--api-key", &key]).await;
    assert_eq!(login.code, 0, "{login:?}");
    let credentials = local.dir.join("config/zapflow/credentials.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&credentials).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let listed = local.ok(&["zaps", "list"]).await;
    assert!(listed.starts_with("NAME"), "{listed}");

    let missing = local.run(&["zaps", "get", "Nothing"]).await;
    assert_eq!(missing.code, 5, "{missing:?}");
    assert!(
        missing.stderr.contains("no zap named \"Nothing\""),
        "{missing:?}"
    );

    let bad_login = local.run(&["login", "--api-key", "zf_wrong"]).await;
    assert_eq!(bad_login.code, 4, "{bad_login:?}");
    stack.stop().await;
}

#[tokio::test]
async fn completions_and_help_come_from_the_binary() {
    let cli = Cli::new();
    for shell in ["bash", "zsh", "fish"] {
        let script = cli.ok(&["completion", shell]).await;
        assert!(
            script.contains("apply") && script.contains("rotate-token"),
            "{shell}"
        );
    }
    let help = cli.ok(&["runs", "tail", "--help"]).await;
    assert!(help.contains("Examples:"), "{help}");
}

/// The run id of a delivery sent with `zapflow send`.
pub async fn send(cli: &Cli, url: &str, data: &str) -> String {
    let answer = cli.json(&["send", url, "--data", data]).await;
    answer["run_id"].as_str().unwrap().to_owned()
}

pub fn webhook_url(apply_output: &str) -> String {
    apply_output
        .lines()
        .find_map(|line| line.trim().strip_prefix("webhook URL"))
        .unwrap_or_else(|| panic!("no webhook URL in {apply_output}"))
        .trim()
        .to_owned()
}
