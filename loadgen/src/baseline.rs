//! The synchronous baseline: the design users would otherwise build, where each HTTP
//! request runs its transaction directly against PostgreSQL, measured with `pgbench` on
//! scratch tables (`bench_*`) of the same database at the same concurrency.
//!
//! The scripts live in `loadgen/pgbench/`: a `*_setup.sql` (run with psql) creates and
//! fills the scratch tables, the transaction scripts are what pgbench runs, `cleanup.sql`
//! drops the tables again. The baseline gets PostgreSQL to itself (the bench stops the api
//! and the workers first) and as many connections as it asks for, up to what
//! `max_connections` leaves free. pgbench's own CPU use is far below an HTTP stack's, so
//! the comparison flatters the baseline, if anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::Command;

use crate::checks::{CheckId, Checks};
use crate::cli::{BaselineArgs, BaselineScenario};
use crate::db_activity;
use crate::figures::{BaselineFigures, BaselineOutcome, Scenario};
use crate::histogram::Latency;
use crate::report;
use crate::resources::CpuTracker;
use crate::results::{self, BaselineResult, BaselineVariant};

/// Connections left to others when sizing the pgbench client count.
const SPARE_CONNECTIONS: i64 = 5;
/// A pgbench run that takes longer than this is killed.
const PGBENCH_PATIENCE: Duration = Duration::from_secs(600);
/// Balance of each scratch user: far more than any product costs.
const CHECKOUT_BALANCE: i64 = 1_000_000;

struct Script {
    name: &'static str,
    file: &'static str,
    description: &'static str,
}

const FLASH_SALE: [Script; 2] = [
    Script {
        name: "app transaction",
        file: "flash_sale.sql",
        description: "BEGIN; conditional UPDATE of the coupon row; INSERT the user's coupon; COMMIT (a round trip each)",
    },
    Script {
        name: "one statement",
        file: "flash_sale_one_statement.sql",
        description: "the same UPDATE and INSERT as one autocommit statement (no round trip under the row lock)",
    },
];

const CHECKOUT: [Script; 1] = [Script {
    name: "app transaction",
    file: "checkout.sql",
    description:
        "BEGIN; take a unit of stock; debit the balance if it covers the price; INSERT the payment; COMMIT",
}];

pub async fn run(args: &BaselineArgs) -> anyhow::Result<()> {
    let db = PgPoolOptions::new()
        .max_connections(3)
        .connect(&args.database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    let most = free_connections(&db).await?.min(args.concurrency as i64).max(1) as usize;
    let mut client_counts = vec![most];
    if args.pooled_clients > 0 && args.pooled_clients < most {
        client_counts.push(args.pooled_clients);
    }
    let (scenario, scripts): (Scenario, &[Script]) = match args.scenario {
        BaselineScenario::FlashSale => (Scenario::FlashSale, &FLASH_SALE),
        BaselineScenario::Checkout => (Scenario::Checkout, &CHECKOUT),
    };
    let mut result = BaselineResult {
        scenario,
        requested_clients: args.concurrency,
        variants: Vec::new(),
    };
    for script in scripts {
        for &clients in &client_counts {
            let per_client = args.users.div_ceil(clients).max(1);
            let transactions = per_client * clients;
            let variant = run_script(args, &db, script, clients, per_client, transactions).await;
            // Whatever happened, leave no scratch table behind.
            psql(&args.database_url, &args.scripts.join("cleanup.sql"), &[]).await?;
            result.variants.push(variant?);
        }
    }
    report::print_baseline(&result);
    if let Some(out) = &args.out {
        results::write_json(out, &result)?;
    }
    let violations: usize = result.variants.iter().map(|v| v.violations).sum();
    anyhow::ensure!(
        violations == 0,
        "{violations} baseline check(s) violated; see the checks above"
    );
    Ok(())
}

/// Connections PostgreSQL can still accept, keeping a few spare.
async fn free_connections(db: &PgPool) -> anyhow::Result<i64> {
    let free: i64 = sqlx::query_scalar(
        "SELECT current_setting('max_connections')::bigint
              - current_setting('superuser_reserved_connections')::bigint
              - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(db)
    .await?;
    Ok(free - SPARE_CONNECTIONS)
}

async fn run_script(
    args: &BaselineArgs,
    db: &PgPool,
    script: &Script,
    clients: usize,
    per_client: usize,
    transactions: usize,
) -> anyhow::Result<BaselineVariant> {
    let products = args.products.max(1);
    // Users are spread over the products in turn: each gets its share, plus one.
    let stock = transactions.div_ceil(products) + 1;
    let (setup, vars): (&str, Vec<(&str, String)>) = match args.scenario {
        BaselineScenario::FlashSale => (
            "flash_sale_setup.sql",
            vec![
                ("users", transactions.to_string()),
                ("quantity", args.quantity.to_string()),
            ],
        ),
        BaselineScenario::Checkout => (
            "checkout_setup.sql",
            vec![
                ("users", transactions.to_string()),
                ("products", products.to_string()),
                ("stock", stock.to_string()),
                ("balance", CHECKOUT_BALANCE.to_string()),
            ],
        ),
    };
    psql(&args.database_url, &args.scripts.join(setup), &vars).await?;

    let logs = std::env::temp_dir().join(format!("loadgen-pgbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let cpu = CpuTracker::start(Vec::new(), db.clone(), Duration::from_millis(250)).await;
    let waits = db_activity::Sampler::start(db.clone(), Duration::from_millis(20));
    let counters = db_activity::counters(db).await;
    let outcome = pgbench(args, script, clients, per_client, products, &logs).await;
    let db_waits = waits.finish().await;
    let counters = (counters, db_activity::counters(db).await);
    let cpu = cpu.finish().await;
    let output = outcome?;
    let latency = read_logs(&logs)?;
    let _ = std::fs::remove_dir_all(&logs);

    let mut checks = Checks::default();
    let processed = field(&output, "number of transactions actually processed:")
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let failed = field(&output, "number of failed transactions:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let tps = field(&output, "tps =")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    // Compared as floats, so that the detail reads as it always has (`expected 2000.0, …`).
    checks.expect_eq(
        CheckId::BaselineAllTransactionsRan,
        transactions as f64,
        processed as f64,
    );
    checks.expect_eq(CheckId::BaselineNoFailedTransaction, 0.0, failed);

    let outcome = match args.scenario {
        BaselineScenario::FlashSale => {
            let (issued, rows, users, window): (i64, i64, i64, Option<f64>) = sqlx::query_as(
                "SELECT c.issued, count(uc.id), count(DISTINCT uc.user_id),
                        extract(epoch FROM max(uc.issued_at) - min(uc.issued_at))::float8
                 FROM bench_coupons c LEFT JOIN bench_user_coupons uc ON uc.coupon_id = c.id
                 WHERE c.id = 1 GROUP BY c.issued",
            )
            .fetch_one(db)
            .await?;
            let expected = args.quantity.min(transactions as i64);
            checks.expect_eq(CheckId::BaselineQuantityIssuedCoupon, expected, issued);
            checks.expect_eq(CheckId::BaselineQuantityIssuedRows, expected, rows);
            checks.expect_eq(CheckId::BaselineNoUserHoldsTwice, rows, users);
            let window = window.filter(|w| *w > 0.0);
            BaselineOutcome::FlashSale {
                issued: u64::try_from(rows).unwrap_or_default(),
                issue_window_seconds: window,
                issue_tps: window.map(|window| (rows - 1) as f64 / window),
            }
        }
        BaselineScenario::Checkout => {
            let (on_hand, negative, payments, paid, left): (i64, i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT sum(stock + sold) FROM bench_products)::bigint,
                        (SELECT count(*) FROM bench_balances WHERE amount < 0),
                        (SELECT count(*) FROM bench_payments),
                        (SELECT COALESCE(sum(amount), 0) FROM bench_payments)::bigint,
                        (SELECT sum(amount) FROM bench_balances)::bigint",
            )
            .fetch_one(db)
            .await?;
            checks.expect_eq(
                CheckId::BaselineStockConserved,
                (stock * products) as i64,
                on_hand,
            );
            checks.expect_none(CheckId::BaselineNoNegativeBalance, negative);
            checks.expect_eq(
                CheckId::BaselinePaymentPerTransaction,
                transactions as i64,
                payments,
            );
            checks.expect_eq(
                CheckId::BaselinePaymentsAreDebits,
                CHECKOUT_BALANCE * transactions as i64 - left,
                paid,
            );
            BaselineOutcome::Checkout {
                paid: u64::try_from(payments).unwrap_or_default(),
            }
        }
    };
    let violations = checks.violations();
    Ok(BaselineVariant {
        name: format!("{}, {clients} clients", script.name),
        description: script.description.to_owned(),
        clients,
        figures: BaselineFigures {
            tps,
            transactions: processed,
            db: db_activity::delta(&counters.0, &counters.1, processed as f64),
            outcome,
        },
        latency: latency.summary(),
        checks: checks.into_vec(),
        violations,
        db_waits,
        cpu,
    })
}

async fn pgbench(
    args: &BaselineArgs,
    script: &Script,
    clients: usize,
    per_client: usize,
    products: usize,
    logs: &Path,
) -> anyhow::Result<String> {
    let mut command = Command::new("pgbench");
    command
        .arg("--no-vacuum")
        .args(["--protocol", "prepared"])
        .args(["--client", &clients.to_string()])
        .args(["--jobs", &clients.min(2).to_string()])
        .args(["--transactions", &per_client.to_string()])
        .args(["--define", &format!("clients={clients}")])
        .args(["--define", "n=0"])
        .args(["--define", &format!("products={products}")])
        .arg("--log")
        .arg(format!("--log-prefix={}", logs.join("tx").display()))
        .arg("--file")
        .arg(args.scripts.join(script.file))
        .arg(&args.database_url)
        .current_dir(logs)
        .kill_on_drop(true);
    let output = tokio::time::timeout(PGBENCH_PATIENCE, command.output())
        .await
        .context("pgbench did not finish in time")?
        .context("cannot run pgbench (is it installed?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "pgbench failed ({}): {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

/// The text after `prefix` on the first line that starts with it.
fn field<'a>(output: &'a str, prefix: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(str::trim)
}

/// Transaction latencies from pgbench's per-transaction logs (`client tx micros …`).
fn read_logs(dir: &Path) -> anyhow::Result<Latency> {
    let mut latency = Latency::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path: PathBuf = entry?.path();
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        for line in text.lines() {
            if let Some(micros) = line.split_whitespace().nth(2).and_then(|v| v.parse::<u64>().ok()) {
                latency.record_micros(micros);
            }
        }
    }
    Ok(latency)
}

/// Runs a SQL file with psql, with `-v name=value` variables; fails on the first error.
async fn psql(url: &str, file: &Path, vars: &[(&str, String)]) -> anyhow::Result<()> {
    let mut command = Command::new("psql");
    command.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    for (name, value) in vars {
        command.arg("-v").arg(format!("{name}={value}"));
    }
    command.arg("-f").arg(file).arg(url);
    let output = command
        .output()
        .await
        .context("cannot run psql (is it installed?)")?;
    if !output.status.success() {
        bail!(
            "psql -f {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "transaction type: flash_sale.sql
number of clients: 90
number of transactions actually processed: 20070/20070
number of failed transactions: 0 (0.000%)
latency average = 41.2 ms
initial connection time = 80.110 ms
tps = 2183.512834 (without initial connection time)
";

    #[test]
    fn pgbench_figures_are_read_from_its_summary() {
        assert_eq!(
            field(OUTPUT, "number of transactions actually processed:"),
            Some("20070/20070")
        );
        assert_eq!(
            field(OUTPUT, "tps ="),
            Some("2183.512834 (without initial connection time)")
        );
        assert_eq!(field(OUTPUT, "no such line"), None);
    }
}
