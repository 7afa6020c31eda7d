//! A broker of the test's own, for tests that stop and restart it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// tansu on a free loopback port with its own SQLite file; killed on drop.
pub struct PrivateBroker {
    address: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

fn tansu() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME is set");
    let binary = cache.join("zapflow/tansu/bin/tansu");
    assert!(
        binary.exists(),
        "no tansu at {}: run `bash scripts/start-broker.sh` once to build it",
        binary.display()
    );
    binary
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let address = crate::free_address();
        let dir = std::env::temp_dir().join(crate::unique("zapflow-broker"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut broker = Self {
            address,
            dir,
            child: None,
        };
        broker.restart().await;
        broker
    }

    pub fn brokers(&self) -> String {
        self.address.to_string()
    }

    /// Kills the broker at once (no clean shutdown).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts the broker again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop().await;
        let url = format!("tcp://{}", self.address);
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        let address = self.address;
        crate::eventually(
            "the private broker to listen",
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(address).await.ok().map(drop) },
        )
        .await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
