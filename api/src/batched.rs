//! Reads that concurrent requests share: a request's read waits for the statement running
//! now, and every read that arrived meanwhile goes into the next statement. No timer: alone,
//! a read runs at once; under a burst the statements per request fall as load grows, and a
//! read-only statement is a commit of its own in PostgreSQL's accounting.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

/// A reader of `Q`s answered with `A`s, many per statement.
pub struct Batched<Q, A> {
    queue: mpsc::UnboundedSender<(Q, oneshot::Sender<Result<A, Failed>>)>,
}

/// Why a statement failed, for each read it carried.
#[derive(Debug, Clone)]
pub struct Failed {
    /// PostgreSQL could not serve: 503, not 500.
    pub unavailable: bool,
    pub cause: String,
}

impl From<Failed> for ApiError {
    fn from(failed: Failed) -> Self {
        let cause = anyhow::anyhow!(failed.cause);
        if failed.unavailable {
            ApiError::Unavailable(cause.context("PostgreSQL"))
        } else {
            ApiError::internal(cause)
        }
    }
}

impl<Q: Send + 'static, A: Send + 'static> Batched<Q, A> {
    /// Starts the task that runs `read` over at most `max` queries at a time; `read` answers
    /// each query of its batch, in the batch's order. `metric` records the batch sizes.
    pub fn start<F, Fut>(max: usize, metric: &'static str, read: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + 'static,
        Fut: Future<Output = sqlx::Result<Vec<A>>> + Send + 'static,
    {
        let (queue, mut receiver) = mpsc::unbounded_channel::<(Q, oneshot::Sender<Result<A, Failed>>)>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while receiver.recv_many(&mut batch, max).await > 0 {
                metrics::histogram!(metric).record(batch.len() as f64);
                let (queries, answers): (Vec<Q>, Vec<_>) = batch.drain(..).unzip();
                // A task of its own, so that a read that panics fails its batch, not the
                // reader.
                let read = tokio::spawn(read(queries));
                let outcome = read.await.unwrap_or_else(|panicked| {
                    tracing::error!(error = %panicked, metric, "a batched read panicked");
                    Err(sqlx::Error::Protocol(format!(
                        "the batched read panicked: {panicked}"
                    )))
                });
                match outcome {
                    Ok(found) if found.len() == answers.len() => {
                        for (answer, found) in answers.into_iter().zip(found) {
                            let _ = answer.send(Ok(found));
                        }
                    }
                    outcome => {
                        let failed = match outcome {
                            Err(e) => Failed {
                                unavailable: shared::store::db::is_unavailable(&e),
                                cause: e.to_string(),
                            },
                            Ok(found) => Failed {
                                unavailable: false,
                                cause: format!("{} answers to {} reads", found.len(), answers.len()),
                            },
                        };
                        for answer in answers {
                            let _ = answer.send(Err(failed.clone()));
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// The answer to `query`, read together with whatever else is waiting.
    pub async fn read(&self, query: Q) -> Result<A, Failed> {
        let (answer, answered) = oneshot::channel();
        let gone = || Failed {
            unavailable: false,
            cause: "the batched reader has stopped".to_owned(),
        };
        self.queue.send((query, answer)).map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_read_gets_its_own_answer_and_a_failed_or_panicking_read_fails_only_its_batch() {
        let doubled = Batched::start(8, "test_batch_size", |queries: Vec<i64>| async move {
            if queries.contains(&-1) {
                return Err(sqlx::Error::RowNotFound);
            }
            assert!(!queries.contains(&-2), "a read that panics");
            Ok(queries.into_iter().map(|q| q * 2).collect())
        });
        let answers = futures::future::join_all((0..20).map(|q| doubled.read(q))).await;
        for (q, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), 2 * q as i64);
        }
        let failed = doubled.read(-1).await.unwrap_err();
        assert!(!failed.unavailable);
        // A read that panics fails its own batch, and the reader goes on.
        assert!(doubled.read(-2).await.is_err());
        assert_eq!(doubled.read(21).await.unwrap(), 42);
    }
}
