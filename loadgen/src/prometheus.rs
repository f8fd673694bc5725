//! Where the time goes, from the metrics the processes already export: `/metrics` of the api
//! and of each worker is scraped before and after a run, and the difference of each
//! histogram gives the requests, batches and commands of that run alone.

use std::collections::BTreeMap;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Series> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Series> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut end = None;
        loop {
            // key
            while chars.peek().is_some_and(|(_, c)| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut escaped = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (false, c) => value.push(c),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
        rest = &inner[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Series { name, labels, value })
}

/// `/metrics` of the api and of every worker at one moment.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub api: Vec<Series>,
    pub workers: Vec<Vec<Series>>,
}

/// Scrapes every endpoint; one that does not answer counts as empty (a run without a
/// breakdown is still a run).
pub async fn scrape(http: &reqwest::Client, api: Option<&str>, workers: &[String]) -> Scrape {
    async fn one(http: &reqwest::Client, url: &str) -> anyhow::Result<Vec<Series>> {
        let text = http.get(url).send().await?.error_for_status()?.text().await?;
        Ok(parse(&text))
    }
    let api = match api {
        Some(url) => one(http, url).await.unwrap_or_default(),
        None => Vec::new(),
    };
    let mut scrape = Scrape {
        api,
        workers: Vec::new(),
    };
    for url in workers {
        scrape.workers.push(one(http, url).await.unwrap_or_default());
    }
    scrape
}

/// A histogram (buckets, sum, count) summed over the series that match.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    /// Upper bound → cumulative count.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    fn collect(series: &[Series], name: &str, filter: &dyn Fn(&BTreeMap<String, String>) -> bool) -> Self {
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        let mut h = Histogram::default();
        for s in series {
            if !filter(&s.labels) {
                continue;
            }
            if s.name == format!("{name}_bucket") {
                let Some(le) = s
                    .labels
                    .get("le")
                    .and_then(|v| v.parse::<f64>().ok().or((v == "+Inf").then_some(f64::INFINITY)))
                else {
                    continue;
                };
                let entry = buckets.entry(le.to_bits()).or_insert((le, 0.0));
                entry.1 += s.value;
            } else if s.name == format!("{name}_sum") {
                h.sum += s.value;
            } else if s.name == format!("{name}_count") {
                h.count += s.value;
            }
        }
        h.buckets = buckets.into_values().collect();
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        h
    }

    fn minus(&self, earlier: &Histogram) -> Histogram {
        let before: BTreeMap<u64, f64> = earlier.buckets.iter().map(|(le, n)| (le.to_bits(), *n)).collect();
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| (*le, n - before.get(&le.to_bits()).copied().unwrap_or(0.0)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// Like PromQL's `histogram_quantile`: linear within the bucket that holds the quantile.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for (le, cumulative) in &self.buckets {
            if *cumulative >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = cumulative - lower.1;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (le - lower.0) * fraction);
            }
            lower = (*le, *cumulative);
        }
        Some(lower.0)
    }
}

/// One line of the breakdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub stage: String,
    pub count: f64,
    pub per_sec: f64,
    /// `ms` for durations, `commands` for batch sizes.
    pub unit: String,
    pub mean: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

fn stage(name: String, h: &Histogram, seconds: f64, unit: &str) -> Option<Stage> {
    if h.count < 0.5 {
        return None;
    }
    let scale = if unit == "ms" { 1_000.0 } else { 1.0 };
    Some(Stage {
        stage: name,
        count: h.count,
        per_sec: if seconds > 0.0 { h.count / seconds } else { 0.0 },
        unit: unit.to_owned(),
        mean: h.sum / h.count * scale,
        p50: h.quantile(0.5).map(|v| v * scale),
        p99: h.quantile(0.99).map(|v| v * scale),
    })
}

/// The per-stage breakdown of what happened between two scrapes `seconds` apart: api
/// requests by route and status, the size of the api's accept batches, and, summed over the workers, settlement transactions,
/// batch sizes and accept-to-settled latency by command family.
pub fn breakdown(before: &Scrape, after: &Scrape, seconds: f64) -> Vec<Stage> {
    let mut stages = Vec::new();
    let mut routes: BTreeMap<(String, String, String), ()> = BTreeMap::new();
    for s in &after.api {
        if s.name == "http_request_duration_seconds_count" {
            let get = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            routes.insert((get("route"), get("method"), get("status")), ());
        }
    }
    for (route, method, status) in routes.into_keys() {
        if route == "/metrics" {
            continue;
        }
        let filter = |l: &BTreeMap<String, String>| {
            l.get("route") == Some(&route)
                && l.get("method") == Some(&method)
                && l.get("status") == Some(&status)
        };
        let h = Histogram::collect(&after.api, "http_request_duration_seconds", &filter).minus(
            &Histogram::collect(&before.api, "http_request_duration_seconds", &filter),
        );
        stages.extend(stage(format!("api {method} {route} {status}"), &h, seconds, "ms"));
    }
    for family in ["coupon", "order"] {
        let filter = |l: &BTreeMap<String, String>| l.get("family").map(String::as_str) == Some(family);
        for (metric, label) in [
            ("api_command_store_seconds", "store (one statement)"),
            ("api_command_publish_seconds", "publish until confirmed"),
        ] {
            let h = Histogram::collect(&after.api, metric, &filter).minus(&Histogram::collect(
                &before.api,
                metric,
                &filter,
            ));
            stages.extend(stage(format!("api {family}: {label}"), &h, seconds, "ms"));
        }
    }
    // Commands of any family the api stored with one statement and one commit.
    let h = Histogram::collect(&after.api, "api_accept_batch_size", &|_| true).minus(&Histogram::collect(
        &before.api,
        "api_accept_batch_size",
        &|_| true,
    ));
    stages.extend(stage(
        "api accept batch size (one commit)".to_owned(),
        &h,
        seconds,
        "commands",
    ));
    let workers = |scrape: &Scrape| scrape.workers.concat();
    let (w_before, w_after) = (workers(before), workers(after));
    for family in ["coupon", "order"] {
        let filter = |l: &BTreeMap<String, String>| l.get("family").map(String::as_str) == Some(family);
        for (metric, label, unit) in [
            (
                "worker_settle_duration_seconds",
                "settle transaction (per batch)",
                "ms",
            ),
            ("worker_batch_size", "batch size", "commands"),
            (
                "worker_command_latency_seconds",
                "accept to settled (per command)",
                "ms",
            ),
        ] {
            let h = Histogram::collect(&w_after, metric, &filter)
                .minus(&Histogram::collect(&w_before, metric, &filter));
            stages.extend(stage(format!("worker {family}: {label}"), &h, seconds, unit));
        }
    }
    stages
}

/// A client for scraping, separate from the load's connection pool.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .context("cannot build the metrics client")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{method="POST",route="/coupons/{couponId}/issue",status="202",le="0.01"} 1
http_request_duration_seconds_bucket{method="POST",route="/coupons/{couponId}/issue",status="202",le="0.1"} 2
http_request_duration_seconds_bucket{method="POST",route="/coupons/{couponId}/issue",status="202",le="+Inf"} 2
http_request_duration_seconds_sum{method="POST",route="/coupons/{couponId}/issue",status="202"} 0.05
http_request_duration_seconds_count{method="POST",route="/coupons/{couponId}/issue",status="202"} 2
"#;
    const AFTER: &str = r#"
http_request_duration_seconds_bucket{method="POST",route="/coupons/{couponId}/issue",status="202",le="0.01"} 51
http_request_duration_seconds_bucket{method="POST",route="/coupons/{couponId}/issue",status="202",le="0.1"} 102
http_request_duration_seconds_bucket{method="POST",route="/coupons/{couponId}/issue",status="202",le="+Inf"} 102
http_request_duration_seconds_sum{method="POST",route="/coupons/{couponId}/issue",status="202"} 3.05
http_request_duration_seconds_count{method="POST",route="/coupons/{couponId}/issue",status="202"} 102
"#;

    #[test]
    fn labels_may_contain_braces_and_escaped_quotes() {
        let series = parse(r#"m{route="/a/{id}",msg="say \"hi\""} 3.5 1700000000"#);
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].labels["route"], "/a/{id}");
        assert_eq!(series[0].labels["msg"], "say \"hi\"");
        assert_eq!(series[0].value, 3.5);
        assert_eq!(parse("plain 7")[0].value, 7.0);
    }

    #[test]
    fn the_breakdown_covers_only_what_happened_between_the_scrapes() {
        let before = Scrape {
            api: parse(BEFORE),
            workers: vec![],
        };
        let after = Scrape {
            api: parse(AFTER),
            workers: vec![],
        };
        let stages = breakdown(&before, &after, 10.0);
        assert_eq!(stages.len(), 1);
        let s = &stages[0];
        assert_eq!(s.stage, "api POST /coupons/{couponId}/issue 202");
        assert_eq!(s.count, 100.0);
        assert!((s.per_sec - 10.0).abs() < 1e-9);
        assert!((s.mean - 30.0).abs() < 1e-9, "{s:?}");
        // 50 of 100 in the first bucket: the median is its upper bound, 10 ms.
        assert!((s.p50.unwrap_or_default() - 10.0).abs() < 1e-9, "{s:?}");
        // The 99th is 49/50 of the way through the (10, 100] ms bucket.
        assert!((s.p99.unwrap_or_default() - 98.2).abs() < 1e-9, "{s:?}");
    }
}
