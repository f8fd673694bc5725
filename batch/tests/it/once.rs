//! Once, everywhere: several batch replicas, in one process or in several, run each job's
//! slot once; `batch run <job>` runs a job now and says so in its exit status; the batch
//! serves its metrics.

use testkit::jobs;

use std::process::Stdio;
use std::time::Duration;

use batch::{Batch, Job};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Scheduled runs per job: (job, count of rows, count of distinct slots, all succeeded).
async fn scheduled_runs(db: &sqlx::PgPool) -> Vec<(String, i64, i64, bool)> {
    sqlx::query_as(
        "SELECT job, count(*), count(DISTINCT period), bool_and(outcome = 'SUCCEEDED')
         FROM job_runs WHERE trigger = 'SCHEDULE' GROUP BY job ORDER BY job",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

fn once_each() -> Vec<(String, i64, i64, bool)> {
    let mut jobs: Vec<_> = Job::ALL
        .iter()
        .map(|j| (j.name().to_owned(), 1, 1, true))
        .collect();
    jobs.sort();
    jobs
}

#[tokio::test]
async fn two_batches_started_together_run_each_job_once() {
    let (url, db) = jobs::fresh_database().await;
    // Each instance has its own pool and its own sessions, as two replicas would.
    let (a, b) = tokio::join!(
        Batch::start(jobs::config(&url, "a")),
        Batch::start(jobs::config(&url, "b"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    // Both have caught up at start; the catch-up of either, repeated now, changes nothing.
    for job in Job::ALL {
        tokio::join!(a.runner().run_due(job), b.runner().run_due(job));
    }
    assert_eq!(scheduled_runs(&db).await, once_each());
    let slots: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT DISTINCT period FROM job_runs")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(slots, vec![jobs::quiet_slot()]);
    tokio::join!(a.stop(), b.stop());
}

/// A `batch` process on `database_url`, every job on the quiet cron, logs on stdout.
fn batch_process(database_url: &str, name: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_batch"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("BATCH_NAME", name)
        .env("BATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("BATCH_POPULAR_PRODUCTS_CRON", jobs::QUIET_CRON)
        .env("BATCH_RESERVATION_EXPIRY_CRON", jobs::QUIET_CRON)
        .env("BATCH_HOUSEKEEPING_CRON", jobs::QUIET_CRON)
        .env("RUST_LOG", "info")
        .env("LOG_JSON", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Reads the process's log until it says the batch is ready (after its catch-up).
async fn wait_until_ready(child: &mut Child) {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("batch ready") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready.ok(), Some(true), "the batch process never got ready");
    // Keep draining its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

#[tokio::test]
async fn two_batch_processes_started_together_run_each_job_once() {
    let (url, db) = jobs::fresh_database().await;
    let mut a = batch_process(&url, "a", &[]).spawn().unwrap();
    let mut b = batch_process(&url, "b", &[]).spawn().unwrap();
    tokio::join!(wait_until_ready(&mut a), wait_until_ready(&mut b));
    assert_eq!(scheduled_runs(&db).await, once_each());
    let runners: Vec<String> = sqlx::query_scalar("SELECT DISTINCT runner FROM job_runs")
        .fetch_all(&db)
        .await
        .unwrap();
    assert!(runners.iter().all(|r| r == "a" || r == "b"), "{runners:?}");
    a.kill().await.unwrap();
    b.kill().await.unwrap();
}

#[tokio::test]
async fn batch_run_runs_one_job_now_and_fails_loudly() {
    let (url, db) = jobs::fresh_database().await;
    let status = batch_process(&url, "cli", &["run", "popular-products"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let runs = jobs::runs_of(&db, "popular-products").await;
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].0.as_str(), runs[0].1.as_str()), ("MANUAL", "SUCCEEDED"));
    assert_eq!(jobs::snapshots(&db).await.len(), 1);

    let unknown = batch_process(&url, "cli", &["run", "everything"])
        .status()
        .await
        .unwrap();
    assert!(!unknown.success());

    // A job that fails makes the command fail, and the failure is on record.
    sqlx::query("ALTER TABLE idempotency_keys RENAME TO idempotency_keys_gone")
        .execute(&db)
        .await
        .unwrap();
    let failed = batch_process(&url, "cli", &["run", "housekeeping"])
        .status()
        .await
        .unwrap();
    assert!(!failed.success());
    let outcomes: Vec<String> = jobs::runs_of(&db, "housekeeping")
        .await
        .into_iter()
        .map(|(trigger, outcome, _)| format!("{trigger} {outcome}"))
        .collect();
    assert_eq!(outcomes, vec!["MANUAL FAILED"]);
}

#[tokio::test]
async fn the_batch_serves_the_last_success_and_duration_of_each_job() {
    let (url, _db) = jobs::fresh_database().await;
    let batch = Batch::start(jobs::config(&url, "metrics")).await.unwrap();
    let body = reqwest::get(format!("http://{}/metrics", batch.metrics_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for job in Job::ALL {
        let success = format!("batch_job_last_success_timestamp_seconds{{job=\"{job}\"}}");
        let line = body
            .lines()
            .find(|l| l.starts_with(&success))
            .unwrap_or_else(|| panic!("no {success} in\n{body}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let now = chrono::Utc::now().timestamp() as f64;
        assert!((now - 600.0..=now + 1.0).contains(&value), "{line}");
        let duration = format!("batch_job_duration_seconds_count{{job=\"{job}\"}}");
        assert!(body.contains(&duration), "no {duration} in\n{body}");
    }
    let live = reqwest::get(format!("http://{}/health/live", batch.metrics_addr()))
        .await
        .unwrap();
    assert!(live.status().is_success());
    batch.stop().await;
}
