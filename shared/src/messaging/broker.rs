//! The RabbitMQ connection of a process.
//!
//! A process keeps one connection and hands out channels on it. When the broker restarts
//! the connection dies; the next caller that needs it opens a new one, so processes recover
//! by themselves without a restart and without a reconnect loop that spins while nobody
//! needs the broker.
//!
//! `AMQP_URL` may name several nodes of one cluster. A process connects to the first that
//! answers; when its connection dies it tries the next node first, so the loss of a node
//! moves its connections to the others at the first call that needs one. Queues, exchanges
//! and bindings are the cluster's, not a node's: the same channel calls work on any node.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::config::{redact_url, BrokerSettings};

/// How long one connection attempt may take. A healthy local broker answers in
/// milliseconds; an attempt that stalls is abandoned and tried once more.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a channel may take to open before its connection counts as dead. Longer than
/// a handshake: a live but busy broker must not lose every channel of a connection because
/// one open was slow.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts per call before the broker counts as down.
const CONNECT_ATTEMPTS: u32 = 2;

/// The AMQP heartbeat asked for when `AMQP_URL` does not name one (`?heartbeat=N`), in
/// seconds. Both ends send one every half of it when they have nothing else to send, and
/// lapin closes a connection that has received nothing for two of it: a connection that went
/// silent (the broker's host died, a firewall dropped the connection's state) is noticed
/// within 20 to 25 s even by a process that only consumes, where RabbitMQ's default (60 s)
/// would take two minutes. Publishers notice sooner, when a confirm does not come.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Why the broker cannot be used right now.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// The connection in use and the node (index in the node list) it goes to.
struct Live {
    connection: Arc<Connection>,
    node: usize,
}

/// A connection that is re-opened on demand after it breaks, to any node of the list.
pub struct Broker {
    nodes: Vec<String>,
    /// Shown in the RabbitMQ management UI, so operators can tell processes apart.
    connection_name: String,
    current: Mutex<Option<Live>>,
    /// The node the next connection tries first: the one after the node whose connection
    /// died, so that a dead node is not waited on before the live ones are asked.
    first_choice: AtomicUsize,
}

impl Broker {
    pub fn new(settings: &BrokerSettings, connection_name: impl Into<String>) -> Self {
        Self {
            nodes: settings.nodes().into_iter().map(with_heartbeat).collect(),
            connection_name: connection_name.into(),
            current: Mutex::new(None),
            first_choice: AtomicUsize::new(0),
        }
    }

    /// The live connection, opening a new one if there is none or the last one broke.
    pub async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut current = self.current.lock().await;
        match current.as_ref() {
            Some(live) if live.connection.status().connected() => return Ok(Arc::clone(&live.connection)),
            Some(dead) => self.move_past(dead.node),
            None => {}
        }
        let (connection, node) = self.connect().await?;
        tracing::info!(name = %self.connection_name, node = %redact_url(&self.nodes[node]), "connected to RabbitMQ");
        let connection = Arc::new(connection);
        *current = Some(Live {
            connection: Arc::clone(&connection),
            node,
        });
        Ok(connection)
    }

    /// Makes the node after `node` the first choice of the next connection.
    fn move_past(&self, node: usize) {
        let next = (node + 1) % self.nodes.len().max(1);
        self.first_choice.store(next, Ordering::Relaxed);
    }

    /// Opens a connection to the first node of the list, from the first choice on, that
    /// answers; returns it with the node's index. A stopped node refuses at once; now and
    /// then a handshake stalls with no answer instead (seen under load on a busy two-core
    /// machine): it is abandoned after [`CONNECT_TIMEOUT`] and the next node asked. Each
    /// node gets [`CONNECT_ATTEMPTS`] chances.
    async fn connect(&self) -> Result<(Connection, usize), BrokerError> {
        let count = self.nodes.len().max(1);
        let first = self.first_choice.load(Ordering::Relaxed) % count;
        let mut last_error = BrokerError::Timeout(CONNECT_TIMEOUT);
        for attempt in 0..CONNECT_ATTEMPTS * u32::try_from(count).unwrap_or(u32::MAX) {
            let node = (first + attempt as usize) % count;
            let Some(url) = self.nodes.get(node) else {
                break;
            };
            let properties =
                ConnectionProperties::default().with_connection_name(self.connection_name.clone().into());
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
                Ok(Ok(connection)) => {
                    self.first_choice.store(node, Ordering::Relaxed);
                    return Ok((connection, node));
                }
                Ok(Err(e)) => {
                    tracing::debug!(name = %self.connection_name, node = %redact_url(url), error = %e, "RabbitMQ node refused the connection");
                    last_error = BrokerError::Amqp(e);
                }
                Err(_) => {
                    tracing::warn!(name = %self.connection_name, node = %redact_url(url), "RabbitMQ handshake stalled; trying again");
                    last_error = BrokerError::Timeout(CONNECT_TIMEOUT);
                }
            }
        }
        Err(last_error)
    }

    /// A new channel on the live connection. A connection that does not answer the open
    /// within [`CHANNEL_TIMEOUT`] (a broker or network that takes bytes and answers
    /// nothing) is given up, so that the next call opens a fresh one instead of every
    /// caller waiting out the heartbeat timeout, minutes, on a dead one.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let conn = self.connection().await?;
        match tokio::time::timeout(CHANNEL_TIMEOUT, conn.create_channel()).await {
            Ok(channel) => Ok(channel?),
            Err(_) => {
                self.forget(&conn).await;
                Err(BrokerError::Timeout(CHANNEL_TIMEOUT))
            }
        }
    }

    /// Drops `conn` as the live connection (if it still is) and closes it in the background.
    async fn forget(&self, conn: &Arc<Connection>) {
        let mut current = self.current.lock().await;
        if current
            .as_ref()
            .is_some_and(|live| Arc::ptr_eq(&live.connection, conn))
        {
            tracing::warn!(name = %self.connection_name, "RabbitMQ connection unresponsive; opening a new one");
            if let Some(Live {
                connection: stale,
                node,
            }) = current.take()
            {
                self.move_past(node);
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(CONNECT_TIMEOUT, stale.close(200, "unresponsive".into())).await;
                });
            }
        }
    }

    /// True when the broker answers now (used by readiness checks).
    pub async fn is_reachable(&self) -> bool {
        self.connection().await.is_ok()
    }

    /// Waits until the broker answers or `cancel` fires; used at start-up.
    pub async fn wait_until_reachable(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), BrokerError> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.connection().await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "RabbitMQ not reachable, retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return Err(e),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Closes the connection politely, so the broker does not log an abrupt disconnect.
    pub async fn close(&self) {
        if let Some(live) = self.current.lock().await.take() {
            if let Err(e) = live.connection.close(200, "shutdown".into()).await {
                tracing::debug!(error = %e, "closing the RabbitMQ connection");
            }
        }
    }
}

/// `url` with `heartbeat=`[`DEFAULT_HEARTBEAT_SECS`] in its query, unless it names one.
fn with_heartbeat(url: &str) -> String {
    let query = url.split_once('?').map(|(_, query)| query);
    if query.is_some_and(|q| q.split('&').any(|pair| pair.starts_with("heartbeat="))) {
        return url.to_owned();
    }
    let separator = if query.is_some() { '&' } else { '?' };
    format!("{url}{separator}heartbeat={DEFAULT_HEARTBEAT_SECS}")
}

/// Ready messages in `queue`, by a passive declare (which fails, closing the channel, when
/// the queue does not exist).
pub async fn queue_depth(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await?;
    Ok(declared.message_count())
}

/// Why a message was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("RabbitMQ did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key {0:?}")]
    Unroutable(String),
    #[error("not sent: an earlier message of its batch could not be sent")]
    NotSent,
}

impl From<lapin::Error> for PublishError {
    fn from(error: lapin::Error) -> Self {
        Self::Broker(BrokerError::Amqp(error))
    }
}

/// How long a publish may wait for the broker's confirm before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes persistent, mandatory messages and waits for the broker's confirm.
///
/// One confirm-mode channel serves every caller: lapin pipelines publishes on it and
/// matches each confirm to its publish, so concurrent requests do not queue behind each
/// other's round trips. A broken channel is replaced on the next publish.
pub struct Publisher {
    broker: Arc<Broker>,
    channel: Mutex<Option<Channel>>,
}

impl Publisher {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            channel: Mutex::new(None),
        }
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Closes the publishing channel and waits for the broker's answer. Call it before
    /// [`Broker::close`]: a channel merely dropped is closed in the background, and closing
    /// the connection under it makes lapin log a connection error at every shutdown.
    pub async fn close(&self) {
        if let Some(channel) = self.channel.lock().await.take() {
            let _ = tokio::time::timeout(CONFIRM_TIMEOUT, channel.close(200, "shutdown".into())).await;
        }
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut current = self.channel.lock().await;
        if let Some(channel) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.broker.channel().await?;
        tokio::time::timeout(
            CONFIRM_TIMEOUT,
            channel.confirm_select(lapin::options::ConfirmSelectOptions::default()),
        )
        .await
        .map_err(|_| BrokerError::Timeout(CONFIRM_TIMEOUT))??;
        *current = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes `body` and returns once the broker has confirmed it is stored (persistent
    /// message, quorum queue); with `mandatory`, also that it was routed to a queue.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: &str,
        body: &[u8],
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let published = self
            .publish_once(exchange, routing_key, message_id, body, mandatory)
            .await;
        if matches!(
            published,
            Err(PublishError::Broker(_) | PublishError::ConfirmTimeout(_))
        ) {
            // A channel that failed or stalled is not trusted again.
            self.forget_channel().await;
        }
        published
    }

    /// Publishes `messages` to `exchange` (persistent, mandatory) on the one channel, each
    /// sent before the next so the broker takes them in this order, and only then waits for
    /// their confirms, all within one timeout: one result per message, in order. A batch of
    /// a thousand costs about one round trip, not a thousand.
    pub async fn publish_in_order(
        &self,
        exchange: &str,
        messages: &[OutgoingMessage],
    ) -> Vec<Result<(), PublishError>> {
        let mut results: Vec<Result<(), PublishError>> = Vec::with_capacity(messages.len());
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(e) => {
                results.push(Err(PublishError::Broker(e)));
                results.extend(messages.iter().skip(1).map(|_| Err(PublishError::NotSent)));
                return results;
            }
        };
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let options = lapin::options::BasicPublishOptions {
                mandatory: true,
                ..lapin::options::BasicPublishOptions::default()
            };
            let sent = channel
                .basic_publish(
                    exchange.into(),
                    message.routing_key.as_str().into(),
                    options,
                    &message.body,
                    message_properties(&message.message_id),
                )
                .await;
            match sent {
                Ok(confirm) => confirms.push(Ok(confirm)),
                Err(e) => {
                    confirms.push(Err(PublishError::from(e)));
                    break;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        for (confirm, message) in confirms.into_iter().zip(messages) {
            let result = match confirm {
                Err(e) => Err(e),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Err(_) => Err(PublishError::ConfirmTimeout(CONFIRM_TIMEOUT)),
                    Ok(Err(e)) => Err(PublishError::from(e)),
                    Ok(Ok(confirmation)) if confirmation.is_nack() => Err(PublishError::Nacked),
                    Ok(Ok(confirmation)) => match confirmation.take_message() {
                        Some(_) => Err(PublishError::Unroutable(message.routing_key.clone())),
                        None => Ok(()),
                    },
                },
            };
            results.push(result);
        }
        results.extend(
            messages
                .iter()
                .skip(results.len())
                .map(|_| Err(PublishError::NotSent)),
        );
        if results
            .iter()
            .any(|r| matches!(r, Err(PublishError::Broker(_) | PublishError::ConfirmTimeout(_))))
        {
            self.forget_channel().await;
        }
        results
    }

    /// Drops the channel after a failure or a stall: the next publish opens a new one (and a
    /// new connection if this one is gone).
    async fn forget_channel(&self) {
        let stale = self.channel.lock().await.take();
        if let Some(channel) = stale {
            let _ = tokio::time::timeout(CONFIRM_TIMEOUT, channel.close(200, "publish failed".into())).await;
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: &str,
        body: &[u8],
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let properties = message_properties(message_id);
        let options = lapin::options::BasicPublishOptions {
            mandatory,
            ..lapin::options::BasicPublishOptions::default()
        };
        let confirm = async {
            channel
                .basic_publish(exchange.into(), routing_key.into(), options, body, properties)
                .await?
                .await
        };
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| PublishError::ConfirmTimeout(CONFIRM_TIMEOUT))??;
        if confirmation.is_nack() {
            return Err(PublishError::Nacked);
        }
        if confirmation.take_message().is_some() {
            return Err(PublishError::Unroutable(routing_key.to_owned()));
        }
        Ok(())
    }
}

/// A message for [`Publisher::publish_in_order`].
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub routing_key: String,
    /// The broker's `message_id`, for consumers that deduplicate.
    pub message_id: String,
    pub body: Vec<u8>,
}

/// Persistent JSON with its id and the time it was sent.
fn message_properties(message_id: &str) -> lapin::BasicProperties {
    lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::with_heartbeat;

    #[test]
    fn a_url_without_a_heartbeat_asks_for_the_default_and_one_with_keeps_its_own() {
        assert_eq!(
            with_heartbeat("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://mq:5672/%2f?frame_max=8192"),
            "amqp://mq:5672/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://mq:5672/%2f?heartbeat=30"),
            "amqp://mq:5672/%2f?heartbeat=30"
        );
        assert_eq!(
            with_heartbeat("amqp://mq:5672/%2f?channel_max=9&heartbeat=0"),
            "amqp://mq:5672/%2f?channel_max=9&heartbeat=0"
        );
    }
}
