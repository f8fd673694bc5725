//! The system under test, run from its release binaries: two api replicas, worker
//! replicas, the batch and the data-platform stand-in, each a child process with its log in
//! the scenario's directory.
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

/// Api replicas: requests are spread over them, so a replay or a wait often lands on
/// another replica than the command it is about.
const API_REPLICAS: usize = 2;

/// Database pools. The `scale` scenario runs four workers next to two apis, the batch, the
/// data-platform stand-in and the load generator (about 12 connections): with every pool at
/// its default (api 30, others 10) they would ask for more than PostgreSQL's 100
/// connections, less its 3 reserved. 2 × 20 + 4 × 8 + 2 × 4 + 12 = 92. A worker's
/// partitions share its pool: fewer connections than partitions only make a batch wait for
/// one.
const API_POOL: u32 = 20;
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

/// Processes that can be given an environment of their own ([`System::set_env_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    /// The worker replicas (not the data-platform stand-in, which runs the same binary).
    Worker,
}

pub struct System {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    /// What one role gets on top of `env`, such as a URL through a proxy.
    role_env: Vec<(Role, String, String)>,
    api_addrs: Vec<SocketAddr>,
    /// Where each api replica serves its metrics, when somebody reads them
    /// ([`System::fix_api_metrics_addrs`]); else wherever `env` says.
    api_metrics_addrs: Vec<SocketAddr>,
    apis: Vec<Process>,
    workers: Vec<Process>,
    batch: Option<Process>,
    data_platform: Option<Process>,
    /// Worker processes started so far: each gets a name of its own (`worker-7`), so that
    /// a restarted replica is told apart from the one it replaces.
    workers_started: usize,
}

impl System {
    /// `env`: what every process gets on top of this one's environment (database, broker,
    /// prefix, …). Each api replica listens on a free loopback port, the same across
    /// restarts.
    pub fn new(bin_dir: &Path, log_dir: &Path, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
        let api_addrs = free_ports(API_REPLICAS)?;
        Ok(Self {
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            env,
            role_env: Vec::new(),
            api_addrs,
            api_metrics_addrs: Vec::new(),
            apis: Vec::new(),
            workers: Vec::new(),
            batch: None,
            data_platform: None,
            workers_started: 0,
        })
    }

    /// Sets `name` to `value` for the processes of `role` started from now on, over the
    /// environment every process gets.
    pub fn set_env_of(&mut self, role: Role, name: &str, value: String) {
        self.role_env.push((role, name.to_owned(), value));
    }

    /// The environment of `role`, with `own` (what this start of the process needs) last.
    fn env_of<'a>(&'a self, role: Role, own: &[(&'a str, String)]) -> Vec<(&'a str, String)> {
        self.role_env
            .iter()
            .filter(|(r, _, _)| *r == role)
            .map(|(_, name, value)| (name.as_str(), value.clone()))
            .chain(own.iter().cloned())
            .collect()
    }

    /// The base URLs of the api replicas, separated by commas (as the load generator takes
    /// them).
    pub fn api_url(&self) -> String {
        self.api_addrs
            .iter()
            .map(|addr| format!("http://{addr}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Gives each api replica a metrics port of its own, the same across restarts; their
    /// `/metrics` URLs, in the order of [`System::api_url`].
    pub fn fix_api_metrics_addrs(&mut self) -> anyhow::Result<Vec<String>> {
        self.api_metrics_addrs = free_ports(API_REPLICAS)?;
        Ok(self
            .api_metrics_addrs
            .iter()
            .map(|addr| format!("http://{addr}/metrics"))
            .collect())
    }

    /// Every running process by name, with its pid.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.apis
            .iter()
            .chain(self.workers.iter())
            .chain(self.batch.iter())
            .chain(self.data_platform.iter())
            .filter_map(|p| Some((p.name.clone(), p.child.id()?)))
            .collect()
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

    /// Starts every api replica (`api-1`, `api-2`).
    pub fn start_apis(&mut self) -> anyhow::Result<()> {
        for (n, addr) in self.api_addrs.clone().into_iter().enumerate() {
            let mut own = vec![
                ("HTTP_ADDR", addr.to_string()),
                ("DATABASE_MAX_CONNECTIONS", API_POOL.to_string()),
            ];
            if let Some(metrics) = self.api_metrics_addrs.get(n) {
                own.push(("API_METRICS_ADDR", metrics.to_string()));
            }
            let env = self.env_of(Role::Api, &own);
            let api = self.spawn(&format!("api-{}", n + 1), "api", &[], &env)?;
            self.apis.push(api);
        }
        Ok(())
    }

    /// Starts one more worker replica; its name.
    pub fn start_worker(&mut self) -> anyhow::Result<String> {
        self.workers_started += 1;
        let name = format!("worker-{}", self.workers_started);
        let env = self.env_of(
            Role::Worker,
            &[
                ("WORKER_NAME", name.clone()),
                // Replicas share the machine: each takes a free port for its metrics.
                ("WORKER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
                ("DATABASE_MAX_CONNECTIONS", WORKER_POOL.to_string()),
            ],
        );
        let worker = self.spawn(&name, "worker", &[], &env)?;
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

    /// The api replicas, `workers` worker replicas, the batch and the data-platform stand-in.
    pub fn start_all(&mut self, workers: usize) -> anyhow::Result<()> {
        self.start_apis()?;
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
        all.append(&mut self.apis);
        all.extend(self.batch.take());
        all.extend(self.data_platform.take());
        all
    }

    /// A process that exited by itself (it should not), with its status.
    pub fn exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        let processes = self
            .apis
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

/// `count` distinct free ports on loopback: bound together, so that they differ, and
/// released for the processes to bind.
fn free_ports(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("no free port on loopback")?;
    listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()
        .context("no free port on loopback")
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
