//! The RabbitMQ topology of commands, declared idempotently by whichever process starts
//! first (declaring what exists with the same arguments is a no-op).
//!
//! ```text
//! {prefix}commands (direct) ──coupon.p00…pNN──▶ quorum queues, single active consumer
//!                            ──order.p00…pNN───▶   (delivery limit, dead-letter exchange,
//!                                                   dead-lettering at least once)
//! {prefix}commands.dead (direct) ──coupon──▶ coupon.dead   ──order──▶ order.dead
//!      (workers mark the requests of dead letters FAILED, then move them to coupon.parked /
//!       order.parked, where they stay for inspection and replay)
//! ```
//! The prefix is empty in production; tests give each test its own.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{var, ConfigError};
use crate::domain::command::Family;

/// Names and arguments of the command queues.
#[derive(Debug, Clone)]
pub struct Topology {
    /// `AMQP_PREFIX`: prepended to every exchange and queue name (tests isolate themselves).
    pub prefix: String,
    /// `COMMAND_PARTITIONS`: partition queues per family. Changing it re-routes keys, so it
    /// is fixed for the life of a deployment.
    pub partitions: u16,
    /// `COMMAND_DELIVERY_LIMIT`: deliveries of one message before it is dead-lettered.
    pub delivery_limit: u32,
    /// `COMMAND_QUEUE_EXPIRES_MS`: delete queues unused for this long. Tests only: a
    /// production queue must never disappear.
    pub queue_expires_ms: Option<u32>,
    /// `COMMAND_QUEUE_REPLICAS`: the members of each quorum queue when it is declared
    /// (RabbitMQ takes fewer on a smaller cluster: one on a single node). Three survive the
    /// loss of any one node; five, of two.
    pub replicas: u32,
}

impl Topology {
    pub fn from_env() -> Result<Self, ConfigError> {
        let expires: u32 = var("COMMAND_QUEUE_EXPIRES_MS", 0)?;
        Ok(Self {
            prefix: var("AMQP_PREFIX", String::new())?,
            partitions: var("COMMAND_PARTITIONS", 16_u16)?.max(1),
            delivery_limit: var("COMMAND_DELIVERY_LIMIT", 10)?,
            queue_expires_ms: (expires > 0).then_some(expires),
            replicas: var("COMMAND_QUEUE_REPLICAS", 3_u32)?.max(1),
        })
    }

    pub fn commands_exchange(&self) -> String {
        format!("{}commands", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}commands.dead", self.prefix)
    }

    /// The queue of one partition, e.g. `coupon.p07`; also its routing key.
    pub fn queue(&self, family: Family, partition: u16) -> String {
        format!("{}{}.p{:02}", self.prefix, family.as_str(), partition)
    }

    pub fn dead_letter_queue(&self, family: Family) -> String {
        format!("{}{}.dead", self.prefix, family.as_str())
    }

    /// Where dead letters rest once their requests are marked failed.
    pub fn parked_queue(&self, family: Family) -> String {
        format!("{}{}.parked", self.prefix, family.as_str())
    }

    /// The durable topic exchange of events to the data platform (`ecommerce.events`).
    pub fn events_exchange(&self) -> String {
        format!("{}ecommerce.events", self.prefix)
    }

    /// The default queue of the data-platform stand-in (`worker data-platform`).
    pub fn data_platform_queue(&self) -> String {
        format!("{}data-platform.order-paid", self.prefix)
    }

    /// Every queue the topology declares: partitions, dead letters and parked letters.
    pub fn queues(&self) -> Vec<String> {
        let mut queues = Vec::new();
        for family in Family::ALL {
            queues.extend((0..self.partitions).map(|p| self.queue(family, p)));
            queues.push(self.dead_letter_queue(family));
            queues.push(self.parked_queue(family));
        }
        queues
    }

    /// Every exchange the topology declares, the events exchange included.
    pub fn exchanges(&self) -> [String; 3] {
        [
            self.commands_exchange(),
            self.dead_letter_exchange(),
            self.events_exchange(),
        ]
    }

    /// Deletes the topology's queues and exchanges, and `extra_queues` (queues bound to it
    /// by others), with whatever they hold. For tests and benchmarks that ran under a prefix
    /// of their own; never for production, whose queues hold commands not yet settled.
    ///
    /// RabbitMQ answers the delete of a missing queue with success, so the count is of
    /// deletes the broker accepted, not of queues that were there.
    pub async fn delete(&self, connection: &Connection, extra_queues: &[String]) -> lapin::Result<usize> {
        // A refused delete closes its channel: one channel per delete.
        let mut accepted = 0;
        for queue in self.queues().iter().chain(extra_queues) {
            let channel = connection.create_channel().await?;
            let deleted = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            accepted += usize::from(deleted.is_ok());
        }
        for exchange in self.exchanges() {
            let channel = connection.create_channel().await?;
            let deleted = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            accepted += usize::from(deleted.is_ok());
        }
        Ok(accepted)
    }

    /// Declares the events exchange (by the relay and by consumers, whichever comes first).
    pub async fn declare_events(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
    }

    /// Declares exchanges, partition queues and dead-letter queues.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.commands_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        let queue_options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for family in Family::ALL {
            channel
                .queue_declare(
                    self.parked_queue(family).as_str().into(),
                    queue_options,
                    self.quorum_arguments(None),
                )
                .await?;
            let dead = self.dead_letter_queue(family);
            channel
                .queue_declare(dead.as_str().into(), queue_options, self.quorum_arguments(None))
                .await?;
            channel
                .queue_bind(
                    dead.as_str().into(),
                    self.dead_letter_exchange().into(),
                    family.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            for partition in 0..self.partitions {
                let queue = self.queue(family, partition);
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        queue_options,
                        self.quorum_arguments(Some(family)),
                    )
                    .await?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        self.commands_exchange().into(),
                        queue.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Arguments of a quorum queue; partition queues (`dead_letter_to` set) also get single
    /// active consumer, the delivery limit and their family's dead-letter route, at least
    /// once.
    fn quorum_arguments(&self, dead_letter_to: Option<Family>) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongUInt(self.replicas),
        );
        if let Some(family) = dead_letter_to {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongUInt(self.delivery_limit),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.dead_letter_exchange().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(family.as_str().into()),
            );
            // A quorum queue dead-letters at most once by default: a dead letter lost in
            // transit would leave its request PENDING for ever (its api published it, so
            // the sweeper never sends it again). At least once keeps the message in its
            // partition queue until the dead-letter queue confirms it; the strategy only
            // takes effect with `reject-publish` overflow, and no length limit is set, so
            // that changes nothing else.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        if let Some(ms) = self.queue_expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        args
    }
}
