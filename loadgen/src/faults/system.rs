//! The system under test, run from its release binaries: the api, worker replicas, the
//! batch and the data-platform stand-in, each a child process with its log in the
//! scenario's directory.
//! Processes can be killed, stopped and started again, one at a time or all together.

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a process may take to stop after SIGTERM before it is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(30);

/// Database pools of the processes besides the api (30). The `scale` scenario runs four
/// workers next to the api, the batch, the data-platform stand-in and the load generator:
/// with every pool at its default (10) they would ask for all of PostgreSQL's 100
/// connections. A worker's partitions share its pool: fewer connections than partitions
/// only make a batch wait for one.
const WORKER_POOL: u32 = 8;
const SIDE_POOL: u32 = 4;

/// One running process.
struct Process {
    name: String,
    child: Child,
}

/// How a process stopped.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub name: String,
    pub took: Duration,
    /// It did not stop within [`STOP_PATIENCE`] of SIGTERM and was killed.
    pub killed: bool,
    /// How it exited, when that could be read.
    pub status: Option<ExitStatus>,
}

impl Stopped {
    /// Stopped by SIGTERM alone, with a successful exit: what a graceful shutdown is.
    pub fn clean(&self) -> bool {
        !self.killed && self.status.is_some_and(|s| s.success())
    }

    /// How it stopped, for the log.
    pub fn describe(&self) -> String {
        let how = match (self.killed, self.status) {
            (true, _) => ", killed after SIGTERM was ignored".to_owned(),
            (false, Some(status)) if status.success() => String::new(),
            (false, Some(status)) => format!(", exiting with {status}"),
            (false, None) => ", exit status unknown".to_owned(),
        };
        format!("{} stopped in {:.1} s{how}", self.name, self.took.as_secs_f64())
    }
}

pub struct System {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    api_addr: SocketAddr,
    api: Option<Process>,
    workers: Vec<Process>,
    batch: Option<Process>,
    data_platform: Option<Process>,
    /// Worker processes started so far: each gets a name of its own (`worker-7`), so that
    /// a restarted replica is told apart from the one it replaces.
    workers_started: usize,
}

impl System {
    /// `env`: what every process gets on top of this one's environment (database, broker,
    /// prefix, …). The api listens on a free loopback port, the same across restarts.
    pub fn new(bin_dir: &Path, log_dir: &Path, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
        let api_addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free port on loopback")?;
        Ok(Self {
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            env,
            api_addr,
            api: None,
            workers: Vec::new(),
            batch: None,
            data_platform: None,
            workers_started: 0,
        })
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// Names of the worker replicas running now.
    pub fn worker_names(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.name.clone()).collect()
    }

    fn spawn(
        &self,
        name: &str,
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<Process> {
        let log = self.log(name)?;
        let mut command = Command::new(self.bin_dir.join(binary));
        command
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cannot share a log file")?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin_dir.join(binary).display()))?;
        Ok(Process {
            name: name.to_owned(),
            child,
        })
    }

    /// Every start of a process appends to its log, so a restart's story reads in order.
    fn log(&self, name: &str) -> anyhow::Result<File> {
        let path = self.log_dir.join(format!("{name}.log"));
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))
    }

    pub fn start_api(&mut self) -> anyhow::Result<()> {
        let api = self.spawn("api", "api", &[], &[("HTTP_ADDR", self.api_addr.to_string())])?;
        self.api = Some(api);
        Ok(())
    }

    /// Starts one more worker replica; its name.
    pub fn start_worker(&mut self) -> anyhow::Result<String> {
        self.workers_started += 1;
        let name = format!("worker-{}", self.workers_started);
        let worker = self.spawn(
            &name,
            "worker",
            &[],
            &[
                ("WORKER_NAME", name.clone()),
                // Replicas share the machine: each takes a free port for its metrics.
                ("WORKER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
                ("DATABASE_MAX_CONNECTIONS", WORKER_POOL.to_string()),
            ],
        )?;
        self.workers.push(worker);
        Ok(name)
    }

    pub fn start_data_platform(&mut self) -> anyhow::Result<()> {
        let consumer = self.spawn(
            "data-platform",
            "worker",
            &["data-platform"],
            &[("DATABASE_MAX_CONNECTIONS", SIDE_POOL.to_string())],
        )?;
        self.data_platform = Some(consumer);
        Ok(())
    }

    /// The batch, with reservation expiry every few seconds rather than every minute, so
    /// that its jobs run during the load. With the workers' default reservation TTL
    /// (10 minutes) nothing falls due within a scenario: the batch is here to be stopped
    /// and started with everything else, and expiry itself is tested in `batch/tests`.
    pub fn start_batch(&mut self) -> anyhow::Result<()> {
        let batch = self.spawn(
            "batch",
            "batch",
            &[],
            &[
                ("BATCH_NAME", "batch".to_owned()),
                ("BATCH_METRICS_ADDR", "127.0.0.1:0".to_owned()),
                ("BATCH_RESERVATION_EXPIRY_CRON", "*/5 * * * * *".to_owned()),
                ("DATABASE_MAX_CONNECTIONS", SIDE_POOL.to_string()),
            ],
        )?;
        self.batch = Some(batch);
        Ok(())
    }

    /// The api, `workers` replicas, the batch and the data-platform stand-in.
    pub fn start_all(&mut self, workers: usize) -> anyhow::Result<()> {
        self.start_api()?;
        for _ in 0..workers {
            self.start_worker()?;
        }
        self.start_batch()?;
        self.start_data_platform()
    }

    /// `kill -9` the worker at `index` (of those running); its name.
    pub async fn kill_worker(&mut self, index: usize) -> anyhow::Result<String> {
        anyhow::ensure!(index < self.workers.len(), "no worker {index} to kill");
        let mut worker = self.workers.remove(index);
        worker.child.start_kill().context("cannot kill a worker")?;
        let _ = worker.child.wait().await;
        Ok(worker.name)
    }

    /// SIGTERM to the newest `count` workers at once, then waits for each to stop.
    pub async fn stop_newest_workers(&mut self, count: usize) -> Vec<Stopped> {
        let keep = self.workers.len().saturating_sub(count);
        let leaving: Vec<Process> = self.workers.drain(keep..).collect();
        stop(leaving).await
    }

    /// SIGTERM to every process at once, as an orchestrator stopping the system does, then
    /// waits for each to stop.
    pub async fn stop_all(&mut self) -> Vec<Stopped> {
        stop(self.take_all()).await
    }

    /// `kill -9` every process at once, as a power cut does; their names.
    pub async fn kill_all(&mut self) -> Vec<String> {
        let mut all = self.take_all();
        for process in &mut all {
            let _ = process.child.start_kill();
        }
        for process in &mut all {
            let _ = process.child.wait().await;
        }
        all.into_iter().map(|p| p.name).collect()
    }

    /// Every process, no longer counted as running.
    fn take_all(&mut self) -> Vec<Process> {
        let mut all: Vec<Process> = self.workers.drain(..).collect();
        all.extend(self.api.take());
        all.extend(self.batch.take());
        all.extend(self.data_platform.take());
        all
    }

    /// A process that exited by itself (it should not), with its status.
    pub fn exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        let processes = self
            .api
            .iter_mut()
            .chain(self.workers.iter_mut())
            .chain(self.batch.iter_mut())
            .chain(self.data_platform.iter_mut());
        for process in processes {
            if let Ok(Some(status)) = process.child.try_wait() {
                exited.push(format!("{} ({status})", process.name));
            }
        }
        exited
    }
}

/// SIGTERM to all, then waits for each; one still running after [`STOP_PATIENCE`] is killed.
async fn stop(mut processes: Vec<Process>) -> Vec<Stopped> {
    let started = Instant::now();
    for process in &processes {
        if let Some(pid) = process.child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let mut stopped = Vec::with_capacity(processes.len());
    for process in &mut processes {
        let left = STOP_PATIENCE.saturating_sub(started.elapsed());
        let (killed, status) = match tokio::time::timeout(left, process.child.wait()).await {
            Ok(status) => (false, status.ok()),
            Err(_) => {
                let _ = process.child.start_kill();
                (true, process.child.wait().await.ok())
            }
        };
        stopped.push(Stopped {
            name: process.name.clone(),
            took: started.elapsed(),
            killed,
            status,
        });
    }
    stopped
}
