//! Results: what a scenario or a baseline run measured and checked, and the JSON files they
//! are written to and read back from (`loadgen report`). A file keeps the shape it has always
//! had, figures as a map by key and each check with its description, plus each check's
//! identifier; files written before the identifiers still read.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checks::{Check, CheckId, Suite};
use crate::db_activity::Wait;
use crate::figure_map::{self, FigureMap, FigureMapError};
use crate::figures::{BaselineFigures, Figures, Scenario};
use crate::histogram::LatencySummary;
use crate::prometheus::Stage;
use crate::resources::{CpuUse, Memory};

/// What one scenario run measured and checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(into = "StoredScenario", try_from = "StoredScenario")]
pub struct ScenarioResult {
    pub label: String,
    pub pace: String,
    pub params: BTreeMap<String, String>,
    pub started_at: DateTime<Utc>,
    /// Throughputs, counts and durations; which scenario ran.
    pub figures: Figures,
    pub latencies: BTreeMap<String, LatencySummary>,
    /// HTTP answers by `status code`.
    pub outcomes: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub violations: usize,
    pub stages: Vec<Stage>,
    pub cpu: Vec<CpuUse>,
    pub memory: Vec<Memory>,
    pub db_waits: Vec<Wait>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    pub fn scenario(&self) -> Scenario {
        self.figures.scenario()
    }
}

/// What one baseline run measured and checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(into = "StoredBaseline", try_from = "StoredBaseline")]
pub struct BaselineResult {
    pub scenario: Scenario,
    pub requested_clients: usize,
    pub variants: Vec<BaselineVariant>,
}

/// One pgbench script.
#[derive(Debug, Clone)]
pub struct BaselineVariant {
    pub name: String,
    pub description: String,
    pub clients: usize,
    pub figures: BaselineFigures,
    pub latency: LatencySummary,
    pub checks: Vec<Check>,
    pub violations: usize,
    pub db_waits: Vec<Wait>,
    pub cpu: Vec<CpuUse>,
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a result file", path.display()))
}

/// Why a file's content is not a result.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultError {
    UnknownScenario(String),
    Figures(FigureMapError),
    /// A check without an identifier (written before they had one) whose description no
    /// check of its suite has.
    UnknownCheck(String),
}

impl fmt::Display for ResultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResultError::UnknownScenario(name) => write!(f, "no scenario is called `{name}`"),
            ResultError::Figures(e) => e.fmt(f),
            ResultError::UnknownCheck(name) => write!(f, "no check is described as `{name}`"),
        }
    }
}

impl std::error::Error for ResultError {}

impl From<FigureMapError> for ResultError {
    fn from(e: FigureMapError) -> Self {
        ResultError::Figures(e)
    }
}

fn scenario_named(name: &str) -> Result<Scenario, ResultError> {
    Scenario::named(name).ok_or_else(|| ResultError::UnknownScenario(name.to_owned()))
}

/// Whose checks a scenario's result holds.
fn suite(scenario: Scenario) -> Suite {
    match scenario {
        Scenario::FlashSale => Suite::FlashSale,
        Scenario::Checkout => Suite::Checkout,
        Scenario::Browse => Suite::Browse,
    }
}

/// A check as a file holds it: `name` is its description.
#[derive(Serialize, Deserialize)]
struct StoredCheck {
    /// `None` in files written before checks had identifiers.
    #[serde(default)]
    id: Option<CheckId>,
    name: String,
    passed: bool,
    detail: String,
}

impl From<Check> for StoredCheck {
    fn from(check: Check) -> Self {
        StoredCheck {
            id: Some(check.id),
            name: check.description().to_owned(),
            passed: check.passed,
            detail: check.detail,
        }
    }
}

impl StoredCheck {
    fn into_check(self, suite: Suite) -> Result<Check, ResultError> {
        let id = match self.id {
            Some(id) => id,
            None => CheckId::described(suite, &self.name).ok_or(ResultError::UnknownCheck(self.name))?,
        };
        Ok(Check {
            id,
            passed: self.passed,
            detail: self.detail,
        })
    }
}

fn stored_checks(checks: Vec<Check>) -> Vec<StoredCheck> {
    checks.into_iter().map(StoredCheck::from).collect()
}

fn read_checks(suite: Suite, checks: Vec<StoredCheck>) -> Result<Vec<Check>, ResultError> {
    checks.into_iter().map(|c| c.into_check(suite)).collect()
}

/// A [`ScenarioResult`] as a file holds it, field for field in the file's order.
#[derive(Serialize, Deserialize)]
struct StoredScenario {
    scenario: String,
    label: String,
    pace: String,
    params: BTreeMap<String, String>,
    started_at: DateTime<Utc>,
    figures: FigureMap,
    latencies: BTreeMap<String, LatencySummary>,
    outcomes: BTreeMap<String, u64>,
    checks: Vec<StoredCheck>,
    violations: usize,
    stages: Vec<Stage>,
    cpu: Vec<CpuUse>,
    memory: Vec<Memory>,
    db_waits: Vec<Wait>,
    notes: Vec<String>,
}

impl From<ScenarioResult> for StoredScenario {
    fn from(r: ScenarioResult) -> Self {
        StoredScenario {
            scenario: r.scenario().name().to_owned(),
            label: r.label,
            pace: r.pace,
            params: r.params,
            started_at: r.started_at,
            figures: figure_map::write_scenario(&r.figures),
            latencies: r.latencies,
            outcomes: r.outcomes,
            checks: stored_checks(r.checks),
            violations: r.violations,
            stages: r.stages,
            cpu: r.cpu,
            memory: r.memory,
            db_waits: r.db_waits,
            notes: r.notes,
        }
    }
}

impl TryFrom<StoredScenario> for ScenarioResult {
    type Error = ResultError;

    fn try_from(s: StoredScenario) -> Result<Self, Self::Error> {
        let scenario = scenario_named(&s.scenario)?;
        Ok(ScenarioResult {
            label: s.label,
            pace: s.pace,
            params: s.params,
            started_at: s.started_at,
            figures: figure_map::read_scenario(scenario, s.figures)?,
            latencies: s.latencies,
            outcomes: s.outcomes,
            checks: read_checks(suite(scenario), s.checks)?,
            violations: s.violations,
            stages: s.stages,
            cpu: s.cpu,
            memory: s.memory,
            db_waits: s.db_waits,
            notes: s.notes,
        })
    }
}

/// A [`BaselineResult`] as a file holds it.
#[derive(Serialize, Deserialize)]
struct StoredBaseline {
    scenario: String,
    requested_clients: usize,
    variants: Vec<StoredVariant>,
}

#[derive(Serialize, Deserialize)]
struct StoredVariant {
    name: String,
    description: String,
    clients: usize,
    figures: FigureMap,
    latency: LatencySummary,
    checks: Vec<StoredCheck>,
    violations: usize,
    db_waits: Vec<Wait>,
    cpu: Vec<CpuUse>,
}

impl From<BaselineResult> for StoredBaseline {
    fn from(r: BaselineResult) -> Self {
        StoredBaseline {
            scenario: r.scenario.name().to_owned(),
            requested_clients: r.requested_clients,
            variants: r
                .variants
                .into_iter()
                .map(|v| StoredVariant {
                    name: v.name,
                    description: v.description,
                    clients: v.clients,
                    figures: figure_map::write_baseline(&v.figures),
                    latency: v.latency,
                    checks: stored_checks(v.checks),
                    violations: v.violations,
                    db_waits: v.db_waits,
                    cpu: v.cpu,
                })
                .collect(),
        }
    }
}

impl TryFrom<StoredBaseline> for BaselineResult {
    type Error = ResultError;

    fn try_from(s: StoredBaseline) -> Result<Self, Self::Error> {
        let scenario = scenario_named(&s.scenario)?;
        let variants = s
            .variants
            .into_iter()
            .map(|v| {
                Ok(BaselineVariant {
                    name: v.name,
                    description: v.description,
                    clients: v.clients,
                    figures: figure_map::read_baseline(scenario, v.figures)?,
                    latency: v.latency,
                    checks: read_checks(Suite::Baseline, v.checks)?,
                    violations: v.violations,
                    db_waits: v.db_waits,
                    cpu: v.cpu,
                })
            })
            .collect::<Result<_, ResultError>>()?;
        Ok(BaselineResult {
            scenario,
            requested_clients: s.requested_clients,
            variants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkout result as files were written before checks had identifiers (trimmed).
    const WRITTEN_BEFORE: &str = r#"{
  "scenario": "checkout",
  "label": "",
  "pace": "open loop, 15/s, at most 200 in flight",
  "params": { "concurrency": "200" },
  "started_at": "2026-12-07T01:38:58.100Z",
  "figures": {
    "db_commits": 30010.0, "db_commits per paid order": 83.36,
    "db_rollbacks": 5.0, "db_rollbacks per paid order": 0.01,
    "db_rows_deleted": 6.0, "db_rows_deleted per paid order": 0.01,
    "db_rows_inserted": 23542.0, "db_rows_inserted per paid order": 65.39,
    "db_rows_updated": 10773.0, "db_rows_updated per paid order": 29.92,
    "journeys": 360.0, "journeys_per_sec": 15.02, "late_dispatches": 0.0,
    "load_seconds": 23.95, "paid": 360.0, "paid_per_sec": 15.03,
    "last_payment_after_start_seconds": 23.95, "polls_per_journey": 0.0,
    "wal_bytes (server)": 11500592.0, "wal_bytes (server) per paid order": 31946.08,
    "wal_syncs (server)": 8650.0, "wal_syncs (server) per paid order": 24.02,
    "worst_dispatch_lag_ms": 3.68
  },
  "latencies": {},
  "outcomes": { "POST /orders 202": 360 },
  "checks": [
    { "name": "no balance negative", "passed": true, "detail": "0 found" },
    { "name": "every request terminal (DB)", "passed": false, "detail": "1 found" }
  ],
  "violations": 1,
  "stages": [],
  "cpu": [],
  "memory": [],
  "db_waits": [],
  "notes": []
}"#;

    #[test]
    fn a_result_written_before_the_identifiers_reads_with_its_suites_checks() {
        let result: ScenarioResult = serde_json::from_str(WRITTEN_BEFORE).expect("a result");
        assert_eq!(result.scenario(), Scenario::Checkout);
        let ids: Vec<CheckId> = result.checks.iter().map(|c| c.id).collect();
        // Both descriptions are also those of checks of other suites.
        assert_eq!(
            ids,
            [
                CheckId::CheckoutNoNegativeBalance,
                CheckId::CheckoutRequestsTerminalDb
            ]
        );
        assert_eq!(
            result.figures.checkout().and_then(|c| c.paid_per_sec),
            Some(15.03)
        );
    }

    #[test]
    fn a_result_is_written_as_before_with_each_checks_identifier() {
        let result: ScenarioResult = serde_json::from_str(WRITTEN_BEFORE).expect("a result");
        let written = serde_json::to_value(&result).expect("serializes");
        let mut before: serde_json::Value = serde_json::from_str(WRITTEN_BEFORE).expect("JSON");
        for (check, id) in before["checks"]
            .as_array_mut()
            .expect("checks")
            .iter_mut()
            .zip(["checkout.no_negative_balance", "checkout.requests_terminal_db"])
        {
            check["id"] = id.into();
        }
        assert_eq!(written, before);

        let again: ScenarioResult = serde_json::from_value(written).expect("reads back");
        assert_eq!(again.checks, result.checks);
        assert_eq!(again.figures, result.figures);
    }

    #[test]
    fn an_identifier_wins_over_the_description() {
        let renamed = WRITTEN_BEFORE.replace(
            r#"{ "name": "no balance negative","#,
            r#"{ "id": "checkout.no_negative_balance", "name": "no balance is below zero","#,
        );
        let result: ScenarioResult = serde_json::from_str(&renamed).expect("a result");
        assert_eq!(result.checks[0].id, CheckId::CheckoutNoNegativeBalance);
        assert_eq!(result.checks[0].description(), "no balance negative");
    }

    #[test]
    fn an_unknown_check_or_scenario_is_not_a_result() {
        let unknown = WRITTEN_BEFORE.replace("every request terminal (DB)", "every request terminal");
        assert!(serde_json::from_str::<ScenarioResult>(&unknown).is_err());
        let unknown = WRITTEN_BEFORE.replace(r#""scenario": "checkout""#, r#""scenario": "browse""#);
        assert!(
            serde_json::from_str::<ScenarioResult>(&unknown).is_err(),
            "a checkout's figures and checks are not a browse's"
        );
        let unknown = WRITTEN_BEFORE.replace(r#""scenario": "checkout""#, r#""scenario": "refund""#);
        assert!(serde_json::from_str::<ScenarioResult>(&unknown).is_err());
    }
}
