//! Answers to the broker for what was delivered (acks and rejects), each bounded in time.

use std::time::Duration;

/// The longest an ack or a reject may take to be sent.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// An ack or reject, given up after [`ACK_TIMEOUT`]. A fault run saw one partition's
/// consumer go silent through a broker restart, right after a batch: no failure, no
/// re-subscription, its lease renewed and its queue unread; an ack sent into a connection
/// that breaks at that moment was the one wait there without a bound. Given up, the
/// consumer fails and starts again on a new channel; what it settled and did not ack is
/// delivered again and found settled.
pub async fn within_answer_time<T>(
    answer: impl std::future::Future<Output = lapin::Result<T>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(ACK_TIMEOUT, answer).await {
        Ok(sent) => sent.map(drop).map_err(Into::into),
        Err(_) => anyhow::bail!("the broker did not take an ack within {ACK_TIMEOUT:?}"),
    }
}
