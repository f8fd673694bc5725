//! `browse`: the synchronous reads, for `--duration-secs`: `GET /products` (first page),
//! `GET /products/{id}`, `GET /products/popular` and `GET /users/{id}/balance`, mixed
//! 25 / 40 / 10 / 25. Every answer must be 200; requests per second and latency are reported
//! per endpoint (`requests_per_sec` and latency `all` overall; see [`BrowseFigures`]).

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::{base_params, dispatch_lag, Harness, Outcomes};
use crate::checks;
use crate::cli::BrowseArgs;
use crate::client::Api;
use crate::figures::{BrowseFigures, Figures};
use crate::histogram::Recorder;
use crate::results::ScenarioResult;
use crate::schedule;
use crate::setup;

/// One read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Products,
    Product(i64),
    Popular,
    Balance(i64),
}

impl Read {
    pub fn label(&self) -> &'static str {
        match self {
            Read::Products => "GET /products",
            Read::Product(_) => "GET /products/{id}",
            Read::Popular => "GET /products/popular",
            Read::Balance(_) => "GET /users/{id}/balance",
        }
    }

    fn path(&self) -> String {
        match self {
            Read::Products => "/products".to_owned(),
            Read::Product(id) => format!("/products/{id}"),
            Read::Popular => "/products/popular".to_owned(),
            Read::Balance(user) => format!("/users/{user}/balance"),
        }
    }
}

/// An endless mix of reads over these products and users.
pub fn reads(products: Vec<i64>, users: Vec<i64>, seed: u64) -> impl Iterator<Item = Read> + Send + 'static {
    let mut rng = StdRng::seed_from_u64(seed);
    std::iter::from_fn(move || {
        let pick = |rng: &mut StdRng, ids: &[i64]| ids.get(rng.random_range(0..ids.len().max(1))).copied();
        let roll: u32 = rng.random_range(0..100);
        Some(match roll {
            0..25 => Read::Products,
            25..65 => pick(&mut rng, &products).map_or(Read::Products, Read::Product),
            65..75 => Read::Popular,
            _ => pick(&mut rng, &users).map_or(Read::Products, Read::Balance),
        })
    })
}

struct Reader {
    api: Api,
    recorder: Recorder,
    outcomes: Outcomes,
}

impl Reader {
    async fn read(&self, read: Read, intended: Instant) {
        let answer = self.api.get(&read.path()).await;
        let latency = intended.elapsed();
        self.recorder.record("all", latency);
        self.recorder.record(read.label(), latency);
        match answer {
            Ok(a) => self
                .outcomes
                .count(&format!("{} {}", read.label(), a.outcome()), a.status == 200),
            Err(_) => self
                .outcomes
                .count(&format!("{} transport error", read.label()), false),
        }
    }
}

pub async fn run(args: &BrowseArgs) -> anyhow::Result<()> {
    let common = &args.common;
    anyhow::ensure!(
        common.commands_url.is_none(),
        "browse sends no commands: --commands-url does not apply to it"
    );
    let harness = Harness::connect(common).await?;
    let prefix = setup::run_prefix("browse");
    let users = setup::create_users(&harness.db, &harness.api, &prefix, args.users, 50_000).await?;
    let products: Vec<i64> = setup::create_products(&harness.api, &prefix, args.products, 100)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Nothing to warm up for reads, but plan with statistics as a running system would.
    harness.analyze().await?;
    println!(
        "browse: {} products, {} users, {} s, {}",
        products.len(),
        users.len(),
        args.duration_secs,
        common.pace().describe()
    );
    let reader = Arc::new(Reader {
        api: harness.api.clone(),
        recorder: Recorder::tapped(common.latency_tap.clone()),
        outcomes: Outcomes::default(),
    });
    let window = harness.begin().await;
    let load = Arc::clone(&reader);
    let timing = schedule::drive(
        reads(products.clone(), users.clone(), common.seed),
        common.pace(),
        Some(Duration::from_secs(args.duration_secs.max(1))),
        move |read, intended| {
            let reader = Arc::clone(&load);
            async move { reader.read(read, intended).await }
        },
    )
    .await;
    let measured = harness.end(window).await;

    let seconds = timing.elapsed().as_secs_f64();
    let latencies = reader.recorder.summaries();
    let figures = Figures::Browse(BrowseFigures {
        requests: timing.dispatched,
        load_seconds: seconds,
        requests_per_sec: timing.dispatched as f64 / seconds,
        per_endpoint: latencies
            .iter()
            .filter(|(label, _)| *label != "all")
            .map(|(label, l)| (label.clone(), l.count as f64 / seconds))
            .collect(),
        dispatch: dispatch_lag(common, &timing),
        db: measured.db_activity(timing.dispatched as f64),
    });
    let checks = checks::browse(
        &harness.db,
        &harness.api,
        &products,
        &users,
        reader.outcomes.unexpected(),
    )
    .await?;
    let mut params = base_params(common);
    params.insert("users".to_owned(), users.len().to_string());
    params.insert("products".to_owned(), products.len().to_string());
    params.insert("duration_secs".to_owned(), args.duration_secs.to_string());
    let violations = checks.violations();
    harness.finish(ScenarioResult {
        label: common.label.clone(),
        pace: common.pace().describe(),
        params,
        started_at: timing.started_at,
        figures,
        latencies,
        outcomes: reader.outcomes.snapshot(),
        checks: checks.into_vec(),
        violations,
        stages: measured.stages,
        cpu: measured.cpu,
        memory: Vec::new(),
        db_waits: measured.db_waits,
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_reads_every_endpoint_roughly_in_its_share() {
        let mix: Vec<Read> = reads(vec![1, 2], vec![7], 5).take(10_000).collect();
        let share = |label: &str| mix.iter().filter(|r| r.label() == label).count() as f64 / 100.0;
        assert!((share("GET /products") - 25.0).abs() < 2.0);
        assert!((share("GET /products/{id}") - 40.0).abs() < 2.0);
        assert!((share("GET /products/popular") - 10.0).abs() < 2.0);
        assert!((share("GET /users/{id}/balance") - 25.0).abs() < 2.0);
        assert!(mix.iter().all(|r| !matches!(r, Read::Balance(u) if *u != 7)));
    }
}
