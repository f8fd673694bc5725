//! The `# HELP` text of every metric the binaries emit, so that an operator reading
//! `/metrics`, Prometheus or Grafana learns what a series counts without reading the code.
//!
//! Descriptions live in the recorder, not at the call sites: [`describe_metrics`] runs once,
//! when [`crate::telemetry::metrics_recorder`] installs the recorder, and describes the
//! metrics of all three binaries (a name a process never emits renders nothing). A metric
//! added anywhere gets its line here; the test below renders every one and fails on a
//! `# TYPE` without its `# HELP`.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Describes every metric of the api, the worker and the batch to the installed recorder.
pub fn describe_metrics() {
    // The api: HTTP traffic.
    describe_counter!(
        "http_requests_total",
        Unit::Count,
        "HTTP requests answered by the api, by method, route template and status."
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time the api took to answer an HTTP request, by method, route template and status."
    );
    describe_counter!(
        "api_auth_failures_total",
        Unit::Count,
        "Requests refused because their bearer token is unknown or revoked."
    );
    describe_counter!(
        "api_rate_limited_total",
        Unit::Count,
        "Requests answered 429 ERR_RATE_LIMITED by a per-user or per-address limit."
    );
    describe_histogram!(
        "api_token_lookup_batch_size",
        Unit::Count,
        "Tokens looked up in PostgreSQL by one statement (cache misses batched together)."
    );
    describe_histogram!(
        "api_coupon_check_batch_size",
        Unit::Count,
        "Coupon issue checks (user, coupon, held) read by one statement."
    );
    describe_histogram!(
        "api_quote_batch_size",
        Unit::Count,
        "Order checks (user, unpaid orders, products and prices) read by one statement."
    );
    describe_histogram!(
        "api_payment_check_batch_size",
        Unit::Count,
        "Payment checks (the order's owner and status) read by one statement."
    );
    describe_histogram!(
        "api_key_read_batch_size",
        Unit::Count,
        "Idempotency keys of commands read by one statement (replays, and refusals from memory)."
    );
    describe_counter!(
        "orders_cancelled_total",
        Unit::Count,
        "Orders cancelled through POST /orders/{orderId}/cancel."
    );

    // The api: accepting commands.
    describe_counter!(
        "api_commands_published_total",
        Unit::Count,
        "Commands published to RabbitMQ by the api, by family and outcome (confirmed or failed)."
    );
    describe_counter!(
        "api_commands_refused_total",
        Unit::Count,
        "Commands refused at once by the api's checks, without reaching the queue, by type and error code."
    );
    describe_counter!(
        "api_commands_overloaded_total",
        Unit::Count,
        "Commands answered 429 ERR_OVERLOADED because their family's queues were over COMMAND_QUEUE_LIMIT."
    );
    describe_gauge!(
        "api_command_queue_depth",
        Unit::Count,
        "Ready messages in a family's partition queues, as last sampled by this api."
    );
    describe_gauge!(
        "api_partition_queue_ready",
        Unit::Count,
        "Ready messages in one partition queue, by family and partition, as last sampled by this api."
    );
    describe_histogram!(
        "api_queue_snapshot_read_seconds",
        Unit::Seconds,
        "Time to read a family's pending requests and settle rates, for queue positions."
    );
    describe_histogram!(
        "api_accept_batch_size",
        Unit::Count,
        "Accepted commands written by one statement and one commit (group commit)."
    );
    describe_counter!(
        "api_accept_batch_fallbacks_total",
        Unit::Count,
        "Accept batches whose statement failed and whose commands were stored one by one."
    );
    describe_gauge!(
        "api_accepts_waiting",
        Unit::Count,
        "Accepted commands waiting for a batch writer of this api."
    );
    describe_counter!(
        "api_commands_refused_from_memory_total",
        Unit::Count,
        "Commands refused from what this api already knew (a coupon seen sold out), without a database write, by error code."
    );
    describe_histogram!(
        "api_command_store_seconds",
        Unit::Seconds,
        "Time to store an accepted command's request in PostgreSQL, by family."
    );
    describe_counter!(
        "api_waiters_woken_total",
        Unit::Count,
        "Times a client waiting for its request's answer was handed it settled (by a settlement notice, or by the sweep when a notice was lost)."
    );
    describe_histogram!(
        "api_command_publish_seconds",
        Unit::Seconds,
        "Time for the command relay to publish one slice of stored commands until their confirms."
    );
    describe_histogram!(
        "api_command_publish_batch_size",
        Unit::Count,
        "Stored commands the command relay published in one slice (one confirm wait)."
    );
    describe_gauge!(
        "api_commands_unpublished",
        Unit::Count,
        "Commands this api stored (accepted) that RabbitMQ has not confirmed yet: queued in the relay while the broker is down."
    );

    // The worker: settling commands.
    describe_counter!(
        "worker_commands_settled_total",
        Unit::Count,
        "Commands settled by this worker, by family and outcome (succeeded or failed)."
    );
    describe_counter!(
        "worker_batches_settled_again_locked_total",
        Unit::Count,
        "Batches whose shared rows (a product's stock, read unlocked) moved before their commit, or that would refuse for stock: settled again at once with those rows locked, by family."
    );
    describe_counter!(
        "worker_commands_duplicate_total",
        Unit::Count,
        "Deliveries of commands already settled (redelivered after a crash or a handover), acked without effect."
    );
    describe_counter!(
        "worker_redeliveries_total",
        Unit::Count,
        "Deliveries that RabbitMQ marked as redelivered, by family."
    );
    describe_histogram!(
        "worker_batch_size",
        Unit::Count,
        "Commands settled together in one transaction, by family."
    );
    describe_histogram!(
        "worker_settle_duration_seconds",
        Unit::Seconds,
        "Time of one committed settlement transaction, by family."
    );
    describe_histogram!(
        "worker_command_latency_seconds",
        Unit::Seconds,
        "Time from a command's acceptance by the api to its settlement committed and acked, by family."
    );
    describe_counter!(
        "worker_partition_settled_total",
        Unit::Count,
        "Commands settled (succeeded or failed), by family and partition, by the replica that owned it."
    );
    describe_gauge!(
        "worker_partitions_owned",
        Unit::Count,
        "Partitions of a family this worker replica holds and consumes."
    );
    describe_gauge!(
        "worker_partition_stalled_seconds",
        Unit::Seconds,
        "How long a partition this worker consumes has held ready messages its consumer does not receive (0 when fed), by family and partition."
    );
    describe_counter!(
        "worker_consumers_resubscribed_total",
        Unit::Count,
        "Partition consumers subscribed again on a new channel because ready messages did not reach them for STALLED_CONSUMER_AFTER_MS, by family."
    );
    describe_counter!(
        "worker_requests_republished_total",
        Unit::Count,
        "Stored requests the sweeper published because the api never recorded their confirm."
    );

    // The worker: dead letters.
    describe_counter!(
        "worker_dead_lettered_total",
        Unit::Count,
        "Commands this worker gave up on and rejected to the dead-letter queue, by family."
    );
    describe_counter!(
        "worker_requests_failed_by_dead_letter_total",
        Unit::Count,
        "Pending requests failed with ERR_PROCESSING_FAILED because their command was parked as a dead letter."
    );
    describe_counter!(
        "worker_commands_revived_total",
        Unit::Count,
        "Dead commands that ran out of deliveries unread and were sent back to their partition."
    );
    describe_counter!(
        "worker_unreadable_letters_total",
        Unit::Count,
        "Dead letters that are not commands of their queue's family, parked as unreadable."
    );

    // The worker: orders, payments and the outbox.
    describe_counter!(
        "orders_reserved_total",
        Unit::Count,
        "Order creations that reserved their stock."
    );
    describe_counter!(
        "orders_rejected_total",
        Unit::Count,
        "Order creations rejected (unknown product, out of stock, invalid lines or too large a total)."
    );
    describe_counter!(
        "payments_total",
        Unit::Count,
        "Order payments settled, by outcome (paid or insufficient_balance)."
    );
    describe_gauge!(
        "orders_reserved_now",
        Unit::Count,
        "Orders currently RESERVED (stock held, payment awaited), as last counted by this worker."
    );
    describe_gauge!(
        "outbox_backlog",
        Unit::Count,
        "Outbox events not yet published to the events exchange, as last counted by this worker."
    );
    describe_gauge!(
        "outbox_oldest_unpublished_seconds",
        Unit::Seconds,
        "Age of the oldest outbox event not yet published (0 with none), as last counted by this worker."
    );
    describe_counter!(
        "outbox_events_published_total",
        Unit::Count,
        "Outbox events published to the events exchange and confirmed."
    );

    // The batch.
    describe_counter!(
        "batch_job_runs_total",
        Unit::Count,
        "Job runs done by this batch process, by job and outcome (succeeded or failed)."
    );
    describe_histogram!(
        "batch_job_duration_seconds",
        Unit::Seconds,
        "Time a job run took, whatever its outcome, by job."
    );
    describe_gauge!(
        "batch_job_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the job's last successful run in this batch process, by job."
    );
    describe_gauge!(
        "consistency_violations",
        Unit::Count,
        "Rows the last consistency audit in this batch process found breaking the check, by check (0: clean)."
    );
    describe_gauge!(
        "consistency_audit_last_run_timestamp_seconds",
        Unit::Seconds,
        "Unix time this batch process last finished a consistency audit (the replica with the latest one has the current figures)."
    );
    describe_counter!(
        "reservations_expired_total",
        Unit::Count,
        "Unpaid reservations past reservedUntil expired and their stock returned."
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    /// A label set like the one a call site attaches.
    type Labels = &'static [(&'static str, &'static str)];

    /// Every metric name the binaries emit, with its kind and a label set like theirs.
    const EMITTED: &[(Kind, &str, Labels)] = &[
        (Kind::Counter, "api_auth_failures_total", &[]),
        (Kind::Counter, "api_accept_batch_fallbacks_total", &[]),
        (Kind::Gauge, "api_accepts_waiting", &[]),
        (Kind::Histogram, "api_accept_batch_size", &[]),
        (
            Kind::Counter,
            "api_commands_refused_from_memory_total",
            &[("code", "ERR_COUPON_OUT_OF_STOCK")],
        ),
        (
            Kind::Counter,
            "api_commands_overloaded_total",
            &[("family", "coupon")],
        ),
        (
            Kind::Counter,
            "api_commands_published_total",
            &[("family", "order"), ("outcome", "confirmed")],
        ),
        (
            Kind::Counter,
            "api_commands_refused_total",
            &[("type", "COUPON_ISSUE"), ("code", "ERR_COUPON_OUT_OF_STOCK")],
        ),
        (Kind::Counter, "api_rate_limited_total", &[]),
        (Kind::Counter, "api_waiters_woken_total", &[]),
        (
            Kind::Counter,
            "batch_job_runs_total",
            &[("job", "housekeeping"), ("outcome", "succeeded")],
        ),
        (
            Kind::Counter,
            "http_requests_total",
            &[("method", "POST"), ("route", "/orders"), ("status", "202")],
        ),
        (Kind::Counter, "orders_cancelled_total", &[]),
        (Kind::Counter, "orders_rejected_total", &[]),
        (Kind::Counter, "orders_reserved_total", &[]),
        (Kind::Counter, "outbox_events_published_total", &[]),
        (Kind::Counter, "payments_total", &[("outcome", "paid")]),
        (Kind::Counter, "reservations_expired_total", &[]),
        (
            Kind::Counter,
            "worker_commands_duplicate_total",
            &[("family", "coupon")],
        ),
        (
            Kind::Counter,
            "worker_batches_settled_again_locked_total",
            &[("family", "order")],
        ),
        (
            Kind::Counter,
            "worker_commands_revived_total",
            &[("family", "order")],
        ),
        (
            Kind::Counter,
            "worker_commands_settled_total",
            &[("family", "coupon"), ("outcome", "succeeded")],
        ),
        (
            Kind::Counter,
            "worker_dead_lettered_total",
            &[("family", "order")],
        ),
        (
            Kind::Counter,
            "worker_redeliveries_total",
            &[("family", "coupon")],
        ),
        (
            Kind::Counter,
            "worker_requests_failed_by_dead_letter_total",
            &[("family", "order")],
        ),
        (
            Kind::Counter,
            "worker_consumers_resubscribed_total",
            &[("family", "coupon")],
        ),
        (Kind::Counter, "worker_requests_republished_total", &[]),
        (
            Kind::Counter,
            "worker_unreadable_letters_total",
            &[("family", "coupon")],
        ),
        (Kind::Gauge, "api_command_queue_depth", &[("family", "coupon")]),
        (
            Kind::Gauge,
            "api_partition_queue_ready",
            &[("family", "coupon"), ("partition", "3")],
        ),
        (
            Kind::Counter,
            "worker_partition_settled_total",
            &[("family", "order"), ("partition", "0")],
        ),
        (
            Kind::Histogram,
            "api_queue_snapshot_read_seconds",
            &[("family", "order")],
        ),
        (
            Kind::Gauge,
            "batch_job_last_success_timestamp_seconds",
            &[("job", "popular-products")],
        ),
        (
            Kind::Gauge,
            "consistency_violations",
            &[("check", "balance_ledger")],
        ),
        (Kind::Gauge, "consistency_audit_last_run_timestamp_seconds", &[]),
        (Kind::Gauge, "orders_reserved_now", &[]),
        (Kind::Gauge, "outbox_backlog", &[]),
        (Kind::Gauge, "outbox_oldest_unpublished_seconds", &[]),
        (Kind::Gauge, "worker_partitions_owned", &[("family", "order")]),
        (
            Kind::Gauge,
            "worker_partition_stalled_seconds",
            &[("family", "order"), ("partition", "3")],
        ),
        (Kind::Histogram, "api_command_publish_seconds", &[]),
        (Kind::Histogram, "api_command_publish_batch_size", &[]),
        (Kind::Gauge, "api_commands_unpublished", &[]),
        (
            Kind::Histogram,
            "api_command_store_seconds",
            &[("family", "order")],
        ),
        (Kind::Histogram, "api_token_lookup_batch_size", &[]),
        (Kind::Histogram, "api_coupon_check_batch_size", &[]),
        (Kind::Histogram, "api_quote_batch_size", &[]),
        (Kind::Histogram, "api_payment_check_batch_size", &[]),
        (Kind::Histogram, "api_key_read_batch_size", &[]),
        (
            Kind::Histogram,
            "batch_job_duration_seconds",
            &[("job", "reservation-expiry")],
        ),
        (
            Kind::Histogram,
            "http_request_duration_seconds",
            &[("method", "GET"), ("route", "/products"), ("status", "200")],
        ),
        (Kind::Histogram, "worker_batch_size", &[("family", "coupon")]),
        (
            Kind::Histogram,
            "worker_command_latency_seconds",
            &[("family", "order")],
        ),
        (
            Kind::Histogram,
            "worker_settle_duration_seconds",
            &[("family", "coupon")],
        ),
    ];

    #[derive(Clone, Copy)]
    enum Kind {
        Counter,
        Gauge,
        Histogram,
    }

    fn emit_one_sample_of_each() {
        for &(kind, name, labels) in EMITTED {
            let labels: Vec<(String, String)> = labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            match kind {
                Kind::Counter => metrics::counter!(name, &labels).increment(1),
                Kind::Gauge => metrics::gauge!(name, &labels).set(1.0),
                Kind::Histogram => metrics::histogram!(name, &labels).record(0.01),
            }
        }
    }

    /// The metric names on the lines of `/metrics` that start with `prefix`.
    fn names_after(rendered: &str, prefix: &str) -> BTreeSet<String> {
        rendered
            .lines()
            .filter_map(|line| line.strip_prefix(prefix))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_emitted_metric_renders_with_its_help_text() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_metrics();
            emit_one_sample_of_each();
        });
        let rendered = handle.render();

        let typed = names_after(&rendered, "# TYPE ");
        let helped = names_after(&rendered, "# HELP ");
        let emitted: BTreeSet<String> = EMITTED.iter().map(|&(_, name, _)| name.to_owned()).collect();
        assert_eq!(
            typed, emitted,
            "every emitted metric is rendered with a # TYPE line"
        );
        let without_help: Vec<&String> = typed.difference(&helped).collect();
        assert!(
            without_help.is_empty(),
            "metrics without a # HELP line: {without_help:?}"
        );
        for line in rendered.lines().filter(|l| l.starts_with("# HELP ")) {
            // `# HELP <name> <text>`: the text says something.
            assert!(
                line.splitn(4, ' ').nth(3).is_some_and(|text| text.len() > 10),
                "{line}"
            );
        }
    }

    #[test]
    fn the_process_recorder_is_installed_with_the_descriptions() {
        // The recorder every binary installs, not a local one: this test binary's global.
        let handle = crate::telemetry::metrics_recorder().unwrap();
        metrics::counter!("orders_reserved_total").increment(1);
        assert!(names_after(&handle.render(), "# HELP ").contains("orders_reserved_total"));
    }

    #[test]
    fn a_metric_without_a_description_has_no_help_line() {
        // The check above would pass vacuously if the exporter wrote HELP for everything.
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_metrics();
            metrics::counter!("undescribed_total").increment(1);
        });
        let rendered = handle.render();
        assert!(names_after(&rendered, "# TYPE ").contains("undescribed_total"));
        assert!(!names_after(&rendered, "# HELP ").contains("undescribed_total"));
    }
}
