//! `--repeat N`: the chosen scenarios run N times over, for a fault whose failure comes now
//! and then (a broker restart that leaves a consumer fed nothing). Each repetition is a
//! suite of its own; its outcome is printed as soon as it ends, and the last line says how
//! many passed. The run fails when any repetition failed.

use std::future::Future;

use anyhow::bail;

/// Runs `once` for repetitions 1 to `times`, whatever each one's outcome.
pub async fn run<F, Fut>(times: u32, mut once: F) -> anyhow::Result<()>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut tally = Tally::new(times);
    for repetition in 1..=times {
        println!("\nfaults: repetition {repetition} of {times}");
        let outcome = once(repetition).await;
        println!("{}", tally.record(repetition, outcome));
    }
    println!("\nfaults: repetitions");
    for line in tally.summary() {
        println!("  {line}");
    }
    if tally.passed < times {
        bail!("{} of {times} repetitions failed", times - tally.passed);
    }
    Ok(())
}

/// The outcome of each repetition, as printed.
struct Tally {
    times: u32,
    passed: u32,
    lines: Vec<String>,
}

impl Tally {
    fn new(times: u32) -> Self {
        Self {
            times,
            passed: 0,
            lines: Vec::new(),
        }
    }

    /// Notes one repetition's outcome; the line that says it.
    fn record(&mut self, repetition: u32, outcome: anyhow::Result<()>) -> String {
        let result = match outcome {
            Ok(()) => {
                self.passed += 1;
                "passed".to_owned()
            }
            Err(e) => format!("FAILED: {e:#}"),
        };
        let line = format!("repetition {repetition} of {}: {result}", self.times);
        self.lines.push(line.clone());
        line
    }

    /// Every repetition's line, then "N of M passed".
    fn summary(&self) -> Vec<String> {
        let mut lines = self.lines.clone();
        lines.push(format!("{} of {} passed", self.passed, self.times));
        lines
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn the_summary_counts_the_repetitions_that_passed() {
        let mut tally = Tally::new(3);
        assert_eq!(tally.record(1, Ok(())), "repetition 1 of 3: passed");
        assert_eq!(
            tally.record(2, Err(anyhow::anyhow!("1 of 1 fault scenarios failed"))),
            "repetition 2 of 3: FAILED: 1 of 1 fault scenarios failed"
        );
        tally.record(3, Ok(()));
        assert_eq!(
            tally.summary(),
            [
                "repetition 1 of 3: passed",
                "repetition 2 of 3: FAILED: 1 of 1 fault scenarios failed",
                "repetition 3 of 3: passed",
                "2 of 3 passed",
            ]
        );
    }

    #[tokio::test]
    async fn every_repetition_runs_even_after_a_failure_and_the_run_fails() {
        let ran = RefCell::new(Vec::new());
        let outcome = run(4, |repetition| {
            ran.borrow_mut().push(repetition);
            async move {
                if repetition == 2 {
                    bail!("restart-broker did not recover");
                }
                Ok(())
            }
        })
        .await;
        assert_eq!(*ran.borrow(), [1, 2, 3, 4]);
        assert_eq!(outcome.unwrap_err().to_string(), "1 of 4 repetitions failed");
    }

    #[tokio::test]
    async fn a_run_whose_repetitions_all_pass_passes() {
        let mut count = 0;
        run(2, |_| {
            count += 1;
            async { Ok(()) }
        })
        .await
        .unwrap();
        assert_eq!(count, 2);
    }

    #[test]
    fn repeat_takes_a_count_of_at_least_one() {
        use clap::Parser;

        use crate::faults::Cli;

        let parse = |extra: &[&str]| {
            let mut args = vec!["faults", "--bin-dir", "target/release"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let repeat = |extra: &[&str]| parse(extra).unwrap().args.repeat;
        assert_eq!(repeat(&[]), 1);
        assert_eq!(repeat(&["--fault", "restart-broker", "--repeat", "10"]), 10);
        assert!(parse(&["--repeat", "0"]).is_err());
    }
}
